"""End to end through the local Triton, measured with NVIDIA's perf_analyzer (benchmarks/perf_analyzer.py).

Repositories of one export (runtime `python`: ONNX Runtime inside the python backend, the
runtime the embedded CPU server runs), served one after the other:
  dynamic_batching      as `clip-triton repository` writes it (the preprocess model's thread pool
                        spans the host's cores)
  no_batching           the same, written with `--no-dynamic-batching`
  preprocess_1_thread   dynamic batching, `--preprocess-threads 1`: one decode at a time per
                        instance, as before the thread pool (only its preprocess model is measured)
Per variant, perf_analyzer drives each model at each concurrency level, one item per request:
  clip_image          encoded photos of mixed sizes (JPEG, PNG, WebP; 0.3 to 2 MP)
  clip_image_pixels   the same photos cropped by the client (uint8 [H, W, 3])
  clip_text           captions
  clip_image_encoder, clip_text_encoder   the encoders alone, from the pixels / ids the
                      server's own steps produce: the ceiling the ensembles are compared with
  clip_image_preprocess   preprocessing alone (concurrency 1/8/32): served images/s
Once, as a cross-check, the project's own generator (tritonclient.grpc.aio) runs clip_image at the
same levels, so both tools' numbers stand side by side. The client shares the server's cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Settings, latency_stats
from benchmarks.perf_analyzer import PerfAnalyzer, PerfAnalyzerError, locate, write_inputs
from clip_triton.clients import contract
from clip_triton.exporter.base.common import Progress

VARIANTS = ("dynamic_batching", "no_batching", "preprocess_1_thread")
# Photo-like sizes and formats (what a client sends): 0.3 to 2 megapixels.
CLIENT_IMAGES = [
    ("shapes", 640, 480, "JPEG"),
    ("gradient", 1280, 720, "JPEG"),
    ("shapes", 1920, 1080, "JPEG"),
    ("checker", 1024, 768, "WEBP"),
    ("text", 800, 600, "PNG"),
    ("noise", 512, 384, "JPEG"),
]
PREPROCESS_CONCURRENCY = [1, 8, 32]


def _payloads(tower: str) -> list[bytes]:
    from clip_triton.exporter.parity.samples import builtin_texts, render_image

    if tower == "image":
        return [render_image(p, w, h, "RGB", fmt, seed=i) for i, (p, w, h, fmt) in enumerate(CLIENT_IMAGES)]
    return [t.encode() for t in builtin_texts(64) if t.strip()]


def write_repositories(export_dir: Path, work: Path) -> dict[str, Path]:
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    options = {
        "dynamic_batching": RepositoryOptions(runtime="python"),
        "no_batching": RepositoryOptions(runtime="python", dynamic_batching=False),
        "preprocess_1_thread": RepositoryOptions(runtime="python", preprocess_threads=1),
    }
    return {variant: write_repository(export_dir, work / f"repo-{variant}", options[variant], force=True)
            for variant in VARIANTS}


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
            item = grpcclient.InferInput(input_name, [1, 1], contract.BYTES)
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
        # Triton counts a request in its statistics only after its response is out: on a loaded host
        # the last ones can lag. Poll until every answered request (>= 1 item each) shows, at most 5 s.
        settle = time.perf_counter() + 5.0
        while True:
            after = _encoder_counts(await client.get_inference_statistics(encoder), encoder)
            if after[0] - before[0] >= len(latencies) or time.perf_counter() > settle:
                break
            await asyncio.sleep(0.05)
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


def _input_files(url: str, names: dict[str, str], work: Path) -> dict[str, tuple[str, Path]]:
    """model -> (its input name, perf_analyzer input file). The encoders get the very pixels and
    ids the server's preprocess and tokenize steps make from the same photos and captions."""
    import json

    from clip_triton.clients.clip_preprocess import Preprocessor
    from clip_triton.exporter.runtimes.triton import triton_runner

    photos, captions = _payloads("image"), _payloads("text")[:16]
    server = triton_runner(url, {"prefix": contract.DEFAULT_PREFIX, "models": names})
    server.open()
    try:
        steps = {}
        for step, items in ((names["image_preprocess"], photos), (names["text_tokenize"], captions)):
            steps[step] = (server.model_io(step)[1], list(server.infer_raw(step, items)))
        config = server.client.get_model_config(names["image_pixels"]).config
    finally:
        server.close()
    crop = Preprocessor.from_config(json.loads(config.parameters[contract.PARAM_PREPROCESS].string_value))
    pixels_name, pixels = steps[names["image_preprocess"]]
    ids_name, ids = steps[names["text_tokenize"]]
    plan = {
        names["image"]: (contract.IMAGE_INPUT, photos),
        names["image_pixels"]: (contract.PIXELS_INPUT, [crop.crop_bytes(photo) for photo in photos]),
        names["text"]: (contract.TEXT_INPUT, captions),
        names["image_encoder"]: (pixels_name, pixels),
        names["text_encoder"]: (ids_name, ids),
        names["image_preprocess"]: (contract.IMAGE_INPUT, photos),
    }
    return {model: (input_name, write_inputs(work / f"pa-input-{model}.json", input_name, items))
            for model, (input_name, items) in plan.items()}


def _line(model: str, level: dict[str, Any]) -> str:
    return (f"  {model} concurrency {level['concurrency']}: {level['throughput']:.1f} infer/s, "
            f"p50 {level['median_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms")


def bench_repository(
    repo: Path, variant: str, tool: PerfAnalyzer, settings: Settings, work: Path, progress: Progress
) -> dict[str, Any]:
    from clip_triton.exporter.base.server import TritonServer

    names = contract.model_names(contract.DEFAULT_PREFIX)
    if variant == "preprocess_1_thread":
        plan = {names["image_preprocess"]: PREPROCESS_CONCURRENCY}
    else:
        plan = {names[role]: settings.concurrency for role in ("image", "image_pixels", "text", "image_encoder",
                                                                "text_encoder")}
        if variant == "dynamic_batching":
            plan[names["image_preprocess"]] = PREPROCESS_CONCURRENCY
    per_window, floor = (2, 16) if settings.quick else (4, 48)  # requests per window: max(floor, per_window x c)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    server = TritonServer(repo, log_path=work / f"tritonserver-{variant}.log")
    server.start(timeout=300)
    results["server_start_s"] = round(time.perf_counter() - start, 1)
    try:
        inputs = _input_files(server.grpc_url, names, work)
        for model, levels in plan.items():
            entry: dict[str, Any] = {"levels": []}
            for concurrency in levels:
                try:
                    level = tool.measure(server.grpc_url, model, inputs[model][1], concurrency, work,
                                         window_requests=max(floor, per_window * concurrency))
                except PerfAnalyzerError as exc:
                    entry.setdefault("errors", []).append(str(exc))
                    progress.warn(str(exc))
                    continue
                entry["levels"].append(level)
                progress.info(_line(model, level))
            results[model] = entry
        if variant == "dynamic_batching":
            results["aio_generator"] = _aio_levels(server.grpc_url, names, settings, progress)
    finally:
        server.stop()
    return results


def _aio_levels(url: str, names: dict[str, str], settings: Settings, progress: Progress) -> dict[str, Any]:
    """The project's own generator on clip_image, at perf_analyzer's levels: the cross-check."""
    model, payloads = names["image"], _payloads("image")
    asyncio.run(_warmup(url, model, contract.IMAGE_INPUT, payloads, settings.warmup_s))
    levels = []
    for concurrency in settings.concurrency:
        stats = asyncio.run(_level(url, model, contract.IMAGE_INPUT, payloads, concurrency, settings.duration_s,
                                   settings.max_requests, names["image_encoder"]))
        levels.append(stats)
        progress.info(_line(f"{model} (aio generator)", stats))
    return {"model": model, "levels": levels}


async def _warmup(url: str, model: str, input_name: str, payloads: list[bytes], seconds: float) -> None:
    import tritonclient.grpc.aio as grpcclient

    async with grpcclient.InferenceServerClient(url) as client:
        deadline = time.perf_counter() + seconds
        turn = 0
        while True:
            item = grpcclient.InferInput(input_name, [1, 1], contract.BYTES)
            item.set_data_from_numpy(np.array([[payloads[turn % len(payloads)]]], dtype=np.object_))
            await client.infer(model, [item], client_timeout=120.0)
            turn += 1
            if time.perf_counter() >= deadline:
                return


def run(settings: Settings, export_dir: Path | None, work: Path, progress: Progress) -> dict[str, Any]:
    try:
        tool = locate()
    except PerfAnalyzerError as exc:
        progress.warn(str(exc))
        return {"skipped": str(exc)}
    if export_dir is None:
        from clip_triton.exporter.sources.open_clip import load_model
        from clip_triton.exporter.stages.export import export_model

        export_dir = work / f"export-{settings.load_model}"
        with progress.step(f"{settings.load_model}: export for the server"):
            export_model(load_model(settings.load_model, random_weights=True), export_dir, force=True)
    from clip_triton.exporter.stages.repository import DEFAULT_QUEUE_DELAY_US

    repos = write_repositories(export_dir, work)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {
        "model": settings.load_model,
        "runtime": "python (ONNX Runtime CPU inside the python backend), FP32",
        "tool": tool.version(),
        "concurrency": settings.concurrency,
        "preprocess_concurrency": PREPROCESS_CONCURRENCY,
        "window_requests": "max(16, 2 x concurrency)" if settings.quick else "max(48, 4 x concurrency)",
        "duration_s": settings.duration_s,
        "max_requests": settings.max_requests,
        "queue_delay_us": DEFAULT_QUEUE_DELAY_US,
        "instances_per_step": 1,
        "cores": cores,
        "preprocess_threads": {"dynamic_batching": cores, "no_batching": cores, "preprocess_1_thread": 1},
        "variants": {},
    }
    for variant, repo in repos.items():
        with progress.step(f"Triton, {variant}: perf_analyzer"):
            data = bench_repository(repo, variant, tool, settings, work, progress)
        if "aio_generator" in data:
            out["aio_generator"] = data.pop("aio_generator")
        out["variants"][variant] = data
    return out
