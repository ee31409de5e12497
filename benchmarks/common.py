"""Shared pieces of the benchmarks: settings (full / quick), timing statistics, machine facts."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QUICK_MEMORY_MODELS = ("ViT-B-32", "ViT-S-16")
FULL_MEMORY_MODELS = (
    "ViT-B-32", "ViT-L-14", "EVA02-L-14", "MobileCLIP2-S4", "ViT-SO400M-14-SigLIP2-378",
    "ViT-H-14-378-quickgelu", "ViT-H-14-worldwide-quickgelu", "ViT-bigG-14",
)


@dataclass
class Settings:
    """Everything a run varies. `full()` is `make bench`, `quick()` is `make bench-quick`."""

    quick: bool
    models: list[str]
    batches: list[int]
    threads: int
    # Encoders: iterations are bounded by time, not by count, so big batches cost few iterations.
    cell_budget_s: float  # measured time per (model, tower, runtime, batch) beyond the warm-up
    min_iters: int
    max_iters: int
    min_iters_large: int  # at least this many when one call takes longer than the whole budget (batch 128)
    max_cell_s: float  # a cell whose estimated cost exceeds this is skipped (and the skip reported)
    # Preprocessing / tokenisation.
    preprocess_budget_s: float  # per image and path
    tokenize_budget_s: float
    # End to end through Triton.
    load_model: str
    concurrency: list[int]
    duration_s: float
    warmup_s: float
    max_requests: int  # per level: bounds a run whatever the server's speed
    sections: list[str] = field(default_factory=lambda: ["encoders", "preprocess", "load", "memory"])
    # Memory: every stage of each model in its own process (benchmarks/memory.py).
    memory_models: list[str] = field(default_factory=list)
    ort_providers: list[str] | None = None  # ONNX Runtime execution providers; None: CPU + what this host runs

    @classmethod
    def full(cls, threads: int) -> Settings:
        return cls(
            quick=False,
            models=["ViT-B-32", "ViT-B-16"],
            batches=[1, 8, 32, 128],
            threads=threads,
            cell_budget_s=5.0,
            min_iters=3,
            max_iters=100,
            min_iters_large=2,
            max_cell_s=75.0,
            preprocess_budget_s=1.0,
            tokenize_budget_s=2.0,
            load_model="ViT-B-32",
            concurrency=[1, 4, 16, 64],
            duration_s=10.0,
            warmup_s=2.0,
            max_requests=20_000,
            memory_models=list(FULL_MEMORY_MODELS),
        )

    @classmethod
    def quick_run(cls, threads: int) -> Settings:
        return cls(
            quick=True,
            models=["ViT-B-32"],
            batches=[1, 8],
            threads=threads,
            cell_budget_s=0.5,
            min_iters=2,
            max_iters=10,
            min_iters_large=2,
            max_cell_s=15.0,
            preprocess_budget_s=0.15,
            tokenize_budget_s=0.5,
            load_model="ViT-B-32",
            concurrency=[1, 4, 16, 64],
            duration_s=2.0,
            warmup_s=0.5,
            max_requests=2_000,
            memory_models=list(QUICK_MEMORY_MODELS),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    """Milliseconds: median, p90, p95, p99, mean, min, max, and the sample count."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": float(np.mean(ms)) if ms else float("nan"),
        "min_ms": float(np.min(ms)) if ms else float("nan"),
        "max_ms": float(np.max(ms)) if ms else float("nan"),
    }


def time_calls(
    fn: Callable[[], Any],
    budget_s: float,
    min_iters: int,
    max_iters: int,
) -> list[float]:
    """Call `fn` at least `min_iters` times, then until `budget_s` is spent or `max_iters` reached."""
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_iters and (len(samples) < min_iters or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return samples


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no torch / broken CUDA: no GPU
        gpu = None
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "gpu": gpu,
        "load_average_start": load_average(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxruntime", "numpy", "pillow", "tritonclient",
                 "nvidia-pytriton", "matplotlib", "clip-triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
