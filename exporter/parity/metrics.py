"""Numbers that judge embeddings: numpy only, no other project module (a leaf every stage may use).

Cosine is computed per row (per sample), never over a flattened batch: one bad embedding in a
batch of many must fail the check (Polygraphy's cosine judges the batch as one vector).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def cosine_rows(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `other` with the same row of `reference`."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(other, dtype=np.float64).reshape(len(other), -1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: reference {a.shape} vs {b.shape}")
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # A zero or non-finite row scores 0 (or NaN -> 0): it can never pass a threshold by accident.
    cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0)


def compare_embeddings(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Min and mean per-row cosine and max absolute difference of two [B, D] embedding arrays."""
    cos = cosine_rows(reference, other)
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64))
    return {
        "samples": int(len(cos)),
        "min_cosine": float(cos.min()) if len(cos) else float("nan"),
        "mean_cosine": float(cos.mean()) if len(cos) else float("nan"),
        "max_abs_diff": float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0,
    }


def worst_of(batches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst figures over several comparisons (one per batch size), and the comparisons themselves."""
    worst = min(batches.values(), key=lambda r: r["min_cosine"])
    return {
        "min_cosine": worst["min_cosine"],
        "mean_cosine": min(r["mean_cosine"] for r in batches.values()),
        "max_abs_diff": max(r["max_abs_diff"] for r in batches.values()),
        "batches": batches,
    }


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top1(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """For each image, the index of the most similar text."""
    return np.argmax(normalise(images) @ normalise(texts).T, axis=1)


# ---------------------------------------------------------------------------------------------
# Accuracy on a labelled set (docs/design.md, "Parity"): what a user of the embeddings sees.
# ---------------------------------------------------------------------------------------------


def class_embeddings(texts: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """Prompt ensembling: per class, the re-normalised mean of its prompts' normalised rows of `texts`."""
    if not groups or any(not g for g in groups):
        raise ValueError("every class needs at least one prompt")
    rows = normalise(texts)
    return normalise(np.stack([rows[list(group)].mean(axis=0) for group in groups]))


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of `predicted` equal to `truth` (NaN for none)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"shape mismatch: {predicted.shape} predictions vs {truth.shape} labels")
    return float(np.mean(predicted == truth)) if len(truth) else float("nan")


def agreement(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Share of items whose prediction equals the reference's prediction for the same item."""
    return accuracy(predicted, reference)


def recall_at_k(similarity: np.ndarray, positives: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Retrieval recall: per query (row of `similarity`), whether any of its positives (True in the
    same row of `positives`) ranks in the top k; the share of queries with a hit, per k.

    Queries without a positive are left out. Ties rank in index order (a stable sort), so a constant
    similarity row is not a free hit."""
    sim = np.nan_to_num(np.asarray(similarity, np.float64), nan=-np.inf)
    pos = np.asarray(positives, bool)
    if sim.shape != pos.shape:
        raise ValueError(f"shape mismatch: similarity {sim.shape} vs positives {pos.shape}")
    keep = pos.any(axis=1)
    sim, pos = sim[keep], pos[keep]
    if not len(sim):
        return {k: float("nan") for k in ks}
    order = np.argsort(-sim, axis=1, kind="stable")
    hit_rank = np.argmax(np.take_along_axis(pos, order, axis=1), axis=1)  # rank of the first positive
    return {k: float(np.mean(hit_rank < k)) for k in ks}
