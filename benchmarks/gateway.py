"""The gateway's cost: the same requests direct over gRPC (AsyncClipClient) and through `clip-triton gateway`
(HTTP, httpx.AsyncClient, base64 embeddings as the OpenAI SDK asks), one item per request, at several
concurrency levels, against one embedded tritonserver, in one run.

    python -m benchmarks.gateway --repository build/demo/repository [--seconds 10] [--out benchmarks/gateway.json]

writes the raw numbers (--out) and benchmarks/GATEWAY.md (the table, the command, the machine).

Both paths share this machine's cores with Triton (and the gateway with both): the ratio includes the
gateway's CPU time taken from the server, which is what a sidecar on the same node costs too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import latency_stats
from benchmarks.load import CLIENT_IMAGES
from clip_triton.exporter.base.server import TritonServer

LEVELS = (1, 16, 64)


def _inputs() -> dict[str, list[Any]]:
    from clip_triton.exporter.parity.samples import builtin_texts, render_image

    images = [render_image(p, w, h, "RGB", fmt, seed=i) for i, (p, w, h, fmt) in enumerate(CLIENT_IMAGES)]
    return {"text": [t for t in builtin_texts(64) if t.strip()], "image": images}


def _data_url(image: bytes) -> str:
    kind = {b"\xff\xd8": "jpeg", b"\x89P": "png", b"RI": "webp"}.get(image[:2], "png")
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


async def _drive(call: Any, items: list[Any], concurrency: int, seconds: float) -> dict[str, float]:
    """Keep `concurrency` single-item requests in flight for `seconds`; items/s and latency."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop:
            item = items[next(counter) % len(items)]
            t = time.perf_counter()
            await call(item)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"items_per_s": len(latencies) / wall, "requests": len(latencies), **latency_stats(latencies)}


async def _measure(grpc_url: str, gateway_url: str, model: str, seconds: float) -> dict[str, Any]:
    import httpx

    from clip_triton.clients import AsyncClipClient

    inputs = _inputs()
    results: dict[str, Any] = {}
    async with AsyncClipClient(grpc_url, concurrency=max(LEVELS), batch_size=1) as client:
        pool = httpx.Limits(max_connections=max(LEVELS), max_keepalive_connections=max(LEVELS))
        http = httpx.AsyncClient(base_url=gateway_url, timeout=120, limits=pool)
        try:
            for tower, items in inputs.items():
                grpc_call = (lambda x: client.embed_texts([x])) if tower == "text" else (
                    lambda x: client.embed_images([x]))
                payloads = items if tower == "text" else [_data_url(x) for x in items]

                async def http_call(x: Any) -> None:
                    got = await http.post("/v1/embeddings", json={"model": model, "input": [x],
                                                                  "encoding_format": "base64"})
                    got.raise_for_status()

                await grpc_call(items[0])  # warm both paths
                await http_call(payloads[0])
                for level in LEVELS:
                    direct = await _drive(grpc_call, items, level, seconds)
                    gateway = await _drive(http_call, payloads, level, seconds)
                    ratio = gateway["items_per_s"] / direct["items_per_s"]
                    results[f"{tower}@{level}"] = {"grpc": direct, "gateway": gateway, "throughput_ratio": ratio}
                    print(f"{tower:5} c={level:<3} grpc {direct['items_per_s']:7.1f}/s  gateway "
                          f"{gateway['items_per_s']:7.1f}/s  ratio {ratio:.3f}  p50 {direct['median_ms']:.1f} -> "
                          f"{gateway['median_ms']:.1f} ms", flush=True)
        finally:
            await http.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="per path, tower and level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gateway.json"))
    args = parser.parse_args(argv)
    server = TritonServer(args.repository).start(timeout=300)
    launch = [sys.executable, "-m", "clip_triton.clients.gateway.cli", "--url", server.grpc_url, "--port", "0",
              "--max-in-flight", "256"]
    gateway = subprocess.Popen(launch, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert gateway.stdout is not None
        line = gateway.stdout.readline() or ""
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not found:
            raise SystemExit(f"gateway did not start: {line!r}")
        url = f"http://127.0.0.1:{found.group(1)}"
        from clip_triton.clients import ClipClient

        with ClipClient(server.grpc_url) as c:
            model = c.model_info.parameters.get("model_name", "clip")
        results = asyncio.run(_measure(server.grpc_url, url, model, args.seconds))
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(20)
        server.stop()
    record = {"repository": str(args.repository), "model": model, "seconds_per_cell": args.seconds,
              "cpu_count": os.cpu_count(), "levels": LEVELS, "results": results,
              "min_ratio_at_16": float(np.min([results[f"{t}@16"]["throughput_ratio"] for t in ("text", "image")]))}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    report = args.out.with_name("GATEWAY.md")
    report.write_text(markdown(record, " ".join(["python -m benchmarks.gateway", *(argv or sys.argv[1:])])))
    print(f"wrote {args.out} and {report}")
    return 0


def markdown(record: dict[str, Any], command: str) -> str:
    lines = [
        "# The gateway's cost beside direct gRPC",
        "",
        f"Written by `{command}` (benchmarks/gateway.py) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{record['model']} served by the embedded tritonserver (CPU, {record['cpu_count']} cores shared by Triton, "
        "the gateway and the load generator), one item per request, each cell "
        f"{record['seconds_per_cell']:.0f} s per path, both paths in one run. Direct: `AsyncClipClient` over gRPC. "
        "Gateway: `httpx.AsyncClient` POSTing OpenAI embeddings requests (`encoding_format: base64`) to "
        "`clip-triton gateway`, which forwards over gRPC.",
        "",
        "| input | concurrency | gRPC items/s | gateway items/s | gateway / gRPC | gRPC p50 ms | gateway p50 ms "
        "| gRPC p99 ms | gateway p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in record["results"].items():
        tower, level = key.split("@")
        g, w = cell["grpc"], cell["gateway"]
        lines.append(f"| {tower} | {level} | {g['items_per_s']:.1f} | {w['items_per_s']:.1f} | "
                     f"{cell['throughput_ratio']:.3f} | {g['median_ms']:.1f} | {w['median_ms']:.1f} | "
                     f"{g['p99_ms']:.1f} | {w['p99_ms']:.1f} |")
    lines += ["", f"Lowest throughput ratio at concurrency 16: {record['min_ratio_at_16']:.3f} "
              "(the goal: >= 0.90, at most 10 % lost).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
