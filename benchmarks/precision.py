"""Every runtime x precision on the CPU against PyTorch FP32, in one run: speed, cosine, decisions.

    .venv/bin/python -m benchmarks.precision --out benchmarks            # PRECISION.md + precision.json
    .venv/bin/python -m benchmarks.precision --out /tmp/p --batches 1 8 --no-served

Sections, all measured in this one run (ratios are against PyTorch measured here, never another run):
  encoders  ViT-B-32 (random weights), both towers, batches 1/8/32/128: every runner the runtime registry
            offers for the benchmark (benchmarks/encoders.py: PyTorch eager FP32 first, ONNX Runtime FP32 /
            FP16 / INT8, OpenVINO FP32 / bf16 / INT8; a runner that cannot run here is listed with its reason),
            median latency, items/s, speed-up vs PyTorch FP32 and min cosine vs PyTorch on the same inputs.
  accuracy  ShapesCLIP-RN-T (the builtin trained weights): `clip-triton parity` with the shapes held-out set
            (exporter/parity/labelled.py), so every stage gets its min cosine, its class threshold and its
            zero-shot top-1 agreement with PyTorch (random weights make agreement meaningless on ViT-B-32).
  served    the ViT-B-32 repository for `--runtime python` (today's CPU serving) and `--runtime openvino`
            (the embedded server's stand-in for Triton's OpenVINO backend), each at `--precision fp32` and
            `int8` (SERVED_STEPS), on the local tritonserver, perf_analyzer at one concurrency level on
            clip_image_pixels and clip_text.
INT8 graphs are made with `clip-triton quantize` when this checkout has that command (else skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import Settings, load_average, machine, now_utc, versions  # noqa: E402
from benchmarks.encoders import BASELINE  # noqa: E402 - the reference runner's name, owned by the registry
from clip_triton.exporter.base.common import Progress  # noqa: E402

MODEL = "ViT-B-32"
SHAPES = "ShapesCLIP-RN-T"
MAIN_ROW = "shapes/shape_colour"  # the labelled set's main class row (64 classes)
GOAL_TOWERS = 3.0  # issue 26: towers >= 3x PyTorch FP32 at batch >= 8, within the gate
GOAL_SERVED = 2.0  # served throughput >= 2x today's
SERVED_CONCURRENCY = 16
# (runtime, precision) served end to end; the first is today's CPU serving, the goal's baseline.
SERVED_STEPS = [("python", "fp32"), ("python", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
SERVED_BASELINE = "-".join(SERVED_STEPS[0])


def settings(batches: list[int], threads: int) -> Settings:
    s = Settings.quick_run(threads)
    s.quick = False
    s.models, s.batches = [MODEL], batches
    s.cell_budget_s, s.min_iters, s.max_iters, s.min_iters_large, s.max_cell_s = 1.5, 2, 20, 1, 40.0
    return s


def quantize(export_dir: Path, progress: Progress) -> str:
    """INT8 graphs with `clip-triton quantize` where this checkout has it; the outcome in one line."""
    cli = [sys.executable, "-m", "clip_triton.exporter.cli"]
    probe = subprocess.run([*cli, "quantize", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return "skipped: no `clip-triton quantize` command in this checkout"
    with progress.step(f"clip-triton quantize --export {export_dir.name}"):
        run = subprocess.run([*cli, "quantize", "--export", str(export_dir), "-q"], capture_output=True, text=True,
                             timeout=1800)
    last = (run.stderr.strip().splitlines() or [""])[-1]
    return "ok" if run.returncode == 0 else f"failed (exit {run.returncode}): {last}"


def encoders(work: Path, s: Settings, progress: Progress) -> tuple[dict[str, Any], Path]:
    from benchmarks.encoders import bench_tower, prepare_model

    loaded, export_dir, info = prepare_model(MODEL, work, max(s.batches), progress)
    info["int8"] = quantize(export_dir, progress)
    towers = {}
    for tower in ("image", "text"):
        with progress.step(f"{MODEL}: {tower} tower, batches {s.batches}"):
            towers[tower] = bench_tower(loaded, export_dir, tower, s, progress)
    return {"model": MODEL, "weights": "random (seeded)", "prepare": info, "towers": towers}, export_dir


def accuracy(work: Path, progress: Progress) -> dict[str, Any]:
    from clip_triton.exporter.base.common import ClipTritonError
    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.fp16 import make_fp16

    export_dir = work / f"export-{SHAPES}"
    with progress.step(f"{SHAPES} (builtin weights): export, FP16 graphs"):
        export_model(load_model(SHAPES, pretrained="builtin", progress=Progress("load", quiet=True)), export_dir,
                     force=True)
        make_fp16(export_dir)
    int8 = quantize(export_dir, progress)
    report = work / "parity-shapes.json"
    with progress.step(f"{SHAPES}: parity with the shapes held-out set"):
        try:
            run_parity(export_dir, samples=4, labelled_set="shapes", providers=["cpu"], report=report,
                       markdown=work / "parity-shapes.md", progress=Progress("parity", quiet=True),
                       check_runtimes=("openvino",))  # judged here although no repository serves it
        except ClipTritonError as exc:  # a failing stage is a result here, recorded in the report
            progress.warn(str(exc)[:300])
    result = json.loads(report.read_text())
    stages: dict[str, Any] = {}
    for stage in result["stages"]:
        if stage.get("tower") in ("pixels", "ids") or stage["stage"].startswith("triton"):
            continue
        entry: dict[str, Any] = {"status": stage["status"], "precision": stage.get("precision"),
                                 "threshold": stage.get("threshold"), "reason": stage.get("reason")}
        for tower, fig in (stage.get("towers") or {}).items():
            entry[f"{tower}_min_cosine"] = fig["min_cosine"]
        for row in stage.get("accuracy") or []:
            entry.setdefault("agreement", {})[row["set"]] = row["agreement"]
            entry.setdefault("changed", {})[row["set"]] = row.get("changed")
            entry.setdefault("gate", {})[row["set"]] = row.get("min_agreement")
        stages[stage["stage"]] = entry
    return {"model": SHAPES, "weights": "builtin", "int8": int8,
            "labelled_images": (result.get("labelled") or {}).get("images"),
            "thresholds": result["thresholds"], "stages": stages}


def served(export_dir: Path, work: Path, progress: Progress) -> dict[str, Any]:
    from benchmarks.load import _input_files
    from benchmarks.perf_analyzer import PerfAnalyzerError, locate
    from clip_triton.clients import contract
    from clip_triton.exporter.base.manifest import load_manifest
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    try:
        tool = locate()
    except PerfAnalyzerError as exc:
        return {"skipped": str(exc)}
    names = contract.model_names(contract.DEFAULT_PREFIX)
    int8_graphs = load_manifest(export_dir).artifacts("onnx", "int8").values()
    out: dict[str, Any] = {"concurrency": SERVED_CONCURRENCY, "tool": tool.version(), "runtimes": {}}
    for runtime, precision in SERVED_STEPS:
        if precision == "int8" and not all((export_dir / name).is_file() for name in int8_graphs):
            continue  # no INT8 graphs (quantize skipped or failed: the prepare line says why)
        key = f"{runtime}-{precision}"
        opts = RepositoryOptions(runtime=runtime, precision=precision)
        repo = write_repository(export_dir, work / f"repo-{key}", opts, force=True)
        entry: dict[str, Any] = {"max_batch_size": json.loads((repo / "manifest.json").read_text())["repository"][
            "max_batch_size"]}
        with progress.step(f"served, --runtime {runtime} --precision {precision}: perf_analyzer at concurrency "
                           f"{SERVED_CONCURRENCY}"):
            server = TritonServer(repo, log_path=work / f"tritonserver-{key}.log").start(timeout=300)
            try:
                inputs = _input_files(server.grpc_url, names, work)
                for role in ("image_pixels", "text"):
                    try:
                        level = tool.measure(server.grpc_url, names[role], inputs[names[role]][1], SERVED_CONCURRENCY,
                                             work, window_requests=48)
                        entry[names[role]] = {k: level[k] for k in ("throughput", "median_ms", "p99_ms")}
                        progress.info(f"  {key} {names[role]}: {level['throughput']:.1f} infer/s")
                    except PerfAnalyzerError as exc:
                        entry[names[role]] = {"error": str(exc)[:300]}
            finally:
                server.stop()
        out["runtimes"][key] = entry
    return out


# -------------------------------------------------------------------------------------------- report


def _gate(acc: dict[str, Any], name: str, vit_min_cos: float | None) -> str:
    """'pass' when the stage passed parity on ShapesCLIP (cosine + agreement) and ViT-B-32's min cosine
    reaches the same class threshold; else why not."""
    stage = acc.get("stages", {}).get(name)
    if name == BASELINE:
        return "reference"
    if stage is None:
        return "not judged"
    if stage["status"] != "pass":
        return stage["status"]
    threshold = stage.get("threshold")
    if vit_min_cos is not None and threshold is not None and vit_min_cos < threshold:
        return f"fail (ViT-B-32 min cos {vit_min_cos:.5f} < {threshold})"
    return "pass"


def render(results: dict[str, Any]) -> str:
    enc, acc, srv = results["encoders"], results.get("accuracy", {}), results.get("served", {})
    lines = [
        "# Precision x runtime on the CPU (issue 26)",
        "",
        f"Written by `{results['command']}` (benchmarks/precision.py). Raw numbers: `precision.json`.",
        "",
        f"- date: {results['date']}; wall time {results['seconds']:.0f} s; machine: {results['machine_line']}",
        f"- load average at start {results['load_start']}, at end {results['load_end']} (the machine is shared: "
        "absolute times are noisy, ratios are measured in this one run)",
        *([f"- **note**: {results['note']}"] if results.get("note") else []),
        f"- versions: {results['versions_line']}",
        f"- encoder cells: warm-up 1-2 calls, then timed calls for {results['settings']['cell_budget_s']} s "
        f"(at least {results['settings']['min_iters']}, 1 when one call outlasts the budget); cells estimated over "
        f"{results['settings']['max_cell_s']:.0f} s skipped; threads {results['settings']['threads']}",
        f"- ViT-B-32 graphs: FP16 {enc['prepare'].get('fp16')}; INT8 {enc['prepare'].get('int8')}; "
        f"TensorRT {enc['prepare'].get('tensorrt')}",
        "",
        "## Encoders: ViT-B-32, random weights",
        "",
        "`vs PyTorch` = PyTorch eager FP32 median / this runner's median, same batch, this run. `min cos` = lowest "
        "per-row cosine vs PyTorch FP32 on the same inputs (ViT-B-32). `agreement` = zero-shot top-1 agreement "
        f"with PyTorch on ShapesCLIP-RN-T's shapes held-out set ({MAIN_ROW}, builtin weights; the same runner on "
        "that export). `gate` = the runner passed parity on ShapesCLIP (its class's min cosine and agreement) and "
        "ViT-B-32's min cosine reaches the same class threshold.",
    ]
    goals: list[str] = []
    for tower, runners in enc["towers"].items():
        lines += ["", f"**{tower} tower**", "",
                  "| runtime | name | class | batch | median ms | items/s | vs PyTorch | min cos | agreement | gate |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        skipped = []
        for name, entry in runners.items():
            if "skipped" in entry:
                skipped.append(f"- not run: {entry['label']} (`{name}`): {entry['skipped']}")
                continue
            stage = acc.get("stages", {}).get(name, {})
            cls = stage.get("precision") or ("fp32" if name == BASELINE else "?")
            agree = stage.get("agreement", {}).get(MAIN_ROW) if name != BASELINE else 1.0
            cosines = [c["min_cosine_vs_torch"] for c in entry["batches"].values() if "min_cosine_vs_torch" in c]
            gate = _gate(acc, name, min(cosines) if cosines else None)
            for batch, cell in entry["batches"].items():
                if "skipped" in cell:
                    lines.append(f"| {entry['label']} | `{name}` | {cls} | {batch} | - | - | - | - | - | "
                                 f"skipped: {cell['skipped']} |")
                    continue
                ratio = cell.get("speedup_vs_torch")
                cos = cell.get("min_cosine_vs_torch")
                lines.append(
                    f"| {entry['label']} | `{name}` | {cls} | {batch} | {cell['median_ms']:.1f} | "
                    f"{cell['throughput']:.1f} | {f'{ratio:.2f}x' if ratio else '-'} | "
                    f"{'-' if cos is None else f'{cos:.6f}'} | "
                    f"{'-' if agree is None else f'{agree:.1%}'} | {gate} |"
                )
                if name != BASELINE and ratio and int(batch) >= 8 and gate == "pass":
                    goals.append(f"{tower}/{name}/{batch}:{ratio:.2f}")
        lines += ["", *skipped]
    lines += ["", "## Accuracy: ShapesCLIP-RN-T (builtin weights), shapes held-out set", "",
              f"`clip-triton parity` on the export (FP32, FP16 and any INT8 graphs; INT8: {acc.get('int8')}). "
              "Thresholds: " + ", ".join(f"{k} {v}" for k, v in acc.get("thresholds", {}).items()) + ".", "",
              "| stage | class | threshold | image min cos | text min cos | shape_colour | shape | colour | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, st in acc.get("stages", {}).items():
        ag = st.get("agreement", {})
        cells = [f"{ag[k]:.1%}" if k in ag else "-" for k in ("shapes/shape_colour", "shapes/shape", "shapes/colour")]
        im, tx = st.get("image_min_cosine"), st.get("text_min_cosine")
        lines.append(
            f"| `{name}` | {st.get('precision') or '-'} | {st.get('threshold') or '-'} | "
            f"{'-' if im is None else f'{im:.6f}'} | {'-' if tx is None else f'{tx:.6f}'} | {' | '.join(cells)} | "
            f"{st['status']}{': ' + st['reason'] if st.get('reason') else ''} |"
        )
    lines += ["", "## Served end to end (local tritonserver, perf_analyzer)", ""]
    if "skipped" in srv or not srv:
        lines.append(f"Not measured: {srv.get('skipped', 'not run (--no-served)')}")
    else:
        lines += [
            f"ViT-B-32 (`repository --runtime R --precision P`); one instance per step; dynamic batching; "
            f"perf_analyzer over gRPC at concurrency {srv['concurrency']}, one item per request ({srv['tool']}). "
            f"`{SERVED_BASELINE}` is today's CPU serving (ONNX Runtime FP32 inside the python backend); `python-int8` "
            "the same on the INT8 graphs; `openvino-*` the repository written for Triton's OpenVINO backend, served "
            "here by the embedded server's python-based stand-in (OpenVINO's Python API with the same parameters; "
            "an FP32 graph runs at the CPU plugin's default inference precision, bf16 on this CPU).", "",
            "| runtime-precision | max batch | clip_image_pixels infer/s | p50 ms | clip_text infer/s | p50 ms |",
            "|---|---:|---:|---:|---:|---:|"]
        for runtime, entry in srv["runtimes"].items():
            px, tx = entry.get("clip_image_pixels", {}), entry.get("clip_text", {})
            lines.append(f"| {runtime} | {entry['max_batch_size']} | {px.get('throughput', float('nan')):.1f} | "
                         f"{px.get('median_ms', float('nan')):.0f} | {tx.get('throughput', float('nan')):.1f} | "
                         f"{tx.get('median_ms', float('nan')):.0f} |")
    lines += ["", "## The issue's goals on this CPU", "", *results.get("goals_lines", []), ""]
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[str]:
    enc, acc, srv = results["encoders"], results.get("accuracy", {}), results.get("served", {})
    out = []
    for tower, runners in enc["towers"].items():
        best: tuple[float, str, str] | None = None
        for name, entry in runners.items():
            if name == BASELINE or "skipped" in entry:
                continue
            cosines = [c["min_cosine_vs_torch"] for c in entry["batches"].values() if "min_cosine_vs_torch" in c]
            if _gate(acc, name, min(cosines) if cosines else None) != "pass":
                continue
            ratios = [c["speedup_vs_torch"] for b, c in entry["batches"].items()
                      if int(b) >= 8 and "speedup_vs_torch" in c]
            if ratios and (best is None or min(ratios) > best[0]):
                best = (min(ratios), name, ", ".join(f"{r:.2f}x" for r in ratios))
        if best is None:
            out.append(f"- {tower} tower: no runner within the gate measured at batch >= 8")
        else:
            met = "MET" if best[0] >= GOAL_TOWERS else "NOT MET"
            out.append(f"- {tower} tower >= {GOAL_TOWERS:.0f}x PyTorch FP32 at batch >= 8 within the gate: **{met}** "
                       f"(best: `{best[1]}`, worst batch >= 8 at {best[0]:.2f}x; {best[2]})")
    served_runs = srv.get("runtimes", {})
    if served_runs.get(SERVED_BASELINE) and len(served_runs) > 1:
        for model in ("clip_image_pixels", "clip_text"):
            base = served_runs[SERVED_BASELINE].get(model, {}).get("throughput")
            others = [(e.get(model, {}).get("throughput") or 0.0, k) for k, e in served_runs.items()
                      if k != SERVED_BASELINE]
            new, best = max(others)
            if base and new:
                met = "MET" if new / base >= GOAL_SERVED else "NOT MET"
                out.append(f"- served {model} >= {GOAL_SERVED:.0f}x today's ({SERVED_BASELINE}, same run): **{met}** "
                           f"(best: `{best}`, {new:.1f} vs {base:.1f} infer/s, {new / base:.2f}x)")
    else:
        out.append("- served throughput: not measured in this run")
    if results.get("note"):
        out.append("- caveat (see the note above): these lines compare cells measured under changing contention")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--no-served", action="store_true", help="skip the served section")
    parser.add_argument("--note", default="", help="a line for PRECISION.md, e.g. 'machine shared with other jobs'")
    args = parser.parse_args(argv)
    progress = Progress("precision")
    s = settings(args.batches, args.threads)
    import torch

    torch.set_num_threads(s.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="clip-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), load_average()
    results: dict[str, Any] = {
        "date": now_utc(),
        "command": "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "settings": s.to_dict(), "load_start": load_start,
        "note": args.note,
    }
    try:
        results["encoders"], export_dir = encoders(work, s, progress)
        for section, fn in (("accuracy", lambda: accuracy(work, progress)),
                            ("served", lambda: served(export_dir, work, progress))):
            if section == "served" and args.no_served:
                continue
            try:
                results[section] = fn()
            except Exception as exc:  # noqa: BLE001 - recorded; the encoder numbers are kept
                progress.warn(f"{section}: {type(exc).__name__}: {exc}")
                results[section] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - start
    results["load_end"] = load_average()
    m = results["machine"]
    results["machine_line"] = ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, (str, int, float)))[:300]
    results["versions_line"] = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    results["goals_lines"] = goals(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "PRECISION.md").write_text(render(results))
    progress.info(f"wrote {args.out / 'PRECISION.md'} and precision.json")
    for line in results["goals_lines"]:
        progress.info(line)
    return 0


def rerender(out: Path) -> None:
    """PRECISION.md again from precision.json (after a change to the report's layout)."""
    results = json.loads((out / "precision.json").read_text())
    results["goals_lines"] = goals(results)
    (out / "PRECISION.md").write_text(render(results))


if __name__ == "__main__":
    raise SystemExit(main())
