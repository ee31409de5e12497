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
