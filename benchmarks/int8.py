"""ONNX Runtime INT8 (the quantize stage's Q/DQ graphs) vs ONNX Runtime FP32, per tower, in one run.

    python -m benchmarks.int8 --export EXPORT [--batches 1,8,32] [--threads 2] [--out benchmarks/int8.json]

EXPORT holds the FP32 graphs and `clip-triton quantize`'s image/text_encoder.int8.onnx. Both sessions of a
tower are open at once and timed in turn (interleaved repeats; the fastest call of each, the figure least
moved by other jobs on a shared host, and the median beside it);
min cosine is INT8 vs FP32 on the same inputs (parity's synthetic inputs: `samples.sample_pixels` and the
built-in captions). Results: docs/int8.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from clip_triton.exporter.base.manifest import ARTIFACTS, TOWERS, load_manifest
from clip_triton.exporter.parity.metrics import cosine_rows
from clip_triton.exporter.parity.samples import SAMPLE_TEXTS, sample_pixels, synthetic_token_ids
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session


def _inputs(export: Path, tower: str, batch: int) -> np.ndarray:
    manifest = load_manifest(export)
    if tower == "image":
        return sample_pixels(manifest.preprocess, batch, seed=7)
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(batch)]
    try:
        import open_clip

        ids = np.asarray(open_clip.get_tokenizer(manifest.model_name)(texts))
    except Exception:  # noqa: BLE001 - no tokenizer here: shaped like real ids
        ids = synthetic_token_ids(texts, manifest.tokenizer)
    return ids.astype(manifest.text.input.dtype)


def run(export: Path, batches: list[int], threads: int) -> list[dict]:
    manifest = load_manifest(export)
    rows = []
    for tower in TOWERS:
        paths = {"fp32": export / manifest.tower(tower).file, "int8": export / ARTIFACTS[("onnx", "int8")][tower]}
        sessions = {k: ort_session(p, threads=threads) for k, p in paths.items()}
        for batch in batches:
            x = _inputs(export, tower, batch)
            outs = {k: ort_embed(s, x) for k, s in sessions.items()}  # warm-up and the cosine
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(max(4, 32 // batch)):
                for k, s in sessions.items():
                    start = time.perf_counter()
                    ort_embed(s, x)
                    times[k].append(time.perf_counter() - start)
            best = {k: float(np.min(v)) for k, v in times.items()}
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append({
                "tower": tower, "batch": batch,
                "fp32_ms": round(1000 * best["fp32"], 1), "int8_ms": round(1000 * best["int8"], 1),
                "speedup": round(best["fp32"] / best["int8"], 2),
                "median_speedup": round(med["fp32"] / med["int8"], 2),
                "min_cosine": round(float(cosine_rows(outs["fp32"], outs["int8"]).min()), 6),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.export, [int(b) for b in args.batches.split(",")], args.threads)
    if args.out is not None:
        args.out.write_text(json.dumps({"export": str(args.export), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
