"""Encoder throughput and latency by batch size, per runtime and tower.

Runtimes (each an "inputs -> embeddings" callable, like parity.py's runners):
  torch_fp32   PyTorch eager FP32 on CPU (the open_clip module the graphs were exported from)
  ort_fp32     ONNX Runtime CPU, the FP32 graph, graph optimiser on
  ort_fp16     ONNX Runtime CPU, the FP16 graph of `precision.py`, optimiser off (ORT 1.32's CPU
               optimiser crashes on FP16 ViT graphs; ARCHITECTURE.md)
  trt_fp16     TensorRT plan of the FP16 graph, when TensorRT and a CUDA GPU are present
  torch_cuda_fp32  PyTorch eager FP32 on the GPU, when one is present (the fair baseline for TensorRT)

Each cell (model, tower, runtime, batch): warm-up calls, then timed calls until a time budget
is spent (at least `min_iters`); median and p90 latency, throughput = batch / median latency,
the speed-up against torch_fp32 at the same batch in the same run, and the min cosine of the
runtime's embeddings against torch_fp32's (a fast wrong runtime must not look good).
A cell whose estimated cost exceeds `max_cell_s` is skipped and the skip reported.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Settings, latency_stats, time_calls
from exporter.common import Progress

RUNTIMES = {
    "torch_fp32": "PyTorch eager FP32 (CPU)",
    "ort_fp32": "ONNX Runtime FP32 (CPU)",
    "ort_fp16": "ONNX Runtime FP16 graph (CPU, optimiser off)",
    "trt_fp16": "TensorRT FP16 (GPU)",
    "torch_cuda_fp32": "PyTorch eager FP32 (GPU)",
}
BASELINE = "torch_fp32"


class Skip(Exception):
    """A runtime that cannot run here; the message is the reason recorded in the results."""


def prepare_model(name: str, work: Path, max_batch: int, progress: Progress) -> tuple[Any, Path, dict[str, Any]]:
    """Random-weight model -> export (FP32 graphs) -> FP16 graphs (-> TensorRT plans where possible)."""
    from exporter.loading import load_model
    from exporter.onnx_export import export_model
    from exporter.precision import make_fp16

    info: dict[str, Any] = {}
    export_dir = work / f"export-{name}"
    start = time.perf_counter()
    with progress.step(f"{name}: load (random weights) and export both towers"):
        loaded = load_model(name, random_weights=True, progress=Progress("load", quiet=True))
        export_model(loaded, export_dir, max_batch=max(max_batch, 1), force=True)
    info["export_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    try:
        with progress.step(f"{name}: FP16 graphs (precision.py)"):
            make_fp16(export_dir)
        info["fp16"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded; the FP16 runtime is then skipped with this reason
        info["fp16"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        progress.warn(f"{name}: FP16 conversion failed, ort_fp16 skipped: {info['fp16']}")
    info["fp16_seconds"] = round(time.perf_counter() - start, 1)
    info["tensorrt"] = _maybe_build_engines(export_dir, max_batch, progress)
    return loaded, export_dir, info


def _maybe_build_engines(export_dir: Path, max_batch: int, progress: Progress) -> str:
    from exporter.engines import _find_gpu, build_engines, find_tensorrt

    module, why = find_tensorrt()
    if module is None:
        return f"skipped: {why}"
    if _find_gpu() is None:
        return "skipped: tensorrt is installed but no CUDA GPU is visible"
    try:
        with progress.step("TensorRT engines"):
            build_engines(export_dir, max_batch=max_batch)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported as the trt_fp16 skip reason
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _ort_session(path: Path, threads: int, optimize: bool) -> Any:
    """exporter.onnx_export.ort_session plus an explicit intra-op thread count (recorded)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_runner(
    key: str, loaded: Any, export_dir: Path, tower: str, info: dict[str, Any], threads: int
) -> Callable[[np.ndarray], np.ndarray]:
    """The callable for one runtime and tower, or Skip(reason)."""
    from exporter.manifest import IMAGE_FP16_ONNX, IMAGE_ONNX, TEXT_FP16_ONNX, TEXT_ONNX

    fp32 = export_dir / (IMAGE_ONNX if tower == "image" else TEXT_ONNX)
    fp16 = export_dir / (IMAGE_FP16_ONNX if tower == "image" else TEXT_FP16_ONNX)
    if key == "torch_fp32":
        import torch

        from exporter.onnx_export import tower_modules

        module = tower_modules(loaded)[tower]

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run_torch
    if key in ("ort_fp32", "ort_fp16"):
        if key == "ort_fp16" and info.get("fp16") != "ok":
            raise Skip(f"no FP16 graph: {info.get('fp16')}")
        session = _ort_session(fp32 if key == "ort_fp32" else fp16, threads, optimize=key == "ort_fp32")
        name = session.get_inputs()[0].name

        def run_ort(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: x})[0], dtype=np.float32)

        return run_ort
    if key == "trt_fp16":
        status = str(info.get("tensorrt"))
        if status != "ok":
            raise Skip(status.removeprefix("skipped: "))
        from exporter.engines import EngineRunner, require_runtime
        from exporter.manifest import IMAGE_PLAN, TEXT_PLAN

        return EngineRunner(require_runtime(), export_dir / (IMAGE_PLAN if tower == "image" else TEXT_PLAN))
    if key == "torch_cuda_fp32":
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA GPU visible to torch")
        from exporter.onnx_export import tower_modules

        module = tower_modules(loaded)[tower].cuda()

        def run_cuda(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(x).cuda()).float().cpu().numpy()
            return out  # .cpu() synchronises: the time includes both copies, like TensorRT's runner

        return run_cuda
    raise Skip(f"unknown runtime {key}")


def _min_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    out = out.astype(np.float32) / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(ref * out, axis=1)))


def bench_tower(
    loaded: Any,
    export_dir: Path,
    info: dict[str, Any],
    tower: str,
    settings: Settings,
    progress: Progress,
) -> dict[str, Any]:
    """All runtimes x batches for one tower: {runtime: {"label", "skipped"?, "batches": {b: cell}}}."""
    from exporter.onnx_export import sample_pixels, sample_token_ids

    inputs = {
        b: (sample_pixels(loaded, b) if tower == "image" else sample_token_ids(loaded, b)) for b in settings.batches
    }
    reference: dict[int, np.ndarray] = {}
    results: dict[str, Any] = {}
    for key, label in RUNTIMES.items():
        entry: dict[str, Any] = {"label": label, "batches": {}}
        results[key] = entry
        try:
            runner = make_runner(key, loaded, export_dir, tower, info, settings.threads)
        except Skip as exc:
            entry["skipped"] = str(exc)
            continue
        per_item_s: float | None = None
        for batch in settings.batches:
            x = inputs[batch]
            warmup = 2 if per_item_s is None or per_item_s * batch < 0.5 else 1
            min_iters = settings.min_iters
            if per_item_s is not None and per_item_s * batch > settings.cell_budget_s:
                min_iters = settings.min_iters_large  # one call outlasts the budget: fewer, long calls
            if per_item_s is not None:
                estimate = per_item_s * batch * (warmup + min_iters)
                if estimate > settings.max_cell_s:
                    entry["batches"][str(batch)] = {
                        "skipped": f"estimated {estimate:.0f} s > the {settings.max_cell_s:.0f} s cap per cell"
                    }
                    progress.info(f"  {tower} {key} batch {batch}: skipped (estimated {estimate:.0f} s)")
                    continue
            out = runner(x)
            for _ in range(warmup - 1):
                runner(x)
            samples = time_calls(
                lambda x=x, r=runner: r(x), settings.cell_budget_s, min_iters, settings.max_iters
            )
            stats = latency_stats(samples)
            stats["warmup"] = warmup
            stats["throughput"] = batch / (stats["median_ms"] / 1000.0)
            if key == BASELINE:
                reference[batch] = np.asarray(out, dtype=np.float32)
            if batch in reference:
                stats["min_cosine_vs_torch"] = _min_cosine(reference[batch], np.asarray(out))
            entry["batches"][str(batch)] = stats
            per_item_s = stats["median_ms"] / 1000.0 / batch
            progress.info(
                f"  {tower} {key} batch {batch}: median {stats['median_ms']:.1f} ms, "
                f"p90 {stats['p90_ms']:.1f} ms, {stats['throughput']:.1f} items/s (n={stats['n']})"
            )
        del runner
        gc.collect()
    # Ratios against PyTorch measured in this same run, batch by batch.
    base = results[BASELINE]["batches"]
    for entry in results.values():
        for batch, cell in entry["batches"].items():
            ref = base.get(batch, {})
            if "median_ms" in cell and "median_ms" in ref:
                cell["speedup_vs_torch"] = ref["median_ms"] / cell["median_ms"]
    return results


def run(settings: Settings, work: Path, progress: Progress) -> dict[str, Any]:
    import torch

    torch.set_num_threads(settings.threads)
    out: dict[str, Any] = {
        "threads": {"torch.set_num_threads": torch.get_num_threads(), "ort.intra_op_num_threads": settings.threads,
                    "ort.inter_op_num_threads": 1},
        "runtimes": RUNTIMES,
        "models": {},
    }
    for name in settings.models:
        loaded, export_dir, info = prepare_model(name, work, max(settings.batches), progress)
        model: dict[str, Any] = {"prepare": info, "towers": {}}
        for tower in ("image", "text"):
            with progress.step(f"{name}: {tower} tower, batches {settings.batches}"):
                model["towers"][tower] = bench_tower(loaded, export_dir, info, tower, settings, progress)
        out["models"][name] = model
        out.setdefault("export_dirs", {})[name] = str(export_dir)
        del loaded
        gc.collect()
    return out
