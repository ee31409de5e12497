"""End to end through the local Triton: an async gRPC load generator at fixed concurrency levels.

Two repositories of the same export (runtime `python`: ONNX Runtime inside the python backend,
the runtime the embedded CPU server runs), served one after the other:
  dynamic_batching   as `clip-triton repository` writes it (dynamic batching on every step)
  no_batching        the same, written with `--no-dynamic-batching` (no `dynamic_batching`
                     block in any config.pbtxt)
For each public ensemble (`clip_image`: encoded JPEG bytes, `clip_text`: a caption) and each
concurrency level: `concurrency` coroutines each send one item per request back to back, for
a fixed duration or a bounded request count, over loopback (tritonclient.grpc.aio). Reported:
throughput, p50/p95/p99 latency, errors, and the average batch the encoder step executed (from
Triton's own statistics: inferences / executions).

The client runs on the same cores as the server: on a 2-core machine it takes its share.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Settings, latency_stats
from exporter.common import Progress

VARIANTS = ("dynamic_batching", "no_batching")
CLIENT_IMAGES = [("shapes", 640, 480), ("gradient", 800, 600), ("noise", 512, 384), ("checker", 1024, 768)]


def _payloads(tower: str) -> list[bytes]:
    from exporter.samples import builtin_texts, render_image

    if tower == "image":
        return [render_image(p, w, h, "RGB", "JPEG", seed=i) for i, (p, w, h) in enumerate(CLIENT_IMAGES)]
    return [t.encode() for t in builtin_texts(64) if t.strip()]


def write_repositories(export_dir: Path, work: Path) -> dict[str, Path]:
    from exporter.repository import RepositoryOptions, write_repository

    repos = {}
    for variant in VARIANTS:
        opts = RepositoryOptions(runtime="python", dynamic_batching=variant == "dynamic_batching")
        repos[variant] = write_repository(export_dir, work / f"repo-{variant}", opts, force=True)
    return repos


def _encoder_counts(stats: Any, model: str) -> tuple[int, int]:
    for entry in stats.model_stats:
        if entry.name == model:
            return int(entry.inference_count), int(entry.execution_count)
    return 0, 0


async def _level(
    url: str, model: str, input_name: str, payloads: list[bytes], concurrency: int, duration: float,
    max_requests: int, encoder: str,
) -> dict[str, Any]:
    import tritonclient.grpc.aio as grpcclient

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    async with grpcclient.InferenceServerClient(url) as client:
        inputs = []
        for data in payloads:
            item = grpcclient.InferInput(input_name, [1, 1], "BYTES")
            item.set_data_from_numpy(np.array([[data]], dtype=np.object_))
            inputs.append(item)
        before = _encoder_counts(await client.get_inference_statistics(encoder), encoder)
        start = time.perf_counter()
        deadline = start + duration

        async def worker(index: int) -> None:
            nonlocal sent
            turn = index
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    await client.infer(model, [inputs[turn % len(inputs)]], client_timeout=60.0)
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - counted and the first few kept
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                turn += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = _encoder_counts(await client.get_inference_statistics(encoder), encoder)
    stats = latency_stats(latencies)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    stats.update(
        concurrency=concurrency,
        seconds=elapsed,
        requests=len(latencies),
        errors=len(errors),
        first_errors=errors[:3],
        throughput=len(latencies) / elapsed if elapsed > 0 else 0.0,
        encoder_avg_batch=(inferences / executions) if executions else None,
    )
    return stats


async def _warmup(url: str, model: str, input_name: str, payloads: list[bytes], seconds: float) -> None:
    import tritonclient.grpc.aio as grpcclient

    async with grpcclient.InferenceServerClient(url) as client:
        deadline = time.perf_counter() + seconds
        turn = 0
        while True:
            item = grpcclient.InferInput(input_name, [1, 1], "BYTES")
            item.set_data_from_numpy(np.array([[payloads[turn % len(payloads)]]], dtype=np.object_))
            await client.infer(model, [item], client_timeout=120.0)
            turn += 1
            if time.perf_counter() >= deadline:
                return


def bench_repository(repo: Path, settings: Settings, log: Path, progress: Progress) -> dict[str, Any]:
    from exporter.repository import model_names
    from exporter.server import TritonServer

    names = model_names("clip")
    results: dict[str, Any] = {}
    start = time.perf_counter()
    server = TritonServer(repo, log_path=log)
    server.start(timeout=300)
    results["server_start_s"] = round(time.perf_counter() - start, 1)
    try:
        for tower, input_name in (("image", "image"), ("text", "text")):
            model, encoder = names[tower], names[f"{tower}_encoder"]
            payloads = _payloads(tower)
            asyncio.run(_warmup(server.grpc_url, model, input_name, payloads, settings.warmup_s))
            levels = []
            for concurrency in settings.concurrency:
                stats = asyncio.run(
                    _level(server.grpc_url, model, input_name, payloads, concurrency, settings.duration_s,
                           settings.max_requests, encoder)
                )
                levels.append(stats)
                batch = stats["encoder_avg_batch"]
                progress.info(
                    f"  {model} concurrency {concurrency}: {stats['throughput']:.1f} req/s, p50 "
                    f"{stats['median_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, errors {stats['errors']}, "
                    f"encoder batch {batch:.1f}" if batch else f"  {model} concurrency {concurrency}: no executions"
                )
            results[model] = {"levels": levels}
    finally:
        server.stop()
    return results


def run(settings: Settings, export_dir: Path | None, work: Path, progress: Progress) -> dict[str, Any]:
    if export_dir is None:
        from exporter.loading import load_model
        from exporter.onnx_export import export_model

        export_dir = work / f"export-{settings.load_model}"
        with progress.step(f"{settings.load_model}: export for the server"):
            export_model(load_model(settings.load_model, random_weights=True), export_dir, force=True)
    from exporter.repository import DEFAULT_QUEUE_DELAY_US

    repos = write_repositories(export_dir, work)
    out: dict[str, Any] = {
        "model": settings.load_model,
        "runtime": "python (ONNX Runtime CPU inside the python backend), FP32",
        "concurrency": settings.concurrency,
        "duration_s": settings.duration_s,
        "max_requests": settings.max_requests,
        "queue_delay_us": DEFAULT_QUEUE_DELAY_US,
        "instances_per_step": 1,
        "variants": {},
    }
    for variant, repo in repos.items():
        with progress.step(f"Triton, {variant}: levels {settings.concurrency}, {settings.duration_s:g} s each"):
            out["variants"][variant] = bench_repository(repo, settings, work / f"tritonserver-{variant}.log", progress)
    return out
