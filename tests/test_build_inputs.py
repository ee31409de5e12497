"""Hostile build inputs (issue 21, "Hardening II"): broken exports, impossible manifests, files outside
the export, graphs that disagree with their manifest, out-of-range numeric options and mismatched
checkpoints. Each is one `error:` line, exit code 2, and nothing written; all through the real CLI.

The session's ViT-B-32 export is copied with hard links (helpers.linked_copy) and a file is replaced,
never edited, before it is corrupted: the shared fixture stays intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import linked_copy, run_cli


def one_line_error(result: subprocess.CompletedProcess, message: str, *leftovers: Path) -> str:
    """Exit 2, exactly one `error:` line containing `message`, no traceback, nothing left behind."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    for path in leftovers:
        assert not path.exists(), f"{path} was written"
        assert not list(path.parent.glob(f".{path.name}.*")), f"a staged {path.name} was left"
    return errors[0]


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # a hard link to the session's export: replace, never write through it
    path.write_bytes(data)


def edit_manifest(export: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((export / "manifest.json").read_text())
    change(data)
    replace_file(export / "manifest.json", json.dumps(data).encode())


def setter(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    """set(["tokenizer", "context_length"], 0, ...) as a manifest edit."""

    def change(data: dict[str, Any]) -> None:
        for keys, value in zip(path_and_value[::2], path_and_value[1::2], strict=True):
            node = data
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = value

    return change


@pytest.fixture()
def export(vitb32_export: Path, tmp_path: Path) -> Path:
    return linked_copy(vitb32_export, tmp_path / "export")


def repository(export: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return run_cli("repository", "--export", str(export), "--out", str(out), "--runtime", "python",
                   "--no-python-deps", "-q", *options, timeout=300)


# ------------------------------------------------------------------ item 10: tracebacks on broken exports


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (lambda data: b"this is not onnx at all\n" * 100, "is not an ONNX graph"),
        (lambda data: data[: 1 << 20], "is not an ONNX graph (a field runs past the end (truncated?))"),
        (lambda data: b"", "is not an ONNX graph (the file is empty)"),
        (lambda data: random.Random(0).randbytes(4096), "is not an ONNX graph"),
    ],
    ids=["garbage", "truncated", "empty", "random"],
)
def test_garbage_or_truncated_graph(export: Path, tmp_path: Path, contents: Callable, message: str) -> None:
    graph = export / "image_encoder.onnx"
    with open(graph, "rb") as handle:
        head = handle.read(2 << 20)  # enough of a 350 MB graph to cut it anywhere that matters
    replace_file(graph, contents(head))
    one_line_error(repository(export, tmp_path / "repo"), message, tmp_path / "repo")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (setter(["preprocess", "mean"], [0.5, 0.5]), "preprocess.mean must be 3 finite numbers"),
        (setter(["preprocess", "std"], [0.5, 0.0, 0.5]), "preprocess.std must be positive"),
        (setter(["preprocess", "std"], [0.5, "x", 0.5]), "preprocess.std must be 3 finite numbers"),
        (setter(["logit_scale"], math.nan), "logit_scale (and logit_bias, when set) must be finite"),
        (setter(["preprocess", "size"], [-224, 224], ["image_size"], [-224, 224]), "preprocess.size[0] must be"),
        (setter(["preprocess", "resize_mode"], "stretch"), "preprocess.resize_mode must be one of"),
        (setter(["tokenizer", "context_length"], 0), "tokenizer.context_length must be an integer in 1.."),
        (setter(["tokenizer", "vocab_size"], -5), "tokenizer.vocab_size must be an integer in 1.."),
        (setter(["embed_dim"], 768), "image.output.shape must be [-1, 768]"),
        (setter(["max_batch"], 0), "max_batch must be an integer in 1.."),
        (setter(["schema_version"], 99), "schema_version 99 is not one this clip-triton reads (1)"),
        (setter(["image", "file"], "text_encoder.onnx"), "image.file and text.file both name text_encoder.onnx"),
        (setter(["pretrained"], "openai"), "exactly one of pretrained, checkpoint and random_weights"),
        (setter(["engines"], {"profile": {"min": 4, "opt": 2, "max": 8}}), "engines.profile needs min <= opt"),
        (lambda data: data.pop("embed_dim"), "manifest lacks keys: ['embed_dim']"),
        (lambda data: data["tokenizer"].pop("vocab_size"), "tokenizer lacks keys: ['vocab_size']"),
        (setter(["image", "input", "colour"], "rgb"), "image.input has unknown keys: ['colour']"),
        (setter(["text"], [1, 2]), "text must be an object"),
    ],
    ids=["mean-2", "std-0", "std-str", "scale-nan", "size-neg", "resize-mode", "context-0", "vocab-neg",
         "embed-dim", "max-batch", "schema-99", "same-file", "two-sources", "profile", "missing", "missing-nested",
         "unknown-nested", "not-object"],
)
def test_impossible_manifest_values(export: Path, tmp_path: Path, change: Callable, message: str) -> None:
    edit_manifest(export, change)
    line = one_line_error(repository(export, tmp_path / "repo"), message, tmp_path / "repo")
    assert "is not a valid clip-triton manifest" in line


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("absolute", "must be a file inside the export folder (no absolute path, no '..')"),
        ("dotdot", "must be a file inside the export folder (no absolute path, no '..')"),
        ("symlink", "outside the export folder"),
        ("tokenizer", "must be a file inside the export folder"),
    ],
)
def test_files_outside_the_export(export: Path, vitb32_export: Path, tmp_path: Path, how: str, message: str) -> None:
    outside = tmp_path / "outside.onnx"
    os.link(vitb32_export / "image_encoder.onnx", outside)  # a real graph: only where it lies is wrong
    if how == "absolute":
        edit_manifest(export, setter(["image", "file"], str(outside)))
    elif how == "dotdot":
        edit_manifest(export, setter(["image", "file"], "../outside.onnx"))
    elif how == "symlink":
        (export / "image_encoder.onnx").unlink()
        (export / "image_encoder.onnx").symlink_to(outside)
    else:
        edit_manifest(export, setter(["tokenizer", "hf_file"], "../../tokenizer.json"))
    one_line_error(repository(export, tmp_path / "repo"), message, tmp_path / "repo")


# ------------------------------------------------------------------ item 11: manifests that cannot serve


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            setter(["image", "file"], "text_encoder.onnx", ["text", "file"], "image_encoder.onnx"),
            "text_encoder.onnx is not the image graph the manifest describes (it looks like the text graph)",
        ),
        (
            setter(["embed_dim"], 768, ["image", "output", "shape"], [-1, 768], ["text", "output", "shape"], [-1, 768]),
            "image_encoder.onnx gives 512-d embeddings, but the manifest's embed_dim is 768",
        ),
        (
            setter(["tokenizer", "context_length"], 64, ["text", "input", "shape"], [-1, 64]),
            "its input is input_ids int32 [B, 77], the manifest's text tower takes input_ids int32 [B, 64]",
        ),
        (
            setter(["preprocess", "size"], [256, 256], ["image_size"], [256, 256],
                   ["image", "input", "shape"], [-1, 3, 256, 256]),
            "takes pixel_values float32 [B, 3, 256, 256]",
        ),
        (setter(["text", "output", "name"], "features"), "text_encoder.onnx's outputs are embedding float32"),
    ],
    ids=["swapped-towers", "embed-dim", "context-length", "image-size", "output-name"],
)
def test_manifest_checked_against_its_graphs(export: Path, tmp_path: Path, change: Callable, message: str) -> None:
    edit_manifest(export, change)
    one_line_error(repository(export, tmp_path / "repo"), message, tmp_path / "repo")


def tiny_text_graph(path: Path, dtype: int, dims: list[Any], location: str | None = None) -> None:
    """A small graph standing in for the text encoder: `input_ids` of `dtype`/`dims` -> [B, 512]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((77, 512), np.float32), "W")
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "W"], ["embedding"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", dtype, dims)],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 512])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if location is not None:  # its weights in a file the graph names
        weight.data_location = TensorProto.EXTERNAL
        weight.ClearField("raw_data")
        for key, value in (("location", location), ("offset", "0"), ("length", str(77 * 512 * 4))):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        model.graph.initializer[0].CopyFrom(weight)
    path.unlink()
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("dtype", "dims", "location", "message"),
    [
        ("INT64", ["batch", 77], None, "its input is input_ids int64 [B, 77]"),
        ("INT32", ["batch", 77, 1], None, "its input is input_ids int32 [B, 77, 1]"),
        ("INT32", [1, 77], None, "its input is input_ids int32 [1, 77]"),
        ("INT32", ["batch", 77], "../../outside.data", "external data for W '../../outside.data' must be a file"),
        ("INT32", ["batch", 77], "/etc/hostname", "external data for W '/etc/hostname' must be a file inside"),
        ("INT32", ["batch", 77], "link.data", "external data for W link.data resolves to"),
    ],
    ids=["int64-ids", "rank-3", "fixed-batch", "external-dotdot", "external-absolute", "external-symlink"],
)
def test_graph_dtypes_ranks_and_external_data(
    export: Path, tmp_path: Path, dtype: str, dims: list[Any], location: str | None, message: str
) -> None:
    from onnx import TensorProto

    if location == "link.data":  # a sidecar inside the folder, but a symlink to a file outside it
        (tmp_path / "outside.data").write_bytes(bytes(77 * 512 * 4))
        (export / location).symlink_to(tmp_path / "outside.data")
    tiny_text_graph(export / "text_encoder.onnx", getattr(TensorProto, dtype), dims, location)
    one_line_error(repository(export, tmp_path / "repo"), message, tmp_path / "repo")


def test_every_stage_reading_an_export_checks_it(export: Path, tmp_path: Path) -> None:
    """fp16, engines and parity run the same checks as repository, before any work."""
    graph = export / "text_encoder.onnx"
    with open(graph, "rb") as handle:
        replace_file(graph, handle.read(1 << 20))  # truncated
    before = sorted(p.name for p in export.iterdir())
    for stage in ("fp16", "parity"):
        result = run_cli(stage, "--export", str(export), "-q", timeout=300)
        one_line_error(result, "text_encoder.onnx is not an ONNX graph")
    assert sorted(p.name for p in export.iterdir()) == before  # no FP16 graphs, no parity.json, no staging
    # engines reads the FP16 graphs: a garbage one is refused before TensorRT is even looked for.
    edit_manifest(export, setter(["fp16"], {}))
    (export / "image_encoder.fp16.onnx").write_bytes(b"\x00" * 64)
    one_line_error(run_cli("engines", "--export", str(export), "-q", timeout=300),
                   "image_encoder.fp16.onnx is not an ONNX graph")
    assert not list(export.glob("*.plan")) and not list(export.glob(".engines.tmp-*"))


def test_a_repository_manifest_is_checked_too(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "manifest.json").write_text("{not json")
    out = tmp_path / "manifests"
    one_line_error(run_cli("deploy", "--repository", str(repo), "--out", str(out), "--pvc", "models", "-q"),
                   "manifest.json is not a valid clip-triton manifest", out)


# ------------------------------------------------------------------ item 12: numeric options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-aspect-ratio", "0.5", "--max-aspect-ratio must be a finite number >= 1 (0 turns the limit off)"),
        ("--max-aspect-ratio", "nan", "--max-aspect-ratio must be a finite number >= 1"),
        ("--max-aspect-ratio", "inf", "--max-aspect-ratio must be a finite number >= 1"),
        ("--max-pixels", "-1", "--max-pixels must be >= 0 (0 turns the limit off), got -1"),
        ("--max-chars", "-5", "--max-chars must be >= 0"),
        ("--queue-delay-us", str(2**64), "--queue-delay-us must be >= 0 and <= 2147483647"),
        ("--instances", "0", "--instances must be >= 1 and <= 2147483647"),
        ("--instances", str(2**40), "--instances must be >= 1 and <= 2147483647"),
        ("--max-batch", str(2**31), "--max-batch must be >= 1 and <= 2147483647"),
        ("--preprocess-threads", "-1", "--preprocess-threads must be >= 0"),
    ],
)
def test_repository_numeric_options(vitb32_export: Path, tmp_path: Path, option: str, value: str, message: str) -> None:
    one_line_error(repository(vitb32_export, tmp_path / "repo", option, value), message, tmp_path / "repo")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--seed", "-1"], "--seed must be >= 0"),
        (["export", "--opset", "0"], "--opset must be >= 7"),
        (["export", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["export", "--image-mean", "nan"], "--image-mean values must be finite numbers"),
        (["export", "--image-std", "inf,1,1"], "--image-std values must be finite numbers"),
        (["build", "--samples", "-1"], "--samples must be >= 0 and <= 10000"),
        (["build", "--min-cosine-fp16", "nan"], "--min-cosine-fp16 must be in (0, 1]"),
        (["build", "--seed", str(2**64)], "--seed must be >= 0"),
        (["build", "--opset", "99"], "--opset must be >= 7 and <="),
    ],
)
def test_export_and_build_numeric_options(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    command, *options = args
    result = run_cli(command, "--model", "ViT-B-32", "--random-weights", "--out", str(out), "-q", *options,
                     timeout=300)
    one_line_error(result, message, out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fp16", "--overflow-threshold", "nan"], "--overflow-threshold must be a finite number > 0"),
        (["fp16", "--min-cosine", "nan"], "--min-cosine must be in (0, 1]"),
        (["fp16", "--calibration-bytes", "inf"], "not a byte count"),
        (["engines", "--workspace-gib", "nan"], "--workspace-gib must be a finite number > 0"),
        (["engines", "--workspace-gib", "-2"], "--workspace-gib must be a finite number > 0"),
        (["engines", "--max-batch", str(2**31)], "--max-batch must be >= 1 and <= 2147483647"),
        (["parity", "--samples", "-3"], "--samples must be >= 0 and <= 10000"),
        (["parity", "--min-cosine-fp32", "inf"], "--min-cosine-fp32 must be in (0, 1]"),
    ],
)
def test_stage_numeric_options(vitb32_export: Path, tmp_path: Path, args: list[str], message: str) -> None:
    export = linked_copy(vitb32_export, tmp_path / "export")
    before = sorted(p.name for p in export.iterdir())
    command, *options = args
    one_line_error(run_cli(command, "--export", str(export), "-q", *options, timeout=300), message)
    assert sorted(p.name for p in export.iterdir()) == before


def test_deploy_counts_fit_int32(tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    result = run_cli("deploy", "--repository", str(tmp_path), "--out", str(out), "--pvc", "models",
                     "--max-replicas", str(2**31), "-q")
    one_line_error(result, "--max-replicas must be <= 2147483647", out)


# ------------------------------------------------------------------ item 14: checkpoints of another model


@pytest.mark.parametrize(
    ("weights", "model", "message"),
    [
        # Patch 16 vs 32: open_clip resizes the position embedding, the patch embedding cannot be.
        ("ViT-S-16", "ViT-S-32", "1 tensor differs in shape (checkpoint vs model): "
                                 "visual.conv1.weight [384, 3, 16, 16] vs [384, 3, 32, 32]"),
        # Another width (open_clip refuses before loading): the first five, how many, then the missing keys.
        ("ViT-S-16-alt", "ViT-S-16", "tensors differ in shape (checkpoint vs model): "
                                     "positional_embedding [77, 256] vs [77, 384], "),
    ],
)
def test_checkpoint_of_another_architecture_names_the_keys(
    tmp_path: Path, weights: str, model: str, message: str
) -> None:
    import open_clip
    import torch

    ckpt = tmp_path / f"{weights}.pt"
    torch.save(open_clip.create_model(weights, pretrained=None).state_dict(), ckpt)
    out = tmp_path / "out"
    line = one_line_error(run_cli("export", "--model", model, "--checkpoint", str(ckpt), "--out", str(out), "-q",
                                  timeout=300), message, out)
    assert f"does not match {model}" in line
    if "tensors differ" in line:
        assert line.count(" vs [") == 5 and "in all); missing keys: " in line
