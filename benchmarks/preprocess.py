"""Server-side preprocessing and tokenisation, in-process: the very code the python models run.

On a GPU the encoders take milliseconds and the python steps (PIL decode + resize, BPE) often
become the bottleneck (triton-inference-server/server#5317, #5865): measured here per instance
(one thread, as one python-backend instance runs).

Paths for images (same Preprocessor, different decode):
  exact   `Preprocessor.from_bytes` of clients/clip_preprocess.py (the default;
          pixel-identical to open_clip)
  draft   JPEG only: `img.draft(mode, (2*S, 2*S))` before decoding, so libjpeg decodes at a
          1/2, 1/4 or 1/8 scale (DCT scaling) that still leaves at least 2x the target size;
          then the exact resize + crop. Other formats: as exact.
  reduce  any format: full decode, then `Image.reduce(k)` (box filter, integer k) down to at
          least 2x the target size, then the exact resize + crop.
Neither fast path is bit-exact: their max / mean abs difference against open_clip's own
transform is measured and reported. They are opt-in trade-offs, not the served default.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import asdict
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks.common import Settings, latency_stats, time_calls
from clip_triton.exporter.base.common import Progress

# Photo-like sizes a client sends, on top of clip_triton.exporter.parity.samples' odd sizes/modes/formats.
# The 12-megapixel noise JPEG (~11 MB) is the worst case for decoding, not a typical photo.
EXTRA_IMAGES = [
    ("shapes", 640, 480, "RGB", "JPEG"),
    ("gradient", 1280, 720, "RGB", "JPEG"),
    ("shapes", 1920, 1080, "RGB", "JPEG"),
    ("noise", 4032, 3024, "RGB", "JPEG"),
    ("text", 1920, 1080, "RGB", "PNG"),
    ("checker", 1600, 1200, "RGB", "WEBP"),
]


def clip_preprocess() -> ModuleType:
    """clients/clip_preprocess.py: the preprocess model's own code."""
    from clip_triton.clients import clip_preprocess

    return clip_preprocess


def sample_images(quick: bool) -> list[tuple[str, bytes]]:
    from clip_triton.exporter.parity.samples import builtin_images, render_image

    images = [(s.name, s.data) for s in builtin_images(8 if quick else 16)]
    extra = EXTRA_IMAGES[:4] if quick else EXTRA_IMAGES
    images += [
        (f"extra-{p}-{w}x{h}-{mode}.{fmt.lower()}", render_image(p, w, h, mode, fmt, seed=i))
        for i, (p, w, h, mode, fmt) in enumerate(extra)
    ]
    return images


def _paths(pre: Any) -> dict[str, Callable[[bytes], np.ndarray]]:
    from PIL import Image

    decode = clip_preprocess().decode
    target = 2 * max(pre.size)

    def exact(data: bytes) -> np.ndarray:
        return pre.from_bytes(data)

    def draft(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft(img.mode, (target, target))  # scale chosen so both edges stay >= target
        img.load()
        return pre(img)

    def reduce(data: bytes) -> np.ndarray:
        img = decode(data)
        factor = min(img.width // target, img.height // target)
        if factor >= 2:
            img = img.reduce(factor)
        return pre(img)

    return {"exact": exact, "draft": draft, "reduce": reduce}


def _open_clip_reference(cfg: dict[str, Any]) -> Callable[[bytes], np.ndarray]:
    """open_clip's own eval transform (torchvision on PIL): the parity reference."""
    import open_clip
    from PIL import Image

    size = cfg["size"]
    transform = open_clip.image_transform(
        tuple(size) if size[0] != size[1] else size[0],
        is_train=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
        fill_color=cfg["fill_color"],
    )

    def reference(data: bytes) -> np.ndarray:
        return transform(Image.open(io.BytesIO(data))).numpy()

    return reference


def bench_images(manifest_preprocess: Any, settings: Settings, progress: Progress) -> dict[str, Any]:
    cfg = asdict(manifest_preprocess)
    pre = clip_preprocess().Preprocessor.from_config(cfg)
    paths = _paths(pre)
    reference = _open_clip_reference(cfg)
    std255 = np.asarray(cfg["std"], np.float32).reshape(3, 1, 1) * 255.0
    rows = []
    totals = {p: 0.0 for p in paths}
    for name, data in sample_images(settings.quick):
        ref = reference(data)
        row: dict[str, Any] = {"name": name, "bytes": len(data), "paths": {}}
        for path, fn in paths.items():
            out = fn(data)  # warm-up, and the parity sample
            samples = time_calls(lambda fn=fn, data=data: fn(data), settings.preprocess_budget_s, 3, 200)
            stats = latency_stats(samples)
            diff = np.abs(out - ref)
            stats.update(
                max_abs_diff=float(diff.max()),
                mean_abs_diff=float(diff.mean()),
                # The same difference in 8-bit pixel levels (undoing the normalisation).
                max_abs_diff_levels=float((diff * std255).max()),
                mean_abs_diff_levels=float((diff * std255).mean()),
            )
            row["paths"][path] = stats
            totals[path] += stats["median_ms"]
        exact_ms = row["paths"]["exact"]["median_ms"]
        for path in paths:
            row["paths"][path]["speedup_vs_exact"] = exact_ms / row["paths"][path]["median_ms"]
        rows.append(row)
        progress.info(
            f"  {name}: exact {row['paths']['exact']['median_ms']:.2f} ms, draft "
            f"{row['paths']['draft']['median_ms']:.2f} ms (max diff {row['paths']['draft']['max_abs_diff_levels']:.1f} "
            f"levels), reduce {row['paths']['reduce']['median_ms']:.2f} ms"
        )
    n = len(rows)
    summary = {
        path: {
            # The whole set once through, one item after another (one python-backend instance).
            "items_per_s": n / (total / 1000.0),
            "mean_ms_per_item": total / n,
            "max_abs_diff": max(r["paths"][path]["max_abs_diff"] for r in rows),
            "max_abs_diff_levels": max(r["paths"][path]["max_abs_diff_levels"] for r in rows),
            "mean_abs_diff_levels": float(np.mean([r["paths"][path]["mean_abs_diff_levels"] for r in rows])),
            "bit_exact": all(r["paths"][path]["max_abs_diff"] < 1e-6 for r in rows),
        }
        for path, total in totals.items()
    }
    return {"config": cfg, "images": rows, "summary": summary}


def bench_tokenizer(loaded: Any, settings: Settings, progress: Progress) -> dict[str, Any]:
    """The tokenize model's code (clip_tokenizer.make_tokenizer), per text and in batches of 64."""
    from clip_triton.exporter.base.tokenization import tokenizer_module
    from clip_triton.exporter.parity.samples import builtin_texts

    make_tokenizer = tokenizer_module().make_tokenizer
    cfg = loaded.tokenizer_cfg
    if cfg.kind != "clip":
        return {"skipped": f"tokenizer kind {cfg.kind!r} needs its tokenizer.json (not available offline)"}
    texts = builtin_texts(256)
    results: dict[str, Any] = {"texts": len(texts), "kind": cfg.kind, "context_length": cfg.context_length}
    # Cold: a fresh tokenizer (empty BPE cache), every text once. Warm: the long-running server case.
    start = time.perf_counter()
    tokenizer = make_tokenizer(cfg.kind, cfg.context_length, cfg.clean)
    results["init_ms"] = (time.perf_counter() - start) * 1000.0
    start = time.perf_counter()
    ids = np.concatenate([tokenizer([t]) for t in texts])
    results["cold_items_per_s"] = len(texts) / (time.perf_counter() - start)
    if loaded.tokenizer is not None:
        ref = np.asarray(loaded.tokenizer(texts))
        results["identical_to_open_clip"] = bool(np.array_equal(ids, ref))
    for batch in (1, 64):
        chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]

        def one_pass(chunks: list[list[str]] = chunks) -> None:
            for chunk in chunks:
                tokenizer(chunk)

        samples = time_calls(one_pass, settings.tokenize_budget_s, 2, 100)
        median = float(np.median(samples))
        results[f"batch_{batch}"] = {"items_per_s": len(texts) / median, "ms_per_item": median * 1000.0 / len(texts),
                                     "passes": len(samples)}
        progress.info(f"  tokenize, {batch} text(s) per call: {len(texts) / median:.0f} texts/s")
    return results


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    from clip_triton.exporter.sources.open_clip import load_model

    name = settings.models[0]
    loaded = load_model(name, random_weights=True, progress=Progress("load", quiet=True))
    with progress.step(f"preprocessing ({name}'s config), one instance, exact vs draft vs reduce"):
        images = bench_images(loaded.preprocess, settings, progress)
    with progress.step("tokenisation"):
        tokens = bench_tokenizer(loaded, settings, progress)
    return {"model": name, "images": images, "tokenize": tokens}
