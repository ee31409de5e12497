"""Encoder throughput and latency by batch size, per runner and tower.

The runners are the runtime registry's (clip_triton.exporter.runtimes), under the names parity reports use:
  pytorch       PyTorch eager FP32 on CPU (the open_clip module the graphs were exported from): the baseline
  pytorch-cuda  PyTorch eager FP32 on the GPU, when one is present (the fair baseline for TensorRT)
  onnx-fp32     ONNX Runtime CPU, the FP32 graph, graph optimiser on
  onnx-fp16     ONNX Runtime CPU, the FP16 graph of `precision.py`, optimiser off (docs/engines.md)
  onnx-*-cuda, onnx-*-tensorrt  ONNX Runtime's CUDA / TensorRT providers, where onnxruntime-gpu and
                a GPU are present (or asked for with --ort-providers)
  tensorrt      TensorRT plans of the FP16 graph, when TensorRT and a CUDA GPU are present

Each cell (model, tower, runner, batch): warm-up calls, then timed calls until a time budget
is spent (at least `min_iters`); median and p90 latency, throughput = batch / median latency,
the speed-up against `pytorch` at the same batch in the same run, and the min cosine of the
runner's embeddings against `pytorch`'s (a fast wrong runtime must not look good).
A cell whose estimated cost exceeds `max_cell_s` is skipped and the skip reported.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Settings, latency_stats, time_calls
from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import Progress
from clip_triton.exporter.parity.metrics import compare_embeddings
from clip_triton.exporter.parity.samples import sample_inputs

BASELINE = "pytorch"


def prepare_model(name: str, work: Path, max_batch: int, progress: Progress) -> tuple[Any, Path, dict[str, Any]]:
    """Random-weight model -> export (FP32 graphs) -> FP16 graphs (-> TensorRT plans where possible)."""
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.fp16 import make_fp16

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
        progress.warn(f"{name}: FP16 conversion failed, onnx-fp16 skipped: {info['fp16']}")
    info["fp16_seconds"] = round(time.perf_counter() - start, 1)
    info["tensorrt"] = _maybe_build_engines(export_dir, max_batch, progress)
    return loaded, export_dir, info


def _maybe_build_engines(export_dir: Path, max_batch: int, progress: Progress) -> str:
    from clip_triton.exporter.stages.engines import build_engines

    why = runtimes.get("tensorrt").available()
    if why is not None:
        return f"skipped: {why}"
    try:
        with progress.step("TensorRT engines"):
            build_engines(export_dir, max_batch=max_batch)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported as the tensorrt skip reason
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def bench_runners(loaded: Any, export_dir: Path, settings: Settings) -> list[runtimes.Runner | runtimes.Skipped]:
    """Every registered runtime's runners for this export, the baseline first."""
    from clip_triton.exporter.base.manifest import load_manifest

    ctx = runtimes.RunContext(
        export_dir, load_manifest(export_dir), purpose="bench", loaded=loaded, threads=settings.threads,
        providers=settings.ort_providers,
    )
    items = [item for runtime in runtimes.registered() for item in runtime.runners(ctx)]
    return sorted(items, key=lambda item: item.name != BASELINE)  # stable: registry order after it


def bench_tower(
    loaded: Any,
    export_dir: Path,
    tower: str,
    settings: Settings,
    progress: Progress,
) -> dict[str, Any]:
    """All runners x batches for one tower: {runner: {"label", "skipped"?, "batches": {b: cell}}}."""
    inputs = {b: sample_inputs(loaded, tower, b) for b in settings.batches}
    reference: dict[int, np.ndarray] = {}
    results: dict[str, Any] = {}
    for runner in bench_runners(loaded, export_dir, settings):
        entry: dict[str, Any] = {"label": runner.label, "batches": {}}
        results[runner.name] = entry
        if isinstance(runner, runtimes.Skipped):
            entry["skipped"] = runner.reason
            continue
        try:
            runner.open()
        except Exception as exc:  # noqa: BLE001 - recorded as the skip reason; the other runners still run
            entry["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        try:
            _bench_cells(runner, tower, inputs, settings, entry, reference, progress)
        finally:
            runner.close()
            gc.collect()
    # Ratios against PyTorch measured in this same run, batch by batch.
    base = results[BASELINE]["batches"]
    for entry in results.values():
        for batch, cell in entry["batches"].items():
            ref = base.get(batch, {})
            if "median_ms" in cell and "median_ms" in ref:
                cell["speedup_vs_torch"] = ref["median_ms"] / cell["median_ms"]
    return results


def _bench_cells(
    runner: runtimes.Runner,
    tower: str,
    inputs: dict[int, np.ndarray],
    settings: Settings,
    entry: dict[str, Any],
    reference: dict[int, np.ndarray],
    progress: Progress,
) -> None:
    """Time `runner` at every batch size into entry["batches"] (the baseline fills `reference`)."""
    key = runner.name
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
        out = runner(tower, x)
        for _ in range(warmup - 1):
            runner(tower, x)
        samples = time_calls(lambda x=x: runner(tower, x), settings.cell_budget_s, min_iters, settings.max_iters)
        stats = latency_stats(samples)
        stats["warmup"] = warmup
        stats["throughput"] = batch / (stats["median_ms"] / 1000.0)
        if key == BASELINE:
            reference[batch] = np.asarray(out, dtype=np.float32)
        if batch in reference:
            stats["min_cosine_vs_torch"] = compare_embeddings(reference[batch], out)["min_cosine"]
        entry["batches"][str(batch)] = stats
        per_item_s = stats["median_ms"] / 1000.0 / batch
        progress.info(
            f"  {tower} {key} batch {batch}: median {stats['median_ms']:.1f} ms, "
            f"p90 {stats['p90_ms']:.1f} ms, {stats['throughput']:.1f} items/s (n={stats['n']})"
        )


def run(settings: Settings, work: Path, progress: Progress) -> dict[str, Any]:
    import torch

    torch.set_num_threads(settings.threads)
    out: dict[str, Any] = {
        "threads": {"torch.set_num_threads": torch.get_num_threads(), "ort.intra_op_num_threads": settings.threads,
                    "ort.inter_op_num_threads": 1},
        "runtimes": {},
        "models": {},
    }
    for name in settings.models:
        loaded, export_dir, info = prepare_model(name, work, max(settings.batches), progress)
        model: dict[str, Any] = {"prepare": info, "towers": {}}
        for tower in ("image", "text"):
            with progress.step(f"{name}: {tower} tower, batches {settings.batches}"):
                model["towers"][tower] = bench_tower(loaded, export_dir, tower, settings, progress)
                out["runtimes"].update({k: v["label"] for k, v in model["towers"][tower].items()})
        out["models"][name] = model
        out.setdefault("export_dirs", {})[name] = str(export_dir)
        del loaded
        gc.collect()
    return out
