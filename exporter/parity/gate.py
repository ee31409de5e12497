"""The stage gate: a stage's own runtime against PyTorch FP32, tower by tower, before it writes anything.

`export` (ONNX Runtime FP32), `fp16` (ONNX Runtime FP16) and `engines` (TensorRT) each embed the
same synthetic inputs (`VERIFY_BATCHES`) with PyTorch and with what they produced, and refuse below
their min cosine with one ParityError (exit 1) naming the stage and every tower that failed. The INT8
stage (`quantize`) adds the accuracy gate: `labelled_references` (PyTorch on the labelled set and the
user's own images and captions), then `gate_agreement` on the candidate's embeddings of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ParityError, Progress
from clip_triton.exporter.base.manifest import TOWERS, Manifest
from clip_triton.exporter.parity.metrics import agreement, compare_embeddings, top1, worst_of
from clip_triton.exporter.parity.samples import (
    ImageSample,
    LabelledSet,
    SampleSet,
    build_samples,
    reference_pixels,
    reference_transform,
    sample_inputs,
    synthetic_token_ids,
)
from clip_triton.exporter.runtimes.base import TowerBatch
from clip_triton.exporter.runtimes.torch import TorchRunner, torch_embed
from clip_triton.exporter.sources import LoadedModel

# The batch sizes every stage gate checks: 1 (no batching) and 8 (rows that must not mix).
VERIFY_BATCHES = (1, 8)

# Per batch size: (the inputs, PyTorch's embeddings of them).
References = dict[int, tuple[np.ndarray, np.ndarray]]


def torch_references(
    module: Any, loaded: LoadedModel, tower: str, batches: Iterable[int] = VERIFY_BATCHES
) -> References:
    """(inputs, PyTorch embeddings) per batch size: computed before any other runtime's session opens,
    so the model can be released first (docs/engines.md, "Memory")."""
    out = {}
    for batch in batches:
        inputs = sample_inputs(loaded, tower, batch)
        out[batch] = (inputs, torch_embed(module, inputs))
    return out


def compare_references(
    references: References,
    embed: Callable[[np.ndarray], np.ndarray],
    *,
    finite: bool = False,
    outputs: dict[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`embed` (the candidate runtime) vs the PyTorch references at each batch size; the worst figures.

    `finite`: also record whether every output value is finite, per batch and overall. `outputs`, when
    given, receives the candidate's embeddings per batch size."""
    results = {}
    for batch, (inputs, ref) in references.items():
        out = embed(inputs)
        results[f"batch_{batch}"] = compare_embeddings(ref, out)
        if finite:
            results[f"batch_{batch}"]["finite"] = bool(np.isfinite(out).all())
        if outputs is not None:
            outputs[batch] = out
    record = worst_of(results)
    if finite:
        record["finite"] = all(r["finite"] for r in results.values())
    return record


def gate_towers(
    check: Callable[[str], dict[str, Any]],
    *,
    stage: str,
    threshold: float,
    compared_with: str,
    progress: Progress,
    order: Iterable[str] = TOWERS,
    refused: str = "",
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `check(tower)` for each tower in `order` and refuse the stage if any is below `threshold`.

    `check` returns the tower's manifest record, with `min_cosine` (`compare_references` gives one).
    Each tower's min cosine goes to `progress` (with `describe(record)` in brackets when given); then,
    with every tower checked, one ParityError lists each tower below the threshold:
    "<stage> parity failed: image tower min cosine 0.991234 < 0.999 (<compared_with>); <refused>".
    Returns the records in TOWERS order (the manifest's)."""
    records: dict[str, dict[str, Any]] = {}
    for tower in order:
        records[tower] = check(tower)
        extra = f" ({describe(records[tower])})" if describe is not None else ""
        progress.info(f"{tower} tower: min cosine {records[tower]['min_cosine']:.7f}{extra}")
    ordered = {tower: records[tower] for tower in TOWERS if tower in records}
    bad = [tower for tower, record in ordered.items() if not record["min_cosine"] >= threshold]  # NaN fails
    if bad:
        detail = ", ".join(f"{tower} tower min cosine {ordered[tower]['min_cosine']:.6f}" for tower in bad)
        raise ParityError(
            f"{stage} parity failed: {detail} < {threshold} ({compared_with})" + (f"; {refused}" if refused else "")
        )
    return ordered


# ---------------------------------------------------------------------------------------------
# The accuracy gate: decisions, not only cosines (the quantize stage; docs/int8.md, "The gate")
# ---------------------------------------------------------------------------------------------

ACCURACY_BATCH = 16  # rows per call while embedding the labelled set


@dataclass
class AccuracyCheck:
    """The labelled set (and the user's own images and captions) with PyTorch's embeddings of them.

    `inputs[tower]`: the labelled set's rows (as `samples` lays them out: judge_accuracy reads them), then
    `user_images` images / `user_texts` captions of the user's at the end."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    samples: SampleSet | None
    user_images: int = 0
    user_texts: int = 0

    def embed(self, tower: str, embed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        rows = self.inputs[tower]
        return np.concatenate(
            [embed(rows[i : i + ACCURACY_BATCH]) for i in range(0, len(rows), ACCURACY_BATCH)], axis=0
        ).astype(np.float32)


def labelled_references(
    manifest: Manifest,
    loaded: LoadedModel,
    labelled: LabelledSet | None,
    user_images: list[ImageSample] | None = None,
    user_texts: list[str] | None = None,
) -> AccuracyCheck | None:
    """PyTorch's embeddings of the labelled set and of the user's images and captions (their top-1
    caption is the decision checked: at least one image and two captions). None when there is neither."""
    user_images = list(user_images or [])
    user_texts = list(user_texts or [])
    if not (user_images and len(user_texts) >= 2):
        user_images, user_texts = [], []
    if labelled is None and not user_images:
        return None
    inputs: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    samples = None
    if labelled is not None:
        samples, _ = build_samples(manifest, loaded, 0, labelled=labelled)
        inputs["image"].append(samples.images.tensor)
        inputs["text"].append(samples.texts.tensor)
    if user_images:
        transform = getattr(loaded, "image_reference", None) or reference_transform(manifest)
        inputs["image"].append(reference_pixels(transform, user_images).astype(manifest.image.input.dtype))
        if loaded.tokenizer is not None:
            ids = np.asarray(loaded.tokenizer(user_texts))
        else:
            ids = synthetic_token_ids(user_texts, manifest.tokenizer)
        inputs["text"].append(ids.astype(manifest.text.input.dtype))
    rows = {tower: np.concatenate(parts, axis=0) for tower, parts in inputs.items()}
    runner = TorchRunner(loaded)
    runner.open()
    try:
        reference = {tower: runner.embed_all(tower, TowerBatch(rows[tower])) for tower in TOWERS}
    finally:
        runner.close()
    return AccuracyCheck(rows, reference, samples, len(user_images), len(user_texts))


def accuracy_rows(check: AccuracyCheck, embeds: dict[str, np.ndarray], threshold: float) -> list[dict[str, Any]]:
    """The labelled set's rows (report.judge_accuracy: every class row gated) and, with the user's data,
    a `yours/captions` row: the share of their images whose top-1 caption is PyTorch's."""
    from clip_triton.exporter.parity.report import FAIL, PASS, judge_accuracy

    rows: list[dict[str, Any]] = []
    if check.samples is not None:
        for row in judge_accuracy(check.samples, check.reference, embeds, threshold):
            rows.append({k: v for k, v in asdict(row).items() if v is not None})
    if check.user_images:
        ni, nt = check.user_images, check.user_texts
        want = top1(check.reference["image"][-ni:], check.reference["text"][-nt:])
        got = top1(embeds["image"][-ni:], embeds["text"][-nt:])
        share = agreement(got, want)
        rows.append({
            "set": "yours/captions", "images": ni, "captions": nt, "agreement": share,
            "changed": int(np.sum(got != want)), "min_agreement": threshold,
            "status": PASS if share >= threshold else FAIL,
        })
    return rows


def gate_agreement(
    check: AccuracyCheck,
    embeds: dict[str, np.ndarray],
    *,
    stage: str,
    threshold: float,
    progress: Progress,
    refused: str = "",
) -> list[dict[str, Any]]:
    """Refuse the stage when a gated row's top-1 agreement with PyTorch is below `threshold`: one
    ParityError, "<stage> accuracy gate failed: shapes/shape_colour agreement 0.9000 < 0.95 (12/120 images
    changed their pick vs PyTorch FP32); <refused>". Returns the rows (for the manifest)."""
    rows = accuracy_rows(check, embeds, threshold)
    for row in rows:
        progress.info(f"{row['set']}: top-1 agreement with PyTorch {row['agreement']:.4f} ({row['changed']} changed)")
    bad = [row for row in rows if row.get("min_agreement") is not None and not row["agreement"] >= threshold]
    if bad:
        detail = ", ".join(
            f"{row['set']} agreement {row['agreement']:.4f} "
            f"({row['changed']}/{row['images']} images changed their pick)"
            for row in bad
        )
        raise ParityError(
            f"{stage} accuracy gate failed: {detail} < {threshold} vs PyTorch FP32"
            + (f"; {refused}" if refused else "")
        )
    return rows
