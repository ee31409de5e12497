"""Run the benchmarks and write results.json, RESULTS.md and PNG plots into --out.

    .venv/bin/python -m benchmarks.run --out benchmarks               # make bench (full, ~15 min on 2 cores)
    .venv/bin/python -m benchmarks.run --quick --out build/bench-quick  # make bench-quick (< 3 min)
    .venv/bin/python -m benchmarks.run --quick --sections preprocess --out /tmp/b

Sections: `encoders` (PyTorch / ONNX Runtime FP32 / FP16 / TensorRT by batch size, per tower),
`preprocess` (the python models' preprocessing and tokenisation, in-process), `load` (Triton
over gRPC at fixed concurrency, with and without dynamic batching), `memory` (peak RSS of every
stage, each its own process, per model, against 3 x W_tower + 3 GiB: benchmarks/memory.py).
Exports and repositories go to a temporary work folder, removed at the end unless --keep-work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import Settings, load_average  # noqa: E402
from benchmarks.results import SECTIONS, base_results, carry_over, check_out, previous_section, write  # noqa: E402
from clip_triton.exporter.base.common import ClipTritonError, Progress  # noqa: E402
from clip_triton.exporter.runtimes.onnxruntime import parse_providers  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, RESULTS.md, *.png")
    parser.add_argument("--quick", action="store_true", help="short smoke run (ViT-B-32, batches 1 and 8, 2 s levels)")
    parser.add_argument("--models", nargs="+", help="open_clip models for the encoder section")
    parser.add_argument("--batches", nargs="+", type=int, help="encoder batch sizes")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), help=f"any of {' '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads and ONNX Runtime intra_op_num_threads (default: nproc)")
    parser.add_argument("--duration", type=float, help="seconds per concurrency level (default 10, quick 2)")
    parser.add_argument("--concurrency", nargs="+", type=int, help="concurrency levels (default 1 4 16 64)")
    parser.add_argument("--note", default="", help="a line for RESULTS.md, e.g. 'machine shared with other jobs'")
    parser.add_argument("--work", type=Path, help="work folder for exports and repositories (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--memory-models", nargs="+",
                        help="open_clip models for the memory section (default: quick 2 small, full 7 up to ViT-H)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--ort-providers", default="auto",
                        help="ONNX Runtime execution providers for the encoder section, e.g. cpu,cuda,tensorrt")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    if args.threads < 1:
        raise ClipTritonError("--threads must be at least 1")
    settings = Settings.quick_run(args.threads) if args.quick else Settings.full(args.threads)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise ClipTritonError(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    settings.sections = [s for s in SECTIONS if s in args.sections]
    settings.ort_providers = parse_providers(args.ort_providers)
    if args.models:
        from clip_triton.exporter.sources.open_clip import check_model_name

        for name in args.models:
            check_model_name(name)
        settings.models = list(args.models)
        settings.load_model = args.models[0]
    if args.memory_models:
        from clip_triton.exporter.sources.open_clip import check_model_name

        for name in args.memory_models:
            check_model_name(name)
        settings.memory_models = list(args.memory_models)
    if args.batches:
        if any(b < 1 for b in args.batches):
            raise ClipTritonError("--batches must be positive")
        settings.batches = sorted(set(args.batches))
    if args.duration is not None:
        if args.duration <= 0:
            raise ClipTritonError("--duration must be positive")
        settings.duration_s = args.duration
    if args.concurrency:
        if any(c < 1 for c in args.concurrency):
            raise ClipTritonError("--concurrency levels must be positive")
        settings.concurrency = sorted(set(args.concurrency))
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from(args)
    check_out(args.out)
    progress = Progress("bench")
    started = time.perf_counter()
    results = base_results(settings, ["python -m benchmarks.run", *args.argv], args.note)
    work = args.work or Path(tempfile.mkdtemp(prefix="clip-triton-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        export_dir = None
        if "encoders" in settings.sections:
            from benchmarks import encoders

            results["encoders"] = encoders.run(settings, work, progress)
            dirs = results["encoders"].pop("export_dirs", {})
            export_dir = Path(dirs[settings.load_model]) if settings.load_model in dirs else None
            for model in results["encoders"]["models"].values():
                for key, reason in (("tensorrt", model["prepare"]["tensorrt"]),):
                    line = f"{key}: {reason}"
                    if reason != "ok" and line not in results["not_measured"]:
                        results["not_measured"].append(line)
        if "preprocess" in settings.sections:
            from benchmarks import preprocess

            results["preprocess"] = preprocess.run(settings, progress)
        if "load" in settings.sections:
            from benchmarks import load

            results["load"] = load.run(settings, export_dir, work, progress)
        if "memory" in settings.sections:
            from benchmarks import memory

            section = memory.run(settings.memory_models, work, progress)
            results["memory"] = memory.merge(previous_section(args.out, "memory"), section)
    finally:
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
        carry_over(results, args.out / "results.json")
        files = write(results, args.out, not args.no_plots)
    except ClipTritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    print(f"[bench] done in {results['seconds']:.0f} s: " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
