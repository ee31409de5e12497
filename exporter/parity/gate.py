"""The stage gate: a stage's own runtime against PyTorch FP32, tower by tower, before it writes anything.

`export` (ONNX Runtime FP32), `fp16` (ONNX Runtime FP16) and `engines` (TensorRT) each embed the
same synthetic inputs (`VERIFY_BATCHES`) with PyTorch and with what they produced, and refuse below
their min cosine with one ParityError (exit 1) naming the stage and every tower that failed. A next
precision stage (INT8) is one `gate_towers` call with its own per-tower check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ParityError, Progress
from clip_triton.exporter.base.manifest import TOWERS
from clip_triton.exporter.parity.metrics import compare_embeddings, worst_of
from clip_triton.exporter.parity.samples import sample_inputs
from clip_triton.exporter.runtimes.torch import torch_embed
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
