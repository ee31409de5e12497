"""The results a benchmark run writes into --out: results.json, RESULTS.md and the PNG plots.

Shared by `python -m benchmarks.run` (every section) and `python -m benchmarks.memory` (the memory
section alone, merged into the same files), so neither imports the other.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from benchmarks.common import Settings, machine, now_utc, versions
from clip_triton.exporter.base.common import ClipTritonError

SECTIONS = ("encoders", "preprocess", "load", "memory")
NOT_MEASURED = [
    "perf_analyzer from PyPI's `perf-analyzer` wheels: they need glibc 2.38 (not on this machine). The copy "
    "inside the tritonclient 2.51.0 wheel (the embedded server's release) is used instead, from its own "
    "virtualenv (`make perf-tools`, benchmarks/perf_analyzer.py).",
    "GPU encoders and GPU-side decoding (DALI): no GPU here; the projection in the preprocessing section "
    "uses the measured per-core figure.",
]


def check_out(out: Path) -> None:
    """--out: a writable folder (created if missing), or one line, exit 2."""
    if out.exists() and not out.is_dir():
        raise ClipTritonError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ClipTritonError(f"--out {out} is not writable")


def base_results(settings: Settings, command: list[str], note: str = "") -> dict[str, Any]:
    """The header every results.json starts with."""
    return {
        "date": now_utc(),
        "command": " ".join(shlex.quote(str(a)) for a in command),
        "note": note,
        "machine": machine(),
        "versions": versions(),
        "settings": settings.to_dict(),
        "not_measured": list(NOT_MEASURED),
    }


def previous_section(out: Path, section: str) -> dict[str, Any] | None:
    """One section of the results.json already in `out`, if any."""
    try:
        return json.loads((out / "results.json").read_text()).get(section)
    except (OSError, ValueError):
        return None


def carry_over(results: dict[str, Any], previous: Path) -> None:
    """Sections this run did not measure keep the previous run's results, marked with its date, so
    `--sections load` refreshes one table without dropping the others from RESULTS.md."""
    if not previous.is_file():
        return
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    for section in SECTIONS:
        if section not in results and section in old:
            results[section] = old[section]
            results.setdefault("carried_over", {})[section] = old.get("carried_over", {}).get(section, old.get("date"))


def write(results: dict[str, Any], out: Path, plots: bool) -> list[Path]:
    """results.json, RESULTS.md and (with `plots`) the PNG plots; the files written."""
    from benchmarks.report import render

    files = [out / "results.json", out / "RESULTS.md"]
    files[0].write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    files[1].write_text(render(results, out / "RESULTS.md"))
    if plots:
        from benchmarks.plots import write_all

        files += write_all(results, out)
    return files
