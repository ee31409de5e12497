"""The `openvino` runtime (exporter/runtimes/openvino.py): registry entry, skip reasons, its runners
against PyTorch on the ShapesCLIP-RN-T export (builtin weights), the repository it writes for Triton's
OpenVINO backend, and that repository served end to end by the embedded server's stand-in
(model_repository/openvino_encoder) with parity and accuracy rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import Progress
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.runtimes import openvino
from clip_triton.exporter.stages.repository import RepositoryOptions, parse_config, write_repository
from helpers import linked_copy

SHAPES_MODEL = "ShapesCLIP-RN-T"
needs_openvino = pytest.mark.skipif(
    openvino.openvino_missing() is not None, reason=f"openvino runtime: {openvino.openvino_missing()}"
)


def _offered(export: Path, served_by: str = "openvino") -> dict[str, runtimes.Runner | runtimes.Skipped]:
    ctx = runtimes.RunContext(export, load_manifest(export), section={"runtime": served_by})
    return {item.name: item for item in runtimes.get("openvino").runners(ctx)}


def test_parity_runs_openvino_only_where_it_serves(shapes_export: Path) -> None:
    """Another served runtime (or none): every openvino runner is a skip saying why; the benchmark runs them."""
    others = _offered(shapes_export, served_by="python")
    assert all(isinstance(v, runtimes.Skipped) and "not the served runtime" in v.reason for v in others.values()) \
        or all(isinstance(v, runtimes.Skipped) for v in others.values())  # openvino missing: that reason
    bench = runtimes.RunContext(shapes_export, load_manifest(shapes_export), purpose="bench")
    assert any(not isinstance(v, runtimes.Skipped) for v in runtimes.get("openvino").runners(bench)) \
        or openvino.openvino_missing() is not None


@needs_openvino
def test_parity_checks_openvino_where_asked(shapes_export: Path, tmp_path: Path) -> None:
    """`parity --check-runtime openvino`: judged at each runner's class on an export no repository serves yet
    (what benchmarks/precision.py's gate column reads); an unknown runtime is one line, before any work."""
    from clip_triton.exporter.base.common import ClipTritonError
    from clip_triton.exporter.parity.report import PASS
    from clip_triton.exporter.parity.run import run_parity

    with pytest.raises(ClipTritonError, match="--check-runtime 'openvno' is not a runtime; known: .*openvino"):
        run_parity(shapes_export, check_runtimes=("openvno",), out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    result = run_parity(shapes_export, samples=2, labelled_set=None, providers=["cpu"], out=tmp_path / "r",
                        check_runtimes=("openvino",))
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["openvino-fp32"]["status"] == PASS and stages["openvino-fp32"]["precision"] == "fp32"
    assert stages["openvino-int8"]["status"] == "skip"  # no INT8 graphs in this export: skipped, saying why
    plain = run_parity(shapes_export, samples=2, labelled_set=None, providers=["cpu"], out=tmp_path / "p")
    assert "not the served runtime" in next(s for s in plain["stages"] if s["stage"] == "openvino-fp32")["reason"]


def test_registered_with_its_serving_spec() -> None:
    runtime = runtimes.get("openvino")
    assert "openvino" in runtimes.serving_names() and runtime.serving is runtimes.serving("openvino")
    serving = runtimes.serving("openvino")
    assert serving.devices == ("cpu",) and serving.artifact("fp32") == ("onnx", "fp32")
    assert serving.embedded_reason is None  # the embedded server has the stand-in backend
    # An FP32 graph may run in bf16 on the serving CPU (the plugin's default): judged as reduced precision.
    assert serving.tolerance("fp32") == openvino.tolerance_class("bf16") != "fp32"
    assert serving.tolerance("fp16") == "fp16"
    # Every execution is padded to max_batch_size by the real backend: a small default, an explicit value kept.
    manifest = None
    assert serving.max_batch(manifest, 128, explicit=False) == openvino.MAX_BATCH_DEFAULT  # type: ignore[arg-type]
    assert serving.max_batch(manifest, 64, explicit=True) == 64  # type: ignore[arg-type]


def test_skip_reasons(shapes_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offered = _offered(shapes_export)
    assert isinstance(offered["openvino-int8"], runtimes.Skipped)
    assert offered["openvino-int8"].reason in (openvino.NO_INT8, openvino.openvino_missing())
    monkeypatch.setattr(openvino, "openvino_missing", lambda: "openvino is not installed (test)")
    assert all(isinstance(v, runtimes.Skipped) and v.reason == "openvino is not installed (test)"
               for v in _offered(shapes_export).values())
    monkeypatch.setattr(openvino, "openvino_missing", lambda: None)
    monkeypatch.setattr(openvino, "cpu_capabilities", lambda: ["FP32", "INT8"])
    no_bf16 = _offered(shapes_export)
    assert isinstance(no_bf16["openvino-fp32"], openvino.OpenVinoRunner)
    skipped = no_bf16["openvino-bf16"]
    assert isinstance(skipped, runtimes.Skipped)
    assert "no native bf16" in skipped.reason and "FP32, INT8" in skipped.reason


@needs_openvino
def test_runners_match_pytorch(shapes_export: Path) -> None:
    """Each runner's embeddings against PyTorch FP32 at its own class's default threshold."""
    from clip_triton.exporter.parity.metrics import cosine_rows
    from clip_triton.exporter.parity.report import MIN_COSINE_FP16, MIN_COSINE_FP32
    from clip_triton.exporter.parity.samples import sample_inputs
    from clip_triton.exporter.runtimes.torch import TorchRunner
    from clip_triton.exporter.sources.open_clip import load_model

    loaded = load_model(SHAPES_MODEL, pretrained="builtin", progress=Progress("t", quiet=True))
    reference = TorchRunner(loaded)
    reference.open()
    floor = {"fp32": MIN_COSINE_FP32, "fp16": MIN_COSINE_FP16}
    ran = []
    for runner in _offered(shapes_export).values():
        if isinstance(runner, runtimes.Skipped):
            continue
        runner.open()
        try:
            for tower in ("image", "text"):
                x = sample_inputs(loaded, tower, 5)
                cos = cosine_rows(reference(tower, x), runner(tower, x))
                assert cos.min() >= floor.get(runner.precision, MIN_COSINE_FP16), (runner.name, tower, cos.min())
                # What OpenVINO computed in, read back from the compiled model.
                assert runner.computed_in[tower] == openvino.OV_PRECISION[runner.variant]
        finally:
            runner.close()
        ran.append(runner.name)
    reference.close()
    assert "openvino-fp32" in ran
    assert ("openvino-bf16" in ran) == (openvino.bf16_missing() is None)


def test_repository_for_tritons_openvino_backend(shapes_export: Path, tmp_path: Path) -> None:
    repo = write_repository(shapes_export, tmp_path / "repo", RepositoryOptions(runtime="openvino", instances=2))
    config = parse_config((repo / "clip_image_encoder" / "config.pbtxt").read_text())
    assert config.backend == "openvino" and not config.platform and config.default_model_filename == "model.onnx"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["PERFORMANCE_HINT"] == "LATENCY" and params["NUM_STREAMS"] == "2"
    assert params["ENABLE_BATCH_PADDING"] == "YES" and "HINT_BF16" not in params
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.max_batch_size == openvino.MAX_BATCH_DEFAULT
    assert (repo / "clip_image_encoder" / "1" / "model.onnx").is_file()
    assert not (repo / "clip_image_encoder" / "1" / "model.py").exists()  # the backend reads the graph itself
    assert load_manifest(repo).repository["runtime"] == "openvino"


@needs_openvino
@pytest.mark.server
def test_openvino_repository_serves_and_passes_parity(shapes_export: Path, tmp_path: Path) -> None:
    """`repository --runtime openvino` on the embedded server (the python-based stand-in backend):
    every stage, the live ones included, against PyTorch, with the shapes accuracy rows."""
    from clip_triton.exporter.parity.report import PASS
    from clip_triton.exporter.parity.run import run_parity

    export = linked_copy(shapes_export, tmp_path / "export")
    repo = write_repository(export, tmp_path / "repo", RepositoryOptions(runtime="openvino"))
    result = run_parity(export, repository=repo, samples=3, labelled_set="shapes", labelled_samples=24,
                        report=tmp_path / "parity.json", providers=["cpu"], progress=Progress("t", quiet=True))
    assert result["passed"], result["failures"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["openvino-fp32"]["status"] == PASS and stages["openvino-fp32"]["precision"] == "fp32"
    if openvino.bf16_missing() is None:
        assert stages["openvino-bf16"]["status"] == PASS
    for live in ("triton", "triton-pixels"):
        assert stages[live]["status"] == PASS
        assert stages[live]["precision"] == runtimes.serving("openvino").tolerance("fp32")
        assert np.isfinite(stages[live]["towers"]["image"]["min_cosine"])
        assert all(row["status"] == PASS for row in stages[live].get("accuracy", []) if row.get("min_agreement"))
