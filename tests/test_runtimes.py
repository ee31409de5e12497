"""The runtime registry (exporter/runtimes): its entries, the onnxruntime runtime's execution
providers, and every serving runtime written into a repository, with the onnxruntime FP16
repository served end to end on the embedded tritonserver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import ClipTritonError, Progress
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.runtimes.onnxruntime import OrtRunner, parse_providers, provider_missing
from clip_triton.exporter.stages.repository import RepositoryOptions, parse_config, write_repository
from helpers import linked_copy


def test_registry_entries_and_lookups() -> None:
    names = [r.name for r in runtimes.registered()]
    assert {"pytorch", "onnxruntime", "tensorrt", "python", "triton"} <= set(names)
    assert set(runtimes.serving_names()) == {"onnxruntime", "openvino", "tensorrt", "python"}
    with pytest.raises(ClipTritonError, match="--runtime must be one of"):
        runtimes.serving("tflite")
    with pytest.raises(ClipTritonError, match="unknown runtime"):
        runtimes.get("tflite")
    with pytest.raises(ValueError, match="registered twice"):
        runtimes.register(runtimes.get("python"))
    # Each serving runtime says where it runs and which artifact it serves.
    assert runtimes.serving("tensorrt").artifact("fp32") == ("plan", "fp16")  # a plan's precision is fixed
    assert runtimes.serving("tensorrt").tolerance("fp32") == "fp16"
    assert runtimes.serving("onnxruntime").artifact("fp16") == ("onnx", "fp16")
    assert runtimes.serving("python").devices == ("cpu",)
    assert runtimes.serving("tensorrt").embedded_reason and runtimes.serving("python").embedded_reason is None


def test_provider_lists() -> None:
    assert parse_providers("auto") is None and parse_providers(None) is None
    assert parse_providers("CPU, cuda,cpu") == ["cpu", "cuda"]
    with pytest.raises(ClipTritonError, match="unknown rocm"):
        parse_providers("cpu,rocm")
    assert provider_missing("cpu") is None


def test_runners_for_an_export(vitb32_export: Path, tmp_path: Path) -> None:
    """CPU runners run; a GPU provider asked for on a host without it is a skip with its reason."""
    manifest = load_manifest(vitb32_export)
    ctx = runtimes.RunContext(vitb32_export, manifest, providers=["cpu", "cuda"])
    offered = {item.name: item for r in runtimes.registered() for item in r.runners(ctx)}
    assert isinstance(offered["onnx-fp32"], OrtRunner)
    assert isinstance(offered["onnx-fp16"], runtimes.Skipped) and "clip-triton fp16" in offered["onnx-fp16"].reason
    assert isinstance(offered["tensorrt"], runtimes.Skipped) and offered["tensorrt"].reason
    if provider_missing("cuda") is not None:
        assert isinstance(offered["onnx-fp32-cuda"], runtimes.Skipped)
        assert offered["onnx-fp32-cuda"].reason == provider_missing("cuda")
    assert "pytorch" not in offered and "triton" not in offered  # the reference; no --url given
    bench = [item.name for r in runtimes.registered() for item in r.runners(
        runtimes.RunContext(vitb32_export, manifest, purpose="bench", loaded=object()))]
    assert {"pytorch", "pytorch-cuda"} <= set(bench)
    # An export without its FP32 graphs is an error, not a skip.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipTritonError, match="re-run `clip-triton export`"):
        runtimes.get("onnxruntime").runners(runtimes.RunContext(empty, manifest, providers=["cpu"]))


def test_ort_runner_matches_pytorch(vitb32_export: Path) -> None:
    from clip_triton.exporter.parity.metrics import cosine_rows
    from clip_triton.exporter.parity.samples import sample_inputs
    from clip_triton.exporter.runtimes.torch import TorchRunner
    from clip_triton.exporter.sources.open_clip import load_model

    loaded = load_model("ViT-B-32", random_weights=True)
    files = runtimes.artifact_paths(runtimes.RunContext(vitb32_export, load_manifest(vitb32_export)), "onnx", "fp32")
    ort, torch = OrtRunner("fp32", files, "cpu", threads=1), TorchRunner(loaded)
    for runner in (ort, torch):
        runner.open()
    try:
        for tower in ("image", "text"):
            x = sample_inputs(loaded, tower, 3)
            assert cosine_rows(torch(tower, x), ort(tower, x)).min() > 0.99999
    finally:
        ort.close()
        torch.close()
    assert ort.label == "ONNX Runtime FP32 (CPU)" and ort.name == "onnx-fp32"


@pytest.mark.parametrize("runtime", ["onnxruntime", "python"])
def test_every_serving_runtime_writes_its_encoders(fp16_export: Path, tmp_path: Path, runtime: str) -> None:
    serving = runtimes.serving(runtime)
    for precision in ("fp32", "fp16"):
        repo = write_repository(fp16_export, tmp_path / f"{runtime}-{precision}", RepositoryOptions(
            runtime=runtime, precision=precision))
        config = parse_config((repo / "clip_image_encoder" / "config.pbtxt").read_text())
        assert (repo / "clip_image_encoder" / "1" / serving.model_file).exists()
        optimiser_off = (config.optimization.graph.level == 2
                         or config.parameters["optimize"].string_value == "false")
        assert optimiser_off == (precision == "fp16"), (runtime, precision, config)


@pytest.mark.server
def test_onnxruntime_fp16_repository_serves_and_passes_parity(shapes_fp16_export: Path, tmp_path: Path) -> None:
    """The onnxruntime FP16 repository on the embedded server (its stub died at load before); the small shapes
    model, as the backend's configuration is the point, not the model."""
    from clip_triton.exporter.parity.report import PASS
    from clip_triton.exporter.parity.run import run_parity

    export = linked_copy(shapes_fp16_export, tmp_path / "export")
    repo = write_repository(export, tmp_path / "repo", RepositoryOptions(runtime="onnxruntime", precision="fp16"))
    config = parse_config((repo / "clip_text_encoder" / "config.pbtxt").read_text())
    assert config.backend == "onnxruntime" and config.optimization.graph.level == 2
    result = run_parity(export, repository=repo, samples=3, report=tmp_path / "parity.json", labelled_set=None,
                        providers=["cpu"], progress=Progress("t", quiet=True))
    stages = {s["stage"]: s for s in result["stages"]}
    assert result["passed"], result["failures"]
    assert stages["triton"]["status"] == PASS and stages["triton"]["precision"] == "fp16"
    assert stages["triton-preprocess"]["status"] == PASS and stages["onnx-fp16"]["status"] == PASS
    assert np.isfinite(stages["triton"]["towers"]["image"]["min_cosine"])
