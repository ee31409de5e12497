"""`clip-triton build` (the CI entry point) and `clip-triton demo`: real stages end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_triton.exporter.base.common import ClipTritonError, MissingDependencyError
from clip_triton.exporter.build import BuildOptions, reusable_build, run_build
from clip_triton.exporter.runtimes.tensorrt import require_runtime
from helpers import run_cli


def _has_engines() -> bool:
    try:
        require_runtime()
    except MissingDependencyError:
        return False
    return True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": "tflite"}, "--runtime must be one of"),
        ({"precision": "bf16"}, "--precision must be fp32, fp16 or int8"),
        ({"skip_engines": True, "require_engines": True}, "contradict"),
        ({"skip_engines": True, "runtime": "tensorrt"}, "needs engines"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path: Path, changes: dict, message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ClipTritonError, match=message):
        run_build(BuildOptions(model="ViT-B-32", out=out, random_weights=True, **changes), quiet=True)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ClipTritonError, match="pass --force"):
        run_build(BuildOptions(model="ViT-B-32", out=tmp_path, random_weights=True), quiet=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--triton-release", "99.99"], "error: unknown Triton release '99.99'; known: 24.08, "),
        (["--min-driver", "535"], "error: no Triton release in exporter/base/releases.py is known to run on NVIDIA "
                                  "driver R535"),
        (["--triton-release", "25.08", "--min-driver", "570"],
         "error: --triton-release 25.08 needs NVIDIA driver R580"),
    ],
)
def test_bad_release_or_driver_is_one_line_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = run_cli("build", "--model", "ViT-B-32", "--random-weights", "--out", str(out), *args, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert not out.exists()


def test_build_passes_repository_options_and_records_the_release(tmp_path: Path, monkeypatch) -> None:
    """`build --triton-release X` (and every other repository option) reaches the repository stage: X is what
    the repository records and its README names. Parity is stubbed: the end-to-end test runs it."""
    from clip_triton.exporter import build

    monkeypatch.setattr(build, "run_parity", lambda *a, **k: {"passed": True})
    out = tmp_path / "b"
    opts = BuildOptions(model="ShapesCLIP-RN-T", pretrained="builtin", out=out, runtime="python", skip_engines=True,
                        triton_release="24.10", python_deps=False, prefix="shp", max_chars=77)
    build.run_build(opts, quiet=True)
    repo = out / "repository"
    record = json.loads((repo / "manifest.json").read_text())["repository"]
    assert record["triton_release"] == "24.10" and record["triton_release_reason"] == "--triton-release"
    assert record["triton_min_driver"] == 560 and record["prefix"] == "shp" and record["limits"]["max_chars"] == 77
    readme = (repo / "README.md").read_text()
    assert "tritonserver:24.10-py3" in readme and "--gpus" not in readme  # python runtime: CPU instances
    assert json.loads((out / "build.json").read_text())["stages"]["repository"]["status"] == "pass"


@pytest.mark.skipif(_has_engines(), reason="TensorRT and a GPU are present: engines can be built here")
def test_require_engines_without_tensorrt_exits_3_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("build", "--model", "ViT-B-32", "--random-weights", "--out", str(out), "--require-engines",
                   timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: build needs engines (--require-engines): engines need")
    assert not out.exists()  # failed before the export: nothing half-built


@pytest.mark.server
def test_build_end_to_end_then_demo_reuses_it(tmp_path: Path) -> None:
    """The shipped ShapesCLIP-RN-T, python runtime: export, fp16, engines (notice), repository, parity
    (accuracy rows included) through a live embedded tritonserver; exit 0. Then `demo` reuses the build,
    queries it, and the trained model ranks the true caption first, served as PyTorch does."""
    out = tmp_path / "build"
    model = "ShapesCLIP-RN-T"
    proc = run_cli("build", "--model", model, "--pretrained", "builtin", "--out", str(out),
                   "--runtime", "python", "--samples", "4", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "build passed" in proc.stdout
    assert "initialized randomly" not in proc.stderr  # the weights load after open_clip builds the model
    for path in ("export/manifest.json", "export/image_encoder.fp16.onnx", "repository/clip_image/config.pbtxt",
                 "parity.json", "parity.md", "build.json"):
        assert (out / path).is_file(), path
    if not _has_engines():
        assert "no TensorRT engines built" in proc.stderr
    report = json.loads((out / "parity.json").read_text())
    statuses = {s["stage"]: s["status"] for s in report["stages"]}
    assert report["passed"]
    assert statuses["onnx-fp32"] == statuses["onnx-fp16"] == "pass"
    assert statuses["triton-preprocess"] == statuses["triton-tokenize"] == statuses["triton"] == "pass"
    assert report["labelled"]["images"] == 120  # auto: the builtin model brings its held-out set
    record = json.loads((out / "build.json").read_text())
    assert record["passed"] and record["runtime"] == "python"
    assert list(record["stages"]) == ["export", "fp16", "engines", "repository", "parity"]
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["parity"] is None and manifest["repository"] is None  # reports beside the export, not in it
    assert json.loads((out / "repository" / "manifest.json").read_text())["repository"]["runtime"] == "python"
    assert reusable_build(out, model) and not reusable_build(out, "ViT-B-16")

    demo = run_cli("demo", "--model", model, "--out", str(out), timeout=300)
    assert demo.returncode == 0, demo.stderr[-4000:]
    assert "reusing the build" in demo.stderr
    lines = demo.stdout.splitlines()
    image = Path(next(x for x in lines if x.startswith("held-out image: ")).split()[2])
    assert image.is_file() and image.parent == out and image.read_bytes().startswith(b"\x89PNG")
    line = next(x for x in lines if x.startswith("true caption: "))
    assert -1.0 <= float(line.rsplit(":", 1)[1].strip(" )")) <= 1.0
    ranked = [x for x in lines if x.startswith("  ") and x.strip()[:1].isdigit() and "%" in x]
    assert len(ranked) >= 6 and sum("<- true caption" in x for x in ranked) == 1
    assert "<- true caption" in ranked[0]  # the trained model ranks the held-out image's caption first
    assert all(x.count("%") == 2 for x in ranked)  # served and PyTorch probabilities side by side
    assert "triton             image   PASS" in demo.stdout  # the parity figures table
    assert "builtin weights" in demo.stdout and "random weights" not in demo.stdout


def test_demo_says_when_its_weights_are_random() -> None:
    """The words `demo` prints for random weights (the end-to-end test above serves the trained model)."""
    from clip_triton.exporter.build import DEMO_MODEL, demo_weights_notes

    assert demo_weights_notes(DEMO_MODEL, False) == ("builtin weights", None)
    note, closing = demo_weights_notes("ViT-B-32", True)
    assert note == "random weights: the values mean nothing"
    assert closing == (f"(random weights: rankings and accuracy mean nothing; `clip-triton demo --model {DEMO_MODEL}` "
                       "serves the trained model)")
    assert "ships no weights" in demo_weights_notes(DEMO_MODEL, True)[1]
