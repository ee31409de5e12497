"""Peak memory of every stage, per model, against the bound 3 x (largest tower's FP32 weights) + 3 GiB.

    .venv/bin/python -m benchmarks.memory --quick --out build/bench-memory     # ViT-B-32, ViT-S-16
    .venv/bin/python -m benchmarks.memory --models ViT-L-14 --out benchmarks   # one model, merged in
    .venv/bin/python -m benchmarks.run --sections memory --out benchmarks       # the full list (make bench)

Each stage is its own process, exactly as a user runs it, under `/usr/bin/time -v`:
`clip-triton export --random-weights`, `clip-triton fp16`, `clip-triton repository --runtime python`,
`clip-triton parity --export E --repository R` (which starts the embedded tritonserver).

What is measured (docs/engines.md, "Memory"):
- `peak_gib`: the clip-triton process's own peak RSS (the kernel's VmHWM, read from /proc while
  it runs): what the bound is about. Children are not in it.
- `time_v_gib`: `/usr/bin/time -v`'s "Maximum resident set size": the largest single process of the
  stage's tree (for parity that can be tritonserver or a python-backend stub, not the sum).
- `server_gib` (parity only): the peak of the summed RSS of tritonserver and its python-backend
  stubs, polled every 0.2 s; reported beside the stage, not judged by the bound (it is the serving
  footprint: one ONNX Runtime session per encoder plus Triton itself).
- W: the FP32 graph files' bytes per tower (image_encoder.onnx and text_encoder.onnx, with their
  `.data` sidecars): the weights plus a graph of a few MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import FULL_MEMORY_MODELS, QUICK_MEMORY_MODELS, Settings
from benchmarks.hf_tokenizer import write_tokenizer_json

# An entry point of its own (`python -m benchmarks.memory`): the environment benchmarks/run.py sets, which the
# stages it starts inherit.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1 << 30
BOUND_FACTOR, BOUND_EXTRA_GIB = 3.0, 3.0
STAGES = ("export", "fp16", "repository", "parity")
QUICK_MODELS = list(QUICK_MEMORY_MODELS)
FULL_MODELS = list(FULL_MEMORY_MODELS)
POLL_S = 0.2


def bound_gib(w_tower_gib: float) -> float:
    return BOUND_FACTOR * w_tower_gib + BOUND_EXTRA_GIB


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except (OSError, ValueError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    seen, stack = [], _children(pid)
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.append(child)
        stack += _children(child)
    return seen


class TreePoller:
    """Polls a `/usr/bin/time` process: its child's (clip-triton's) VmHWM, and the summed RSS of
    everything below clip-triton (the embedded tritonserver and its stubs)."""

    def __init__(self, time_pid: int) -> None:
        self.time_pid = time_pid
        self.main_hwm_kib = 0
        self.below_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = _children(self.time_pid)
            if kids:
                main = kids[0]
                hwm = _status_kib(main, "VmHWM")
                if hwm is not None:
                    self.main_hwm_kib = max(self.main_hwm_kib, hwm)
                below = sum(_status_kib(p, "VmRSS") or 0 for p in _descendants(main))
                self.below_peak_kib = max(self.below_peak_kib, below)
            self._stop.wait(POLL_S)


def clip_triton() -> str:
    exe = Path(sys.executable).with_name("clip-triton")
    return str(exe) if exe.exists() else "clip-triton"


def run_stage(args: list[str], log: Path, timeout: float | None = None) -> dict[str, Any]:
    """One `clip-triton` stage under /usr/bin/time -v; its peak memory, seconds and exit code."""
    cmd = [clip_triton(), *args]
    time_bin = shutil.which("time") or "/usr/bin/time"
    use_time = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-v"] if use_time else []) + cmd
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env)
        with TreePoller(proc.pid) as poller:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    time_v = int(match.group(1)) / (1 << 20) if match else None
    result: dict[str, Any] = {
        "command": " ".join(["clip-triton", *args]),
        "rc": rc,
        "seconds": round(seconds, 1),
        # VmHWM polled while it ran; without /proc (or a run too short to poll) time -v's figure.
        "peak_gib": round(poller.main_hwm_kib / (1 << 20), 3) if poller.main_hwm_kib else time_v,
        "time_v_gib": round(time_v, 3) if time_v is not None else None,
    }
    if not use_time:
        result["note"] = f"/usr/bin/time not found ({time_bin}): peak from /proc polling only"
    if poller.below_peak_kib:
        result["children_gib"] = round(poller.below_peak_kib / (1 << 20), 3)
    if rc != 0:
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("\t")]
        result["error"] = (lines[-1] if lines else f"exit code {rc}")[:300]
        if rc in (-9, 137):
            result["error"] = f"killed (SIGKILL: out of memory?) {result['error']}"
    return result


def tower_bytes(export_dir: Path) -> dict[str, int]:
    """FP32 graph bytes per tower: the .onnx file plus its .data sidecar."""
    sizes = {}
    for tower in ("image", "text"):
        files = [export_dir / f"{tower}_encoder.onnx", export_dir / f"{tower}_encoder.onnx.data"]
        sizes[tower] = sum(f.stat().st_size for f in files if f.is_file())
    return sizes


def measure_model(
    name: str,
    work: Path,
    progress: Any,
    timeout: float | None = None,
    keep: bool = False,
    stages: tuple[str, ...] = STAGES,
) -> dict[str, Any]:
    """Every stage of one model, in order; a failed stage ends the model's run (recorded). The
    export and repository are deleted afterwards unless `keep` (a large model's are ~10 GB); the
    logs stay."""
    export_dir, repo = work / f"mem-{name}" / "export", work / f"mem-{name}" / "repo"
    logs = work / f"mem-{name}" / "logs"
    shutil.rmtree(work / f"mem-{name}", ignore_errors=True)
    logs.mkdir(parents=True)
    export = ["export", "--model", name, "--random-weights", "--out", str(export_dir), "-q"]
    try:  # a Hugging Face tokenizer (SigLIP2, MetaCLIP2): serve text with a stand-in tokenizer.json
        export += ["--tokenizer-file", str(write_tokenizer_json(name, work / f"mem-{name}" / "tokenizer.json"))]
    except ValueError:
        pass  # open_clip's own BPE, shipped with the repository
    commands = {
        "export": export,
        "fp16": ["fp16", "--export", str(export_dir), "-q"],
        "repository": ["repository", "--export", str(export_dir), "--out", str(repo), "--runtime", "python"],
        "parity": ["parity", "--export", str(export_dir), "-q"]
        + (["--repository", str(repo)] if "repository" in stages else []),
    }
    entry: dict[str, Any] = {"stages": {}, "stages_requested": list(stages)}
    for stage in stages:
        with progress.step(f"{name}: {stage} (its own process, /usr/bin/time -v)"):
            result = run_stage(commands[stage], logs / f"{stage}.log", timeout)
        entry["stages"][stage] = result
        if stage == "export" and result["rc"] == 0:
            sizes = tower_bytes(export_dir)
            entry["w_gib"] = round(sum(sizes.values()) / GIB, 3)
            entry["w_tower_gib"] = {t: round(b / GIB, 3) for t, b in sizes.items()}
            entry["w_tower_max_gib"] = round(max(sizes.values()) / GIB, 3)
            entry["bound_gib"] = round(bound_gib(max(sizes.values()) / GIB), 3)
        if result["rc"] != 0:
            progress.warn(f"{name}: {stage} failed: {result.get('error')}")
            break
    judge(entry)
    if not keep:
        shutil.rmtree(export_dir, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    return entry


def judge(entry: dict[str, Any]) -> None:
    """Each stage's multiple of the largest tower's W and pass/fail against the bound."""
    bound = entry.get("bound_gib")
    w_max = entry.get("w_tower_max_gib")
    for result in entry["stages"].values():
        peak = result.get("peak_gib")
        if bound is None or peak is None:
            result["pass"] = False if result.get("rc") else None
            continue
        result["multiple_of_w_tower"] = round(peak / w_max, 2) if w_max else None
        result["pass"] = bool(result["rc"] == 0 and peak <= bound)
    wanted = entry.get("stages_requested", STAGES)
    entry["pass"] = all(r.get("pass") for r in entry["stages"].values()) and len(entry["stages"]) == len(wanted)


def run(models: list[str], work: Path, progress: Any, **options: Any) -> dict[str, Any]:
    """The `memory` section of results.json; `options` are measure_model's (timeout, keep, stages)."""
    section: dict[str, Any] = {
        "bound": f"{BOUND_FACTOR:g} x W_tower + {BOUND_EXTRA_GIB:g} GiB (W_tower: the largest tower's FP32 bytes)",
        "weights": "random (seeded)",
        "calibration_bytes": os.environ.get("CLIP_TRITON_CALIBRATION_BYTES", "default (1 GiB)"),
        "models": {},
    }
    for name in models:
        section["models"][name] = measure_model(name, work, progress, **options)
    return section


def merge(previous: dict[str, Any] | None, section: dict[str, Any]) -> dict[str, Any]:
    """Models measured now replace the same models of an earlier run; the others are kept (large models
    are measured one at a time: `--models ViT-H-14-378-quickgelu`)."""
    if not previous or "models" not in previous:
        return section
    models = dict(previous["models"])
    models.update(section["models"])
    return {**section, "models": models}


def main(argv: list[str] | None = None) -> int:
    from benchmarks import results as bench_results
    from clip_triton.exporter.base.common import ClipTritonError, Progress

    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder with results.json / RESULTS.md / memory.png")
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_MODELS)}")
    parser.add_argument("--models", nargs="+", help="open_clip model names (default: the full list)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, help="seconds per stage (default: none)")
    parser.add_argument("--keep", action="store_true", help="keep each model's export and repository")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of " + ",".join(STAGES) + " (parity without repository: "
                        "ONNX graphs only, no server)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    asked = args.stages.split(",")
    stages = tuple(s for s in STAGES if s in asked)
    unknown = set(asked) - set(STAGES)
    if unknown or not stages:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    progress = Progress("bench")
    work = args.work or Path(tempfile.mkdtemp(prefix="clip-triton-memory-"))
    try:
        bench_results.check_out(args.out)
        started = time.perf_counter()
        section = run(models, work, progress, timeout=args.timeout, keep=args.keep, stages=stages)
        previous_file = args.out / "results.json"
        previous = json.loads(previous_file.read_text()) if previous_file.is_file() else None
        settings = Settings.quick_run(1) if args.quick else Settings.full(1)
        settings.sections, settings.memory_models = ["memory"], list(models)
        command = ["python -m benchmarks.memory", *(argv if argv is not None else sys.argv[1:])]
        results = bench_results.base_results(settings, command)
        results["memory"] = merge((previous or {}).get("memory"), section)
        results["seconds"] = time.perf_counter() - started
        bench_results.carry_over(results, previous_file)
        files = bench_results.write(results, args.out, not args.no_plots)
    except ClipTritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [m for m, e in section["models"].items() if not e["pass"]]
    print(f"[bench] memory: {len(models) - len(failed)} of {len(models)} models within the bound"
          + (f"; over or failed: {', '.join(failed)}" if failed else "") + ": " + ", ".join(map(str, files)),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
