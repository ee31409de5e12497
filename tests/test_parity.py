"""The parity suite: real ONNX Runtime, real open_clip reference, a real tritonserver (marked `server`)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter.base.common import ClipTritonError, ParityError, Progress
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.parity import identity
from clip_triton.exporter.parity.report import PASS, SKIP, format_markdown, format_table, zero_shot_agreement
from clip_triton.exporter.parity.run import check_triton_preprocessing, compare_runner, run_parity
from clip_triton.exporter.parity.samples import (
    LABELS,
    TEMPLATES,
    SampleSet,
    builtin_images,
    builtin_texts,
    user_images,
    user_texts,
    zero_shot_prompts,
)
from clip_triton.exporter.runtimes import TowerBatch
from clip_triton.exporter.runtimes.triton import triton_runner
from helpers import linked_copy, run_cli, scratch_dir

SHAPES = "ShapesCLIP-RN-T"
CORRUPT_WEIGHT = "model.visual.transformer.resblocks.0.attn.out_proj.weight"


def scale_initializer(path: Path, name: str, factor: float = 1.1) -> None:
    """Scale one weight matrix of an ONNX graph by `factor` (the classic silent corruption)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name == name:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))
            break
    else:
        raise AssertionError(f"{name} is not an initializer of {path}")
    path.unlink()  # a hard-linked original must stay intact
    onnx.save(model, str(path))


def stage(result: dict, name: str) -> dict:
    return next(s for s in result["stages"] if s["stage"] == name)


# ------------------------------------------------------------------ samples (no model needed)


def test_builtin_images_cover_sizes_modes_and_formats() -> None:
    from PIL import Image

    samples = builtin_images(16)
    seen = set()
    sizes = []
    for sample in samples:
        with Image.open(io.BytesIO(sample.data)) as image:
            seen.add((image.format, image.mode))
            sizes.append(image.size)
    formats = {f for f, _ in seen}
    modes = {m for _, m in seen}
    assert formats == {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
    assert {"RGB", "L", "RGBA", "P", "CMYK"} <= modes
    assert (1, 1) in sizes and (1500, 300) in sizes
    assert any(w / h > 4 for w, h in sizes) and any(h / w > 2.5 for w, h in sizes)
    # Deterministic: the same bytes on every call, and a prefix for a smaller count.
    assert [s.data for s in builtin_images(3)] == [s.data for s in samples[:3]]
    assert len(builtin_images(20)) == 20 and len({s.name for s in builtin_images(20)}) == 20


def test_builtin_texts_cover_edge_cases() -> None:
    texts = builtin_texts(16)
    assert "" in texts
    assert any(len(t.split()) > 77 for t in texts)  # beyond the context length: truncated
    assert any(ord(c) > 0x3000 for t in texts for c in t)  # CJK
    assert any("&amp;" in t for t in texts)  # HTML entities: open_clip unescapes them
    assert len(builtin_texts(40)) == 40 and builtin_texts(5) == texts[:5]
    assert len(zero_shot_prompts()) % len(set(zero_shot_prompts())) == 0


def test_user_samples_are_validated(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(ClipTritonError, match="holds no images"):
        user_images(folder)
    (folder / "a.png").write_bytes(builtin_images(1)[0].data)  # a JPEG named .png: PIL sniffs it
    (folder / "notes.txt").write_text("not an image")
    assert [s.name for s in user_images(folder)] == ["a.png"]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ClipTritonError, match="broken.jpg is not a readable image"):
        user_images(folder)
    captions = tmp_path / "caps.txt"
    captions.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ClipTritonError, match="not UTF-8"):
        user_texts(captions)
    captions.write_text("a dog\n\n  \nein Hund 🐕\n", encoding="utf-8")
    assert user_texts(captions) == ["a dog", "ein Hund 🐕"]


def test_zero_shot_agreement_counts_flipped_top1() -> None:
    rng = np.random.default_rng(0)
    dim, labels, templates = 16, 3, 2
    samples = SampleSet(
        image_names=["a", "b", "c", "d"],
        images=TowerBatch(np.zeros((4, 1)), [b""] * 4),
        captions=["x", "y"],
        prompts=["p"] * (labels * templates),
        texts=TowerBatch(np.zeros((8, 1)), [""] * 8),
        labels=["l0", "l1", "l2"],
        templates=templates,
    )
    ref = {"image": rng.standard_normal((4, dim)), "text": rng.standard_normal((8, dim))}
    same = zero_shot_agreement(ref, ref["image"], ref["text"], samples)
    assert same == {"captions": 1.0, "labels": 1.0}
    flipped = ref["image"].copy()
    flipped[0] = -flipped[0]  # the opposite direction cannot keep the same best caption of two
    got = zero_shot_agreement(ref, flipped, ref["text"], samples)
    assert got["captions"] == 0.75


# ------------------------------------------------------------------ ViT-B-32 export, no server


def test_clean_export_passes_and_reports(vitb32_export: Path, tmp_path: Path) -> None:
    export = linked_copy(vitb32_export, tmp_path / "export")
    result = run_parity(export, samples=4, report=tmp_path / "r" / "parity.json")
    assert result["passed"] and not result["failures"]
    fp32 = stage(result, "onnx-fp32")
    assert fp32["status"] == PASS and fp32["threshold"] == 0.99999
    for tower in ("image", "text"):
        figures = fp32["towers"][tower]
        assert figures["min_cosine"] >= 0.99999 and figures["mean_cosine"] >= figures["min_cosine"]
        assert figures["max_abs_diff"] < 1e-4
        assert figures["zero_shot"] == {"captions": 1.0, "labels": 1.0}
    # 4 captions + the zero-shot prompts went through the text tower.
    assert fp32["towers"]["text"]["samples"] == 4 + len(zero_shot_prompts())
    # Stages whose artifacts or hardware are absent are skipped with a reason, not silently.
    assert stage(result, "tensorrt")["status"] == SKIP and stage(result, "tensorrt")["reason"]
    assert stage(result, "triton")["reason"] == "no --repository or --url given"
    on_disk = json.loads((tmp_path / "r" / "parity.json").read_text())
    assert on_disk["passed"] and on_disk["samples"]["images"][0].startswith("builtin-00")
    markdown = (tmp_path / "r" / "parity.md").read_text()
    assert "| onnx-fp32 | image | PASS |" in markdown
    assert on_disk["tested"]["export"] == str(export.resolve()) and on_disk["tested"]["urls"] == []
    assert load_manifest(export).parity is None  # the report is beside the export, not in its manifest
    assert re.search(r"\nonnx-fp32 +image +PASS ", format_table(result))  # columns sized by the widest row


def test_scaled_weight_matrix_fails_naming_stage_and_tower(vitb32_export: Path, tmp_path: Path) -> None:
    """One attention projection scaled by 10 %: the image tower of ONNX FP32 fails, text still passes."""
    export = linked_copy(vitb32_export, tmp_path / "export")
    scale_initializer(export / "image_encoder.onnx", CORRUPT_WEIGHT)
    proc = run_cli("parity", "--export", str(export), "--samples", "4", "--quiet", timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: parity failed: onnx-fp32 image tower: min cosine")
    assert "text tower" not in error and "Traceback" not in proc.stderr
    assert re.search(r"\nonnx-fp32 +image +FAIL ", proc.stdout)  # the table is printed before the exit
    assert not (export / "parity.json").exists()  # the default folder is beside the export: EXPORT-parity
    report = json.loads((tmp_path / "export-parity" / "parity.json").read_text())
    fp32 = stage(report, "onnx-fp32")
    assert fp32["towers"]["image"]["status"] == "fail" and fp32["towers"]["text"]["status"] == "pass"
    assert 0.99 < fp32["towers"]["image"]["min_cosine"] < 0.99999
    assert (tmp_path / "export-parity" / "parity.md").is_file()


def test_bad_arguments_are_one_line_errors(vitb32_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipTritonError, match="inside the export folder: parity writes its reports beside"):
        run_parity(vitb32_export, report=vitb32_export / "parity.json")
    with pytest.raises(ClipTritonError, match="--markdown .* inside the export folder"):
        run_parity(vitb32_export, out=tmp_path, markdown=vitb32_export / "sub" / "parity.md")
    with pytest.raises(ClipTritonError, match="min-cosine-fp16 must be in"):
        run_parity(vitb32_export, min_cosine_fp16=1.5)
    with pytest.raises(ClipTritonError, match="has no manifest.json"):
        run_parity(tmp_path)
    with pytest.raises(ClipTritonError, match="is not a folder"):
        run_parity(vitb32_export, repository=tmp_path / "missing")


def test_unreachable_url_is_an_error_of_the_triton_stage() -> None:
    """A dead server fails the triton stage (status error, with the reason), never a crash or a pass."""
    names = ["a", "b"]
    samples = SampleSet(
        image_names=names,
        images=TowerBatch(np.zeros((2, 3, 4, 4), np.float32), [b"x", b"y"]),
        captions=["c"],
        prompts=["p"] * (len(LABELS) * len(TEMPLATES)),
        texts=TowerBatch(np.zeros((1 + len(LABELS) * len(TEMPLATES), 77), np.int32), ["c"] * 37),
        labels=LABELS,
        templates=len(TEMPLATES),
    )
    ref = {"image": np.ones((2, 8), np.float32), "text": np.ones((samples.texts.tensor.shape[0], 8), np.float32)}
    runner = triton_runner("127.0.0.1:9", {"runtime": "python", "precision": "fp32", "prefix": "clip"})
    result = compare_runner(runner, ref, samples, {"fp32": 0.99999, "fp16": 0.999}, Progress("t", quiet=True))
    assert result["status"] == "error" and result["stage"] == "triton" and result["reason"]
    checks = check_triton_preprocessing(runner, samples, Progress("t", quiet=True))
    assert [c["status"] for c in checks] == ["error", "error"]
    report = {
        "model": "m", "created": "now", "seconds": 0, "passed": False, "failures": ["triton: down"],
        "thresholds": {"fp32": 0.99999, "fp16": 0.999, "pixels_max_abs_diff": 1e-6},
        "samples": {"images": names, "captions": ["c"], "prompts": 36}, "stages": [result, *checks],
    }
    assert "| triton | - | ERROR |" in format_markdown(report)


# ------------------------------------------------------------------ a live tritonserver


@pytest.mark.server
def test_live_triton_passes_then_catches_a_wrong_normalisation(served_shapes, tmp_path: Path) -> None:
    """Python-runtime repository on the embedded server (the shared ShapesCLIP one): pixels and ids equal,
    embeddings at FP32 parity. Then a copy of the export gets a wrong mean in its manifest: the server
    (built with the right one) no longer matches the reference preprocessing, and the preprocess stage
    is named."""
    server, _, served_export = served_shapes
    export = linked_copy(served_export, tmp_path / "export")
    result = run_parity(export, url=server.grpc_url, samples=6, labelled_set=None)  # (accuracy: test_accuracy)
    assert result["passed"], result["failures"]
    pre = stage(result, "triton-preprocess")
    assert pre["status"] == PASS and pre["max_abs_diff"] < 1e-6
    assert stage(result, "triton-tokenize")["status"] == PASS
    triton = stage(result, "triton")
    assert triton["threshold"] == 0.99999  # python runtime, fp32: the FP32 threshold
    assert triton["towers"]["image"]["min_cosine"] >= 0.99999
    assert triton["towers"]["text"]["min_cosine"] >= 0.99999
    # The pixels entry point, fed by ClipClient(preprocess="client"): the same embeddings.
    pixels = stage(result, "triton-pixels")
    assert pixels["status"] == PASS and pixels["towers"]["image"]["min_cosine"] >= 0.99999

    manifest_path = export / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["preprocess"]["mean"][0] = 0.5  # the right value is 0.48145466
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ParityError, match="triton-preprocess image: pixels differ") as info:
        run_parity(export, url=server.grpc_url, samples=6, labelled_set=None)
    assert "triton image tower" in str(info.value)
    report = json.loads((tmp_path / "export-parity" / "parity.json").read_text())
    assert stage(report, "triton-preprocess")["max_abs_diff"] > 1e-3
    assert stage(report, "triton-tokenize")["status"] == PASS  # only the image side drifted


@pytest.mark.parametrize(
    ("section", "want"),
    [
        ({"runtime": "python", "precision": "fp32"}, "fp32"),
        ({"runtime": "onnxruntime", "precision": "fp32"}, "fp32"),
        ({"runtime": "python", "precision": "fp16"}, "fp16"),
        ({"runtime": "tensorrt", "precision": "fp32"}, "fp16"),
        (None, "fp32"),  # unknown: the stricter threshold, never a silent pass
    ],
)
def test_triton_threshold_follows_runtime_and_precision(section: dict | None, want: str) -> None:
    assert triton_runner("127.0.0.1:1", section).precision == want


def test_stage_gate_checks_every_tower_then_names_each_failure() -> None:
    """The one gate export, fp16 and engines share (exporter/parity/gate.py): per-row cosine at each
    verification batch, the worst figures per tower, and one ParityError naming the stage and every
    tower below the threshold, after all towers ran (so a next stage is one call)."""
    from clip_triton.exporter.parity.gate import VERIFY_BATCHES, compare_references, gate_towers

    rng = np.random.default_rng(0)
    refs = {b: (np.zeros((b, 4), np.float32), rng.standard_normal((b, 4)).astype(np.float32)) for b in VERIFY_BATCHES}
    by_input = {id(inputs): ref for inputs, ref in refs.values()}
    outputs: dict[int, np.ndarray] = {}
    same = compare_references(refs, lambda x: by_input[id(x)], finite=True, outputs=outputs)
    assert same["min_cosine"] == pytest.approx(1.0) and same["finite"] is True
    assert set(same["batches"]) == {f"batch_{b}" for b in VERIFY_BATCHES} and set(outputs) == set(VERIFY_BATCHES)
    flipped = compare_references(refs, lambda x: -by_input[id(x)])
    assert flipped["min_cosine"] == pytest.approx(-1.0) and "finite" not in flipped

    ran: list[str] = []

    def check(tower: str) -> dict:
        ran.append(tower)
        return {"min_cosine": 0.5 if tower == "text" else 1.0, "extra": tower}

    gate = {"stage": "INT8", "compared_with": "x vs PyTorch FP32", "progress": Progress("t", quiet=True)}
    with pytest.raises(ParityError) as info:
        gate_towers(check, threshold=0.9, order=("text", "image"), refused="nothing written", **gate)
    assert ran == ["text", "image"]  # every tower checked before the refusal
    assert str(info.value) == (
        "INT8 parity failed: text tower min cosine 0.500000 < 0.9 (x vs PyTorch FP32); nothing written"
    )
    with pytest.raises(ParityError, match=r"^INT8 parity failed: image tower min cosine 0\.000000, text tower"):
        gate_towers(lambda t: {"min_cosine": 0.0 if t == "image" else float("nan")}, threshold=0.9, **gate)
    records = gate_towers(check, threshold=0.4, order=("text", "image"), **gate)
    assert list(records) == ["image", "text"] and records["text"]["extra"] == "text"  # the manifest's order


# ------------------------------------------------------------------ what parity tests: identity and reports


def _served(where: str, image: str | None, text: str | None, **kw: object) -> identity.Served:
    checksums = {t: v for t, v in (("image", image), ("text", text)) if v}
    return identity.Served(where=where, model_name="M", checksums=checksums, **kw)  # type: ignore[arg-type]


def test_identity_verdicts_cover_fp16_unknown_and_mixed_replicas(vitb32_export: Path) -> None:
    """One export, one pair of checksums (its FP32 graphs'): whatever a repository serves of it matches; no
    published checksums is unknown (carry on); any server or replica with others is a different model."""
    manifest = load_manifest(vitb32_export)
    want = identity.expected_checksums(manifest)
    assert set(want) == {"image", "text"} and all(len(v) == 64 for v in want.values())
    same = _served("server a:1", want["image"], want["text"])
    assert identity.judge(same, want).status == identity.MATCH
    assert identity.judge(_served("server b:1", None, None), want).status == identity.UNKNOWN
    assert identity.judge(_served("server c:1", None, None, error="refused"), want).status == identity.UNREACHABLE
    identity.check(manifest, [same, _served("server b:1", None, None)])  # unknown: no error
    other = _served("server d:1", want["image"], "f" * 64)  # one tower differs: another model
    with pytest.raises(identity.DifferentModelError) as info:
        identity.check(manifest, [same, other])
    line = str(info.value)
    assert line.startswith("different model: the server d:1 serves M (image encoder sha256 ")
    assert "text encoder sha256 ffffffffffff" in line and "mixed replicas: server a:1 serve" in line
    assert "\n" not in line and "cosine" not in line


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory):
    """Two tiny models (ShapesCLIP-RN-T, random weights, seeds 0 and 1). B has its FP16 graphs, an FP16
    python-runtime repository and a live embedded server for it. Yields (A, B, B's manifest bytes before
    `repository` ran, repo B, server B)."""
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.fp16 import make_fp16
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    with scratch_dir(tmp_path_factory, "two_models") as base:
        export_model(load_model(SHAPES, random_weights=True, seed=0), base / "a")
        export_model(load_model(SHAPES, random_weights=True, seed=1), base / "b")
        make_fp16(base / "b")
        before = (base / "b" / "manifest.json").read_bytes()
        repo = write_repository(base / "b", base / "repo-b", RepositoryOptions(runtime="python", precision="fp16"))
        with TritonServer(repo, log_path=base / "tritonserver.log") as server:
            yield base / "a", base / "b", before, repo, server


@pytest.mark.server
def test_parity_against_another_model_says_different_model(two_models, tmp_path: Path) -> None:
    """Export A against B's server (or B's repository folder): one line naming both models' checksums, exit 2,
    before any comparison (no report, no drift figures)."""
    export_a, export_b, _, repo_b, server = two_models
    proc = run_cli("parity", "--export", str(export_a), "--url", server.grpc_url, "--samples", "2",
                   "--out", str(tmp_path / "out"), "--quiet", timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    a_image = identity.expected_checksums(load_manifest(export_a))["image"]
    b_image = identity.expected_checksums(load_manifest(export_b))["image"]
    assert error.startswith(f"error: different model: the server {server.grpc_url} serves ShapesCLIP-RN-T "
                            f"(image encoder sha256 {b_image[:12]}")
    assert f"not this export's ShapesCLIP-RN-T (image encoder sha256 {a_image[:12]}" in error
    assert error.endswith("nothing was compared") and "cosine" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(identity.DifferentModelError, match=f"the repository {repo_b} serves ShapesCLIP-RN-T"):
        run_parity(export_a, repository=repo_b, samples=2, out=tmp_path / "out")


@pytest.mark.server
def test_report_names_what_it_tested_and_the_export_stays_untouched(two_models, tmp_path: Path) -> None:
    """B against its own FP16 repository, served: the same model (the repository publishes the FP32 graphs'
    checksums whatever it serves), judged at the FP16 threshold. The reports name the URL, the repository,
    the export and the weights; `repository` and `parity` leave the export's manifest byte-identical."""
    _, export_b, before, repo_b, server = two_models
    files = sorted(p.name for p in export_b.iterdir())
    result = run_parity(export_b, repository=repo_b, url=server.grpc_url, samples=2, out=tmp_path / "out")
    assert result["passed"], result["failures"]
    assert stage(result, "triton")["threshold"] == 0.999  # the repository's record: python, fp16
    tested = result["tested"]
    assert tested["export"] == str(export_b.resolve()) and tested["repository"] == str(repo_b.resolve())
    assert tested["urls"] == [server.grpc_url]
    assert tested["weights"] == {"model": SHAPES, "random_weights": True, "seed": 1}
    assert [s["status"] for s in tested["served"]] == ["match", "match"]
    assert tested["served"][1]["url"] == server.grpc_url and tested["served"][1]["model_name"] == SHAPES
    markdown = (tmp_path / "out" / "parity.md").read_text()
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["tested"] == tested
    for text in (f"- export: `{export_b.resolve()}`", f"- repository: `{repo_b.resolve()}`",
                 f"- server: `{server.grpc_url}`", f"- weights: `{SHAPES}`, RANDOM weights (seed 1)",
                 f"- server {server.grpc_url} ({SHAPES}): serves this export (encoder checksums match)"):
        assert text in markdown, text
    # --url alone: the server publishes its runtime and precision, so the live stages keep the FP16 class.
    alone = run_parity(export_b, url=server.grpc_url, samples=2, out=tmp_path / "alone")
    assert alone["passed"] and stage(alone, "triton")["threshold"] == 0.999
    # The default report folder is beside the export; nothing was added to it or changed in it.
    run_parity(export_b, samples=2)
    assert (export_b.parent / "b-parity" / "parity.json").is_file()
    assert (export_b / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in export_b.iterdir()) == files
