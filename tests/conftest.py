"""Shared fixtures and hardware gates. gpu/tensorrt tests skip with a reason where absent."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under `pytest -n N` (make test) the workers already share the cores: each worker's torch (and the
# OpenMP pools of what it launches) gets its share of them rather than one thread per core, since
# oversubscribed threads spin and switch more than they compute. CLIP_TRITON_TEST_THREADS overrides.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = os.environ.get("CLIP_TRITON_TEST_THREADS") or str(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    import torch

    torch.set_num_threads(int(_share))


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from clip_triton.exporter.runtimes.tensorrt import find_tensorrt

    has_gpu = _cuda_available()
    trt_module, trt_missing = find_tensorrt()  # the stage's own check: type stubs alone do not count
    has_trt = trt_module is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch here)"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT: {trt_missing}"))
        if "tensorrt" in item.keywords and has_trt and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="tensorrt is installed but no CUDA GPU is visible"))
    # Longest files first (xdist hands a worker the next file when it is free): a long file started
    # last would leave the other worker idle at the end. Order within a file is kept.
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0.0))


# Seconds per file in a `make test` run on 2 cores (both workers busy), for the order above; a file
# missing here runs after the listed ones.
FILE_SECONDS = {
    "test_memory.py": 91, "test_hostile.py": 59, "test_coverage.py": 59, "test_build_inputs.py": 57,
    "test_export.py": 52, "test_hf_source.py": 51, "test_parity.py": 50, "test_quantize.py": 47,
    "test_build.py": 45, "test_server_e2e.py": 40, "test_surface.py": 37, "test_accuracy.py": 32,
    "test_faults.py": 31, "test_deploy.py": 29, "test_benchmarks.py": 24, "test_replicas.py": 21,
    "test_runtimes.py": 19, "test_python_deps.py": 17, "test_openvino.py": 16, "test_gateway.py": 15,
    "test_hf_tokenizer.py": 12, "test_tokenizer_cost.py": 12, "test_clients.py": 9, "test_precision.py": 7,
    "test_shapes.py": 7, "test_packaging.py": 6, "test_pixels.py": 6, "test_model_sources.py": 5,
    "test_client_inputs.py": 4,
}


SHAPES_MODEL = "ShapesCLIP-RN-T"


def _shared_artifact(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A session artifact built once for the whole run: under `pytest -n N` (`make test`), the first
    xdist worker to ask builds it while the others wait on a file lock, then all read the same folder.
    Tests never write into it (they take `linked_copy`s). The folder lives in the run's temporary
    root, which pytest rotates away (`tmp_path_retention_count`)."""
    from filelock import FileLock

    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    out = root / "shared" / name
    done = out.with_name(name + ".done")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out


def _shared_export(factory: pytest.TempPathFactory, name: str, model: str, **load_args: Any) -> Path:
    """`model` loaded with `load_args` and exported, once per test run (see _shared_artifact)."""

    def build(out: Path) -> None:
        from clip_triton.exporter.sources.open_clip import load_model
        from clip_triton.exporter.stages.export import export_model

        export_model(load_model(model, **load_args), out)

    return _shared_artifact(factory, name, build)


def _shared_fp16(factory: pytest.TempPathFactory, name: str, export: Path) -> Path:
    """`export` plus its FP16 graphs (the FP32 files hard-linked), once per test run."""

    def build(out: Path) -> None:
        from clip_triton.exporter.stages.fp16 import make_fp16
        from helpers import linked_copy

        linked_copy(export, out)
        make_fp16(out)

    return _shared_artifact(factory, name, build)


@pytest.fixture(scope="session")
def vitb32_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ViT-B-32 with seeded random weights, exported once per test run."""
    return _shared_export(tmp_path_factory, "vitb32", "ViT-B-32", random_weights=True)


@pytest.fixture(scope="session")
def fp16_export(vitb32_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ViT-B-32 export with its FP16 graphs, once per test run."""
    return _shared_fp16(tmp_path_factory, "vitb32-fp16", vitb32_export)


@pytest.fixture(scope="session")
def shapes_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained ShapesCLIP-RN-T (`--pretrained builtin`, 49 MB) exported once per test run: the cheap
    stand-in for tests whose promise holds for any model (serving, hardening, clients, gates)."""
    return _shared_export(tmp_path_factory, "shapes", SHAPES_MODEL, pretrained="builtin")


@pytest.fixture(scope="session")
def shapes_fp16_export(shapes_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ShapesCLIP-RN-T export with its FP16 graphs, once per test run."""
    return _shared_fp16(tmp_path_factory, "shapes-fp16", shapes_export)


def _served(export: Path, factory: pytest.TempPathFactory, name: str):
    """`export` as a `python`-runtime repository on the embedded tritonserver; yields (server, repo, export)."""
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    base = factory.mktemp(name)
    repo = write_repository(export, base / "repo", RepositoryOptions(runtime="python"))
    server = TritonServer(repo, log_path=base / "tritonserver.log")
    server.start(timeout=300)
    try:
        yield server, repo, export
    finally:
        server.stop()


@pytest.fixture(scope="session")
def served_shapes(shapes_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ShapesCLIP-RN-T export served (python runtime), one server per worker for the session. Yields
    (server, repo_path, export_dir), like `served_vitb32`."""
    yield from _served(shapes_export, tmp_path_factory, "served_shapes")


@pytest.fixture(scope="session")
def served_vitb32(vitb32_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ViT-B-32 export as a `python`-runtime repository, served by the embedded tritonserver.

    Yields (server, repo_path, export_dir); one server for the whole session, stopped at the end.
    """
    yield from _served(vitb32_export, tmp_path_factory, "served_vitb32")
