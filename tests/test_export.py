"""The export stage: real open_clip models, real ONNX Runtime sessions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from helpers import run_cli, run_main


def test_manifest_records_what_later_stages_need(vitb32_export: Path) -> None:
    m = load_manifest(vitb32_export)
    assert m.model_name == "ViT-B-32" and m.random_weights and m.seed == 0
    assert m.text.input.dtype == "int32" and m.text.input.shape == [-1, 77]
    assert m.image.input.shape == [-1, 3, 224, 224]
    assert m.embed_dim == 512 and m.image.output.shape == [-1, 512]
    assert m.preprocess.resize_mode == "shortest" and m.preprocess.interpolation == "bicubic"
    assert m.tokenizer.kind == "clip" and m.tokenizer.eot_id == 49407
    assert set(m.files) == {"image_encoder.onnx", "text_encoder.onnx"}
    assert all(len(rec["sha256"]) == 64 for rec in m.files.values())
    assert m.export_parity["image"]["min_cosine"] >= 0.99999
    assert {"torch", "open_clip", "onnx", "onnxruntime"} <= set(m.versions)


def test_dynamic_batch_and_unit_norm(vitb32_export: Path) -> None:
    session = ort_session(vitb32_export / "image_encoder.onnx")
    for batch in (1, 3, 16):
        out = ort_embed(session, np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), np.float32))
        assert out.shape == (batch, 512)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_text_batch_of_very_different_lengths_matches_each_alone(vitb32_export: Path) -> None:
    """A dropped mask or wrong pooling shows as a row that changes with its neighbours."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    captions = ["a", "a photo of a dog " * 30, "", "über café ☕ 東京"]
    ids = tok(captions).numpy().astype(np.int32)
    session = ort_session(vitb32_export / "text_encoder.onnx")
    together = ort_embed(session, ids)
    for row in range(len(captions)):
        alone = ort_embed(session, ids[row : row + 1])
        np.testing.assert_allclose(alone[0], together[row], atol=2e-5)
    # Different captions must give different embeddings (pooling is not constant).
    assert np.abs(together[0] - together[1]).max() > 1e-3


def test_checkpoint_is_exported_not_a_fresh_random_model(tmp_path: Path) -> None:
    import open_clip
    import torch

    from clip_triton.exporter.parity.samples import sample_token_ids
    from clip_triton.exporter.runtimes.torch import torch_embed
    from clip_triton.exporter.sources import tower_modules
    from clip_triton.exporter.sources.open_clip import load_model

    # Any architecture keeps the promise; ViT-S-32 exports in a third of ViT-B-32's time.
    torch.manual_seed(1234)  # not the default seed: a fresh model would differ
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "export"
    result = run_cli("export", "--model", "ViT-S-32", "--checkpoint", str(ckpt), "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    m = load_manifest(out)
    assert m.checkpoint["sha256"] and not m.random_weights
    loaded = load_model("ViT-S-32", random_weights=True)  # the default-seed model, for contrast
    ids = sample_token_ids(loaded, 4)
    onnx_out = ort_embed(ort_session(out / "text_encoder.onnx"), ids)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    fresh = torch_embed(tower_modules(loaded)["text"], ids)
    cos_ckpt = np.sum(onnx_out * want, axis=1)
    cos_fresh = np.sum(onnx_out * fresh, axis=1)
    assert cos_ckpt.min() > 0.99999
    assert cos_fresh.max() < 0.99


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "ViT-B-33", "--random-weights"], "close matches: ViT-B-32"),
        (["--model", "ViT-B-32"], "exactly one of"),
        (["--model", "ViT-B-32", "--random-weights", "--pretrained", "openai"], "exactly one of"),
        (["--model", "ViT-B-32", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
        (["--model", "ViT-B-32", "--pretrained", "no-such-tag"], "no pretrained tag"),
        (["--model", "ViT-B-32", "--pretrained", "openai"], "could not fetch pretrained weights"),
        (["--model", "ViT-B-32", "--random-weights", "--image-resize-mode", "stretch"], "--image-resize-mode"),
        (["--model", "ViT-B-32", "--random-weights", "--image-mean", "a,b,c"], "--image-mean"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    tmp_path: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # In this process, through the console entry point (a subprocess each would re-import torch; the
    # subprocess path is covered by the other CLI tests here).
    out = tmp_path / "out"
    code, _, stderr = run_main(monkeypatch, capsys, "export", *args, "--out", str(out), "-q")
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_mismatched_checkpoint_names_the_missing_keys(tmp_path: Path) -> None:
    import open_clip
    import torch

    state = open_clip.create_model("ViT-S-32", pretrained=None).state_dict()
    state.pop("visual.proj")
    state.pop("text_projection")
    ckpt = tmp_path / "partial.pt"
    torch.save(state, ckpt)
    result = run_cli("export", "--model", "ViT-S-32", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "missing keys" in result.stderr and "visual.proj" in result.stderr and "text_projection" in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_dir_needs_force_and_unwritable_dir_fails(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", "--model", "ViT-B-32", "--random-weights", "--out", str(out))
    assert result.returncode == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"



def test_output_under_a_file_or_readonly_dir_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # An output under a regular file can never be written, even by root.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    code, _, stderr = run_main(monkeypatch, capsys, "export", "--model", "ViT-B-32", "--random-weights",
                               "--out", str(blocker / "x"))
    assert code == 2 and "is a file, not a folder" in stderr

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere; the permission bit check cannot be exercised")
        result = run_cli("export", "--model", "ViT-B-32", "--random-weights", "--out", str(locked / "x"))
        assert result.returncode == 2 and "not writable" in result.stderr
    finally:
        locked.chmod(0o700)


def test_siglip_preprocessing_overrides_are_recorded(tmp_path: Path) -> None:
    from clip_triton.exporter.sources.open_clip import load_model, preprocess_overrides

    loaded = load_model(
        "ViT-B-32",
        random_weights=True,
        preprocess=preprocess_overrides("0.5", "0.5,0.5,0.5", "bilinear", "squash"),
    )
    assert loaded.preprocess.mean == [0.5] * 3 and loaded.preprocess.std == [0.5] * 3
    assert loaded.preprocess.resize_mode == "squash" and loaded.preprocess.interpolation == "bilinear"


def test_export_failure_on_parity_leaves_no_folder(tmp_path: Path) -> None:
    from clip_triton.exporter.base.common import ParityError
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model

    out = tmp_path / "strict"
    with pytest.raises(ParityError, match="image tower"):
        # An impossible threshold forces the refusal path.
        export_model(load_model("ViT-S-16", random_weights=True), out, min_cosine=1.0000001)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_manifest_round_trips(vitb32_export: Path) -> None:
    m = load_manifest(vitb32_export)
    again = type(m).from_json(m.to_json())
    assert again == m
    assert json.loads(m.to_json())["tokenizer"]["context_length"] == 77


def test_preprocess_from_tag_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    """SigLIP trained with mean/std 0.5 and squash: a checkpoint export can take that from the tag."""
    from clip_triton.exporter.sources.open_clip import Progress, load_model, tag_preprocess

    plain = load_model("ViT-B-16-SigLIP", random_weights=True, progress=Progress("t", quiet=True))
    assert plain.preprocess.resize_mode == "shortest"  # open_clip's tag-less defaults
    assert "--preprocess-from webli" in capsys.readouterr().err  # ... and the user is told

    pre = tag_preprocess("ViT-B-16-SigLIP", "webli")
    tagged = load_model("ViT-B-16-SigLIP", random_weights=True, preprocess=pre)
    assert tagged.preprocess.mean == [0.5] * 3 and tagged.preprocess.std == [0.5] * 3
    assert tagged.preprocess.resize_mode == "squash"
    assert "--preprocess-from" not in capsys.readouterr().err
    with pytest.raises(ClipTritonError, match="no pretrained tag"):
        tag_preprocess("ViT-B-16-SigLIP", "openai")


def test_external_data_keeps_each_towers_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs above the protobuf limit get one `.data` sidecar each, and exporting the second
    tower must not touch the first one's (it once deleted it). The limit is lowered to 1 MB so a
    small model takes the large-model path."""
    import shutil

    import clip_triton.exporter.stages.export as onnx_export
    from clip_triton.exporter.parity.samples import sample_inputs
    from clip_triton.exporter.sources.open_clip import load_model

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1_000_000)
    out = tmp_path / "export"
    manifest = onnx_export.export_model(load_model("ViT-S-16", random_weights=True), out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "image_encoder.onnx", "image_encoder.onnx.data", "manifest.json", "text_encoder.onnx", "text_encoder.onnx.data"
    ]
    assert {"image_encoder.onnx.data", "text_encoder.onnx.data"} <= set(manifest.files)
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)  # sidecars are found relative to the graph
    for tower in ("image", "text"):
        session = ort_session(moved / f"{tower}_encoder.onnx")
        ids_or_pixels = sample_inputs(load_model("ViT-S-16", random_weights=True), tower, 2)
        assert ort_embed(session, ids_or_pixels).shape == (2, manifest.embed_dim)


@pytest.mark.parametrize("limit", [1_000_000, 10**12])
def test_place_graph_streams_a_many_file_export(
    vitb32_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """The TorchScript exporter writes a >2 GiB graph as one file per weight; placing it streams them
    into one `.data` sidecar (over the limit) or into the graph (under it), never loading the whole
    graph while the tower's PyTorch weights are still in memory. The weights come out unchanged."""
    import onnx
    from onnx import numpy_helper

    import clip_triton.exporter.stages.export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", limit)
    src = vitb32_export / "text_encoder.onnx"
    original = onnx.load(str(src))
    scratch = tmp_path / ".text_encoder-raw"
    scratch.mkdir()
    raw = scratch / "text_encoder.onnx"
    # Constants' values too, as torch writes them for a >2 GiB graph (once broke placing ViT-H-14's text).
    onnx.save_model(onnx.load(str(src)), str(raw), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=8, convert_attribute=True)
    assert any(a.t.data_location == onnx.TensorProto.EXTERNAL for n in onnx.load(str(raw), load_external_data=False)
               .graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    assert len(list(scratch.iterdir())) > 20
    placed = tmp_path / "text_encoder.onnx"
    onnx_export._place_graph(raw, placed)
    expected = ["text_encoder.onnx", "text_encoder.onnx.data"] if limit < 10**12 else ["text_encoder.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == expected
    got = {i.name: numpy_helper.to_array(i, str(tmp_path)) for i in onnx.load(str(placed)).graph.initializer}
    for init in original.graph.initializer:
        assert got[init.name].tobytes() == numpy_helper.to_array(init).tobytes(), init.name
    session = ort_session(placed)
    assert session.get_inputs()[0].name == "input_ids"
