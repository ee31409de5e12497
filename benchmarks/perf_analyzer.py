"""NVIDIA's perf_analyzer, the load tool of the Triton world, in a tool environment of its own.

The tritonclient 2.51.0 wheel ships `bin/perf_analyzer` built for Triton 2.51 (the embedded
server's release). It goes into its own virtualenv (`make perf-tools`, default `.venv-perf`) so
that it never downgrades the project's tritonclient. The binary links two libraries by their
plain names, libb64.so.0d and libcudart.so.12; nvidia-pytriton ships both under hashed names in
`nvidia_pytriton.libs`, so the install links them into the tool environment's `lib/perf_analyzer`.

Input data is perf_analyzer's JSON (`--input-data`): one entry per request, every tensor as
`b64` of its raw bytes. A BYTES tensor's raw bytes are Triton's serialized form: each element as
a 4-byte little-endian length and its bytes.

    .venv/bin/python -m benchmarks.perf_analyzer install [--env .venv-perf]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "2.51.0"  # the embedded tritonserver's release (nvidia-pytriton 0.7.0)
DEFAULT_ENV = Path(os.environ.get("CLIP_TRITON_PERF_ENV", ".venv-perf"))
# Plain name the binary asks for -> the hashed file in nvidia_pytriton.libs.
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
CSV_LATENCIES = {"p50 latency": "median_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms", "p99 latency": "p99_ms"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing or a run failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path

    def _env(self) -> dict[str, str]:
        paths = [str(self.lib_dir), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, env=self._env())
        return (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if out.returncode == 0 else ""

    def measure(
        self, url: str, model: str, inputs: Path, concurrency: int, work: Path, *, window_requests: int,
        trials: int = 3,
    ) -> dict[str, Any]:
        """One concurrency level over gRPC, one item per request: throughput and client latencies (ms).

        Windows are counted in requests, not milliseconds (`count_windows`): at 64 in flight on a CPU
        encoder one request takes seconds, longer than any fixed window. `trials` (at least 3) windows
        are taken whatever their spread (stability 1000 %), so a noisy 2-core machine cannot make it loop."""
        report = work / f"pa-{model}-c{concurrency}.csv"
        cmd = [
            str(self.binary), "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--input-data", str(inputs),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "count_windows",
            "--measurement-request-count", str(window_requests), "--max-trials", str(max(trials, 3)),
            "--stability-percentage", "1000", "-f", str(report),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), timeout=600)
        if run.returncode != 0 or not report.is_file():
            tail = " ".join((run.stderr or run.stdout).split())[-400:]
            raise PerfAnalyzerError(f"perf_analyzer on {model} at concurrency {concurrency} failed: {tail}")
        with report.open() as handle:
            row = next(csv.DictReader(handle))
        level: dict[str, Any] = {"concurrency": concurrency, "throughput": float(row["Inferences/Second"])}
        level.update({key: float(row[col]) / 1000.0 for col, key in CSV_LATENCIES.items()})
        level["server_queue_ms"] = float(row["Server Queue"]) / 1000.0
        level["server_compute_ms"] = float(row["Server Compute Infer"]) / 1000.0
        return level


def _serialized(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def tensor_entry(array: np.ndarray | list[bytes]) -> dict[str, Any]:
    """One tensor of one request, for perf_analyzer's JSON: raw bytes as b64, and its shape (no batch)."""
    if isinstance(array, list):
        raw = b"".join(_serialized(item) for item in array)
        return {"b64": base64.b64encode(raw).decode(), "shape": [len(array)]}
    contiguous = np.ascontiguousarray(array)
    return {"b64": base64.b64encode(contiguous.tobytes()).decode(), "shape": list(contiguous.shape)}


def write_inputs(path: Path, name: str, items: list[Any]) -> Path:
    """Requests cycle through `items` (each one item: encoded bytes / a string, or an array without batch)."""
    entries = []
    for item in items:
        item = item.encode() if isinstance(item, str) else item
        entries.append({name: tensor_entry([item] if isinstance(item, bytes) else item)})
    path.write_text(json.dumps({"data": entries}))
    return path


def _pytriton_libs() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise PerfAnalyzerError("nvidia-pytriton is not installed here: run `make install` first")
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise PerfAnalyzerError(f"{libs} is missing: nvidia-pytriton's bundled libraries are needed")
    return libs


def locate(env_dir: Path = DEFAULT_ENV) -> PerfAnalyzer:
    """The installed tool, or PerfAnalyzerError saying how to install it."""
    binary = Path(env_dir) / "bin" / "perf_analyzer"
    lib_dir = Path(env_dir) / "lib" / "perf_analyzer"
    missing = [name for name in LIBRARIES if not (lib_dir / name).exists()]
    if not binary.is_file() or missing:
        raise PerfAnalyzerError(f"perf_analyzer is not installed in {env_dir}: run `make perf-tools`")
    return PerfAnalyzer(binary, lib_dir)


def install(env_dir: Path = DEFAULT_ENV, python: str = sys.executable) -> PerfAnalyzer:
    env_dir = Path(env_dir)
    binary = env_dir / "bin" / "perf_analyzer"
    if not binary.is_file():
        subprocess.run([python, "-m", "venv", str(env_dir)], check=True)
        pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", f"tritonclient=={VERSION}"]
        subprocess.run(pip, check=True)  # --no-deps: only the binary is wanted, not a second client stack
    lib_dir = env_dir / "lib" / "perf_analyzer"
    lib_dir.mkdir(parents=True, exist_ok=True)
    source = _pytriton_libs()
    for name, pattern in LIBRARIES.items():
        found = sorted(source.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"{source} has no {pattern} (needed as {name})")
        link = lib_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    tool = PerfAnalyzer(binary, lib_dir)
    if not tool.version():
        shutil.rmtree(lib_dir, ignore_errors=True)
        raise PerfAnalyzerError(f"{binary} does not run on this machine (missing system libraries?)")
    return tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer")
    parser.add_argument("command", choices=["install", "where"])
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="tool virtualenv (default .venv-perf)")
    args = parser.parse_args(argv)
    try:
        tool = install(args.env) if args.command == "install" else locate(args.env)
    except (PerfAnalyzerError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{tool.version()}: {tool.binary} (libraries: {tool.lib_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
