"""The engines stage. Without TensorRT/GPU: the exit-3 message and the profile rules; with them: real plans."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.stages.engines import BatchProfile, parity_batches, resolve_profile
from helpers import linked_copy, run_cli


def _has_engine_runtime() -> bool:
    from clip_triton.exporter.runtimes.tensorrt import find_gpu, find_tensorrt

    return find_tensorrt()[0] is not None and find_gpu() is not None


def test_profile_validation() -> None:
    assert resolve_profile(1, None, None, 128) == BatchProfile(1, 32, 128)
    assert resolve_profile(1, None, 16, 128) == BatchProfile(1, 16, 16)  # opt follows a small max
    assert resolve_profile(2, 4, 8, 128) == BatchProfile(2, 4, 8)
    assert resolve_profile(4, 4, 4, 128) == BatchProfile(4, 4, 4)
    for bad in [(0, 1, 8), (4, 2, 8), (1, 16, 8), (9, None, 8), (-1, None, None)]:
        with pytest.raises(ClipTritonError, match="min|profile"):
            resolve_profile(bad[0], bad[1], bad[2], 128)
    assert parity_batches(BatchProfile(1, 32, 128)) == [1, 8]
    assert parity_batches(BatchProfile(2, 2, 4)) == [2, 4]
    assert parity_batches(BatchProfile(16, 32, 64)) == [16]


@pytest.mark.skipif(_has_engine_runtime(), reason="TensorRT and a GPU are present: the build test covers this")
def test_missing_tensorrt_or_gpu_exits_3_with_one_line(vitb32_export: Path) -> None:
    result = run_cli("engines", "--export", str(vitb32_export))
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("error: engines need")
    assert "TensorRT" in line or "GPU" in line
    assert "nvcr.io/nvidia/tritonserver" in line or "GPU" in line
    assert not list(vitb32_export.glob("*.plan"))


def test_bad_profile_is_exit_2_before_any_dependency_check(vitb32_export: Path) -> None:
    result = run_cli("engines", "--export", str(vitb32_export), "--min-batch", "8", "--opt-batch", "4")
    assert result.returncode == 2, result.stderr
    assert "1 <= min <= opt <= max" in result.stderr
    result = run_cli("engines", "--export", str(vitb32_export), "--builder-level", "7")
    assert result.returncode == 2 and "--builder-level" in result.stderr


def test_engines_module_imports_without_tensorrt() -> None:
    # `import clip_triton.exporter.stages.engines` must not import tensorrt (lazy): the CLI's --help works everywhere.
    code = "import sys, clip_triton.exporter.stages.engines; print('tensorrt_bindings' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_vitb32_engines_and_parity(vitb32_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    linked_copy(vitb32_export, out)
    assert run_cli("fp16", "--export", str(out), "-q").returncode == 0
    cache = tmp_path / "timing.cache"
    result = run_cli(
        "engines", "--export", str(out), "--min-batch", "1", "--opt-batch", "4", "--max-batch", "8",
        "--timing-cache", str(cache), "--builder-level", "1",
    )
    assert result.returncode == 0, result.stderr
    assert "building image_encoder.plan" in result.stderr  # progress lines
    engines = load_manifest(out).engines
    assert engines is not None
    assert engines["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert engines["tensorrt"] and engines["gpu"] and engines["compute_capability"]
    for tower in ("image", "text"):
        assert engines[tower]["min_cosine"] >= 0.999
        assert (out / f"{tower}_encoder.plan").is_file()
    assert set(engines["files"]) == {"image_encoder.plan", "text_encoder.plan"}
    assert cache.is_file() and cache.stat().st_size > 0
    # A second build reuses the timing cache.
    result = run_cli("engines", "--export", str(out), "--max-batch", "8", "--opt-batch", "4",
                     "--timing-cache", str(cache), "--builder-level", "1", "-q")
    assert result.returncode == 0, result.stderr
