"""RESULTS.md from results.json: machine, versions, tables, the command, what was not measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GPU_PLACEHOLDER = "No GPU run has been recorded yet."
GPU_HEADING = "## GPU"


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _machine(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    lines = [
        f"- date: {results['date']}; wall time of the run: {results['seconds']:.0f} s",
        f"- command: `{results['command']}`",
        f"- machine: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}, {_f(m['memory_gib'])} GiB RAM, "
        f"{m['platform']}; GPU: {m['gpu'] or 'none'}",
        f"- load average (1/5/15 min) at start {m.get('load_average_start')}, at end {m.get('load_average_end')}",
    ]
    if results.get("note"):
        lines.append(f"- note: **{results['note']}**")
    for section, date in (results.get("carried_over") or {}).items():
        lines.append(f"- section `{section}`: not re-run by this command; its results are from the run of {date}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    enc = results.get("encoders")
    if enc:
        t = enc["threads"]
        lines.append(
            f"- threads: torch.set_num_threads({t['torch.set_num_threads']}), ONNX Runtime intra_op_num_threads "
            f"{t['ort.intra_op_num_threads']}, inter_op_num_threads {t['ort.inter_op_num_threads']}"
        )
    s = results["settings"]
    lines.append(
        f"- settings: {'quick' if s['quick'] else 'full'}; encoder cells: warm-up 1-2 calls, then timed calls "
        f"for {s['cell_budget_s']:g} s (at least {s['min_iters']}, or {s.get('min_iters_large', s['min_iters'])} "
        f"when one call outlasts that budget; at most {s['max_iters']}), cells estimated "
        f"over {s['max_cell_s']:g} s skipped; load: {s['duration_s']:g} s per level after a {s['warmup_s']:g} s "
        f"warm-up, at most {s['max_requests']} requests per level"
    )
    lines.append("- weights: random (seeded); speed does not depend on the weights' values")
    return lines


def _encoders(enc: dict[str, Any]) -> list[str]:
    lines = ["## Encoders", "",
             "Throughput = batch / median latency. `vs PyTorch` = PyTorch eager FP32 median / this runtime's "
             "median at the same batch, measured in this run. `min cos` = lowest per-row cosine of this "
             "runtime's embeddings vs PyTorch FP32 on the same inputs.", "",
             "FP16 on a CPU is expected to be slower than FP32: ONNX Runtime's CPU provider computes many FP16 ops "
             "in FP32 internally and its graph optimiser must be off for these FP16 graphs "
             "(it crashes on them; docs/engines.md). The FP16 rows show that the graph `precision.py` writes "
             "runs and stays accurate; its speed matters on a GPU (TensorRT builds that same graph).", ""]
    for model, data in enc["models"].items():
        prep = data["prepare"]
        lines.append(f"### {model}")
        lines.append("")
        lines.append(f"Export {prep['export_seconds']} s, FP16 conversion {prep['fp16_seconds']} s ({prep['fp16']}); "
                     f"TensorRT: {prep['tensorrt']}.")
        lines.append("")
        for tower, runtimes in data["towers"].items():
            lines.append(f"**{tower} tower**")
            lines.append("")
            lines.append("| runtime | batch | median ms | p90 ms | items/s | vs PyTorch | min cos | n |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            skipped = []
            for entry in runtimes.values():
                if "skipped" in entry:
                    skipped.append(f"{entry['label']}: {entry['skipped']}")
                    continue
                for batch, cell in entry["batches"].items():
                    if "skipped" in cell:
                        lines.append(f"| {entry['label']} | {batch} | skipped: {cell['skipped']} | | | | | |")
                        continue
                    lines.append(
                        f"| {entry['label']} | {batch} | {_f(cell['median_ms'])} | {_f(cell['p90_ms'])} | "
                        f"{_f(cell['throughput'])} | {_f(cell.get('speedup_vs_torch'), 2)}x | "
                        f"{_f(cell.get('min_cosine_vs_torch'), 6)} | {cell['n']} |"
                    )
            lines.append("")
            for reason in skipped:
                lines.append(f"- not run: {reason}")
            if skipped:
                lines.append("")
    return lines


def _preprocess(pre: dict[str, Any]) -> list[str]:
    lines = ["## Server preprocessing and tokenisation (per instance, in-process)", ""]
    images = pre["images"]
    cfg = images["config"]
    lines += [
        f"The python models' own code, called in-process on one thread (one python-backend instance), on "
        f"{len(images['images'])} sample images of several sizes, modes and formats; {pre['model']}'s config: "
        f"{cfg['size'][0]}x{cfg['size'][1]}, resize `{cfg['resize_mode']}`, `{cfg['interpolation']}`.",
        "",
        "- `exact`: `Preprocessor.from_bytes` (clients/clip_preprocess.py), **the served default**.",
        "- `draft`: JPEG only, `img.draft(mode, (2*S, 2*S))` before decoding (libjpeg DCT-domain downscale to "
        "1/2, 1/4 or 1/8 that keeps both edges >= 2x the target), then the exact resize + crop.",
        "- `reduce`: any format, full decode, `Image.reduce(k)` (integer box filter) down to >= 2x the "
        "target, then the exact resize + crop.",
        "",
        "Differences are against open_clip's own eval transform (torchvision on PIL), in the normalised "
        "tensor and in 8-bit pixel levels (x std x 255). **`draft` and `reduce` are not bit-exact: "
        "opt-in trade-offs, not the default.** The parity suite requires max abs diff < 1e-6 for the "
        "served path.",
        "",
        "| path | items/s (whole set) | mean ms / item | max abs diff | max diff (levels) | mean diff (levels) "
        "| bit-exact |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for path, s in images["summary"].items():
        lines.append(
            f"| {path} | {_f(s['items_per_s'])} | {_f(s['mean_ms_per_item'], 2)} | {s['max_abs_diff']:.3g} | "
            f"{_f(s['max_abs_diff_levels'], 2)} | {_f(s['mean_abs_diff_levels'], 3)} | "
            f"{'yes' if s['bit_exact'] else 'no'} |"
        )
    lines += ["", "Per image (median ms per call; speed-up vs exact; max diff in 8-bit levels):", "",
              "| image | bytes | exact ms | draft ms | draft speed-up | draft max diff | reduce ms | reduce speed-up "
              "| reduce max diff |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in images["images"]:
        p = row["paths"]
        lines.append(
            f"| {row['name']} | {row['bytes']} | {_f(p['exact']['median_ms'], 2)} | {_f(p['draft']['median_ms'], 2)} "
            f"| {_f(p['draft']['speedup_vs_exact'], 2)}x | {_f(p['draft']['max_abs_diff_levels'], 1)} | "
            f"{_f(p['reduce']['median_ms'], 2)} | {_f(p['reduce']['speedup_vs_exact'], 2)}x | "
            f"{_f(p['reduce']['max_abs_diff_levels'], 1)} |"
        )
    tok = pre["tokenize"]
    lines += ["", "**Tokenisation** (model_repository/common/clip_tokenizer.py, the tokenize model's code):", ""]
    if "skipped" in tok:
        lines.append(f"- skipped: {tok['skipped']}")
    else:
        lines += [
            f"- {tok['texts']} captions (empty, unicode, HTML-escaped, over-length, random word mixes), "
            f"`{tok['kind']}` BPE, context length {tok['context_length']}; token ids identical to open_clip's "
            f"tokenizer: {tok.get('identical_to_open_clip', 'not checked')}",
            f"- tokenizer construction {_f(tok['init_ms'])} ms; cold (empty BPE cache, one text per call) "
            f"{_f(tok['cold_items_per_s'], 0)} texts/s",
            f"- warm, one text per call (what the model does per request): "
            f"{_f(tok['batch_1']['items_per_s'], 0)} texts/s ({_f(tok['batch_1']['ms_per_item'], 3)} ms/text)",
            f"- warm, 64 texts per call: {_f(tok['batch_64']['items_per_s'], 0)} texts/s",
        ]
    lines.append("")
    return lines


def _best(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    levels = (entry or {}).get("levels") or []
    return max(levels, key=lambda lv: lv["throughput"]) if levels else None


def _level_table(levels: list[dict[str, Any]]) -> list[str]:
    """perf_analyzer's levels: throughput, client latencies, server queue and compute."""
    lines = ["| concurrency | infer/s | p50 ms | p90 ms | p99 ms | server queue ms | server compute ms |",
             "|---:" * 7 + "|"]
    for lv in levels:
        lines.append(f"| {lv['concurrency']} | {_f(lv['throughput'])} | {_f(lv['median_ms'])} | "
                     f"{_f(lv['p90_ms'])} | {_f(lv['p99_ms'])} | {_f(lv['server_queue_ms'])} | "
                     f"{_f(lv['server_compute_ms'])} |")
    return lines


def _preprocess_served(load: dict[str, Any]) -> list[str]:
    """Served preprocessing: images/s per instance and per core, 1 thread vs the pool, and the GPU projection."""
    pool = _best(load["variants"].get("dynamic_batching", {}).get("clip_image_preprocess"))
    single = _best(load["variants"].get("preprocess_1_thread", {}).get("clip_image_preprocess"))
    if not pool or not single:
        return []
    cores = load["cores"]
    per_core = pool["throughput"] / cores
    by_level = {
        lv["concurrency"]: lv for lv in load["variants"]["preprocess_1_thread"]["clip_image_preprocess"]["levels"]
    }
    rows = ["| concurrency | 1 thread: images/s | pool of all cores: images/s | ratio |", "|---:|---:|---:|---:|"]
    for lv in load["variants"]["dynamic_batching"]["clip_image_preprocess"]["levels"]:
        one = by_level.get(lv["concurrency"])
        ratio = lv["throughput"] / one["throughput"] if one and one["throughput"] else None
        rows.append(f"| {lv['concurrency']} | {_f(one['throughput'] if one else None)} | {_f(lv['throughput'])} | "
                    f"{_f(ratio, 2)}x |")
    lines = [
        "### Served preprocessing (`clip_image_preprocess` alone)",
        "",
        f"One instance; the photos above; perf_analyzer at each concurrency. `1 thread`: the repository written "
        f"with `--preprocess-threads 1` (one decode at a time, as before the thread pool); `pool`: the default "
        f"(threads = the host's {cores} cores). Best level: **{_f(pool['throughput'])} images/s per instance, "
        f"{_f(per_core)} images/s per core** (pool) vs {_f(single['throughput'])} images/s (1 thread): "
        f"**{_f(pool['throughput'] / single['throughput'], 2)}x**.",
        "",
        *rows,
        "",
        "**Projection for a GPU host (a projection, not a measurement).** At the measured "
        f"{_f(per_core)} images/s per core, feeding an encoder that embeds E images/s takes about E / {_f(per_core)} "
        f"cores of server-side decoding: ViT-B-32 at ~12,000 images/s (PyTorch AMP on an RTX 4090, published) "
        f"would need ~{12000 / per_core:.0f} cores; a TensorRT ViT-L-14 at ~1,000 images/s ~{1000 / per_core:.0f}. "
        "The pixels entry point (`clip_image_pixels`, client-side crops) moves that work to the clients; "
        "the server then only normalises (an ONNX step) and encodes. Real photos (3-12 MP JPEGs) decode slower "
        "than these 0.3-2 MP ones: measure on your own images.",
        "",
    ]
    return lines


def _load(load: dict[str, Any]) -> list[str]:
    lines = ["## End to end through Triton (gRPC, loopback, perf_analyzer)", ""]
    if "skipped" in load:
        return [*lines, f"- skipped: {load['skipped']}", ""]
    lines += [
        f"{load['model']}, runtime {load['runtime']}; one instance per step; dynamic batching queue delay "
        f"{load['queue_delay_us']} µs when on. Load: NVIDIA's perf_analyzer ({load['tool']}, `make perf-tools`), "
        f"one item per request, 3 windows of {load['window_requests']} requests per level (count_windows), "
        "over gRPC; client latencies. "
        "`no_batching` is the same repository written with `--no-dynamic-batching`. The encoders alone get "
        "the pixels / ids the server's own steps make. perf_analyzer shares the CPU cores with the server.",
        "",
    ]
    lines += _preprocess_served(load)
    encoders = {"clip_image": "clip_image_encoder", "clip_image_pixels": "clip_image_encoder",
                "clip_text": "clip_text_encoder"}
    summary = ["| variant | path | best infer/s | at concurrency | p50 ms there | encoder alone, best infer/s | "
               "e2e / encoder |", "|---|---|---:|---:|---:|---:|---:|"]
    for variant, data in load["variants"].items():
        for model, encoder in encoders.items():
            best, ceiling = _best(data.get(model)), _best(data.get(encoder))
            if best is None:
                continue
            ratio = best["throughput"] / ceiling["throughput"] if ceiling and ceiling["throughput"] else None
            summary.append(f"| {variant} | `{model}` | {_f(best['throughput'])} | {best['concurrency']} | "
                           f"{_f(best['median_ms'])} | {_f(ceiling['throughput'] if ceiling else None)} | "
                           f"{_f(ratio, 2)} |")
    lines += ["### Both image paths side by side, against the encoder alone", "", *summary, ""]
    for variant, data in load["variants"].items():
        for model, entry in data.items():
            if not isinstance(entry, dict) or not entry.get("levels"):
                continue
            lines += [f"**{model}, {variant}** (server start {data['server_start_s']} s)", ""]
            lines += _level_table(entry["levels"])
            for error in entry.get("errors", [])[:2]:
                lines += ["", f"- error: {error}"]
            lines.append("")
    aio = load.get("aio_generator")
    if aio:
        pa = {lv["concurrency"]: lv for lv in load["variants"]["dynamic_batching"].get(aio["model"], {}).get(
            "levels", [])}
        lines += ["### Cross-check: the project's own generator vs perf_analyzer (`clip_image`, dynamic_batching)",
                  "", "tritonclient.grpc.aio, N coroutines with one request each in flight, "
                  f"{load['duration_s']:g} s per level; kept for what perf_analyzer does not report here "
                  "(the encoder's average batch, from Triton's statistics).", "",
                  "| concurrency | aio req/s | perf_analyzer infer/s | aio / perf_analyzer | aio p50 ms | "
                  "perf_analyzer p50 ms | encoder batch |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for lv in aio["levels"]:
            other = pa.get(lv["concurrency"])
            ratio = lv["throughput"] / other["throughput"] if other and other["throughput"] else None
            theirs = other["throughput"] if other else None
            lines.append(f"| {lv['concurrency']} | {_f(lv['throughput'])} | {_f(theirs)}"
                         f" | {_f(ratio, 2)} | {_f(lv['median_ms'])} | {_f(other['median_ms'] if other else None)} | "
                         f"{_f(lv['encoder_avg_batch'], 2)} |")
        lines.append("")
    return lines


def _gpu_section(previous: Path) -> str:
    """Keep a GPU section someone recorded by hand; otherwise the placeholder."""
    if previous.is_file():
        text = previous.read_text()
        if GPU_HEADING + "\n" in text:
            section = text[text.index(GPU_HEADING + "\n"):].rstrip() + "\n"
            if GPU_PLACEHOLDER not in section:
                return section
    return f"{GPU_HEADING}\n\n{GPU_PLACEHOLDER} (The tables above are CPU-only.) On a GPU host run " \
           "`make bench` there: TensorRT FP16 and PyTorch CUDA rows are added automatically when TensorRT " \
           "and a CUDA GPU are present.\n"


def _memory(mem: dict[str, Any]) -> list[str]:
    """Peak RSS per stage and model against the bound (benchmarks/memory.py)."""
    stages = ("export", "fp16", "repository", "parity")
    lines = ["## Memory: peak RSS per stage", "",
             f"Each stage is its own `clip-triton` process (random weights); peak = that process's own peak RSS "
             f"(VmHWM), in GiB, and its multiple of W_tower. W_tower = the largest tower's FP32 graph bytes; "
             f"bound = {mem['bound']}; docs/engines.md, \"Memory\". `parity` starts the embedded tritonserver: "
             "its summed RSS (server + python stubs) is given in brackets, not judged by the bound. "
             f"Calibration budget: {mem.get('calibration_bytes', 'default')}.", "",
             "| model | W GiB | W_tower GiB | bound GiB | " + " | ".join(stages) + " | within bound |",
             "|---|---:|---:|---:|" + "---:|" * len(stages) + "---|"]
    for model, entry in mem["models"].items():
        cells = []
        for stage in stages:
            r = entry["stages"].get(stage)
            if r is None:
                asked = stage in entry.get("stages_requested", stages)
                cells.append("not run" if asked else "not asked (`--stages`)")
                continue
            if r.get("rc"):
                cells.append(f"**failed** ({_f(r.get('peak_gib'), 2)}): {r.get('error', '')[:60]}")
                continue
            cell = f"{_f(r.get('peak_gib'), 2)} ({_f(r.get('multiple_of_w_tower'), 1)}x)"
            if r.get("pass") is False:
                cell = f"**{cell} over**"
            if stage == "parity" and r.get("children_gib"):
                cell += f" [server {_f(r['children_gib'], 2)}]"
            cells.append(cell)
        verdict = "yes" if entry.get("pass") else "**no**"
        lines.append(f"| {model} | {_f(entry.get('w_gib'), 2)} | {_f(entry.get('w_tower_max_gib'), 2)} | "
                     f"{_f(entry.get('bound_gib'), 2)} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Stage commands (E, R: the work folder's export and repository): "
              "`clip-triton export --model M --random-weights --out E`, `clip-triton fp16 --export E`, "
              "`clip-triton repository --export E --out R --runtime python`, "
              "`clip-triton parity --export E --repository R`; each under `/usr/bin/time -v` "
              "(its figure, the largest single process of the tree, is in results.json as `time_v_gib`). "
              "A row run with `--stages` lacking `repository` ran parity without `--repository`: the ONNX graphs "
              "against PyTorch, no server.", ""]
    return lines


def render(results: dict[str, Any], previous: Path) -> str:
    lines = ["# Benchmarks", "",
             "Written by `benchmarks/run.py` (`make bench`; `make bench-quick` for a short smoke run into "
             "`$(OUT)/bench-quick`). Raw numbers: `results.json`; plots: `encoders_<model>.png`, "
             "`preprocess.png`, `load.png`, `memory.png`.", "", "## Run", ""]
    lines += _machine(results)
    lines.append("")
    if results.get("encoders"):
        lines += _encoders(results["encoders"])
    if results.get("preprocess"):
        lines += _preprocess(results["preprocess"])
    if results.get("load"):
        lines += _load(results["load"])
    if results.get("memory"):
        lines += _memory(results["memory"])
    lines += ["## Not measured here, and why", ""]
    lines += [f"- {item}" for item in results.get("not_measured", [])]
    lines.append("")
    return "\n".join(lines) + "\n" + _gpu_section(previous)
