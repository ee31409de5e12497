"""The per-request time budget both python steps (preprocess, tokenize) keep: `max_request_seconds`.

Copied beside each python model.py (docs/limits.md, "Per-request time budget"). Standard library only.
"""

import math

DEFAULT_MAX_REQUEST_SECONDS = 10.0


def read_budget(value):
    """The model parameter (a string; empty: the default) as seconds; 0 turns the budget off."""
    seconds = float(value) if value not in (None, "") else DEFAULT_MAX_REQUEST_SECONDS
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"max_request_seconds must be a finite number >= 0, got {seconds}")
    return seconds


def over_budget(input_name, elapsed, budget, done, total, verb):
    """The one-line error of a request stopped by its budget (INTERNAL: not the items' fault)."""
    return (
        f"{input_name}: request stopped after {elapsed:.2f} s, over its time budget of {budget:g} s "
        f"(model parameter max_request_seconds): {done} of {total} items {verb}, the other {total - done} "
        "not processed"
    )
