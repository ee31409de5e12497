"""Judging and reporting parity: typed stage results from what the runners produced.

`clip_triton.exporter.parity.run` runs the runners (the comparator); this module decides pass or fail against
the thresholds and writes the reports (Polygraphy keeps these two apart in the same way:
`Comparator.run` then `Comparator.compare_accuracy`). Reports are rendered from the JSON form
(`StageResult.to_dict`), so a parity.json on disk renders the same table again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import staged_file
from clip_triton.exporter.base.manifest import TOWERS
from clip_triton.exporter.parity.metrics import compare_embeddings, cosine_rows, normalise, top1
from clip_triton.exporter.parity.samples import SampleSet

MIN_COSINE_FP32 = 0.99999
MIN_COSINE_FP16 = 0.999
PIXEL_TOLERANCE = 1e-6
PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@dataclass
class TowerFigures:
    """One tower of one stage against the reference."""

    samples: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    status: str
    zero_shot: dict[str, float] = field(default_factory=dict)
    worst_sample: str | None = None


@dataclass
class StageResult:
    """One row group of the report: an embedding stage (both towers), an equality check, a skip or an error."""

    stage: str
    status: str
    tower: str | None = None  # equality checks and errors that belong to one tower
    runner: str | None = None
    precision: str | None = None
    threshold: float | None = None
    towers: dict[str, TowerFigures] | None = None
    zero_shot: dict[str, float] | None = None
    failures: list[str] | None = None
    reason: str | None = None
    note: str | None = None
    seconds: float | None = None
    # equality checks (server preprocessing and tokenisation)
    dtype: str | None = None
    max_abs_diff: float | None = None
    worst_sample: str | None = None
    mismatched: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _drop_none(asdict(self))
        if self.towers is not None:
            data["towers"] = {t: _drop_none(asdict(f)) for t, f in self.towers.items()}
        return data

    def failure_lines(self) -> list[str]:
        if self.status == ERROR:
            return [f"{self.stage}: {self.reason}"]
        return list(self.failures or []) if self.status == FAIL else []


@dataclass
class EmbeddingRun:
    """What running one runner over the samples produced (clip_triton.exporter.parity.run), before any judging."""

    name: str
    runner: str  # its description
    precision: str  # tolerance class
    embeds: dict[str, np.ndarray] | None = None
    error: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------


def zero_shot_agreement(
    ref: dict[str, np.ndarray], images: np.ndarray, texts: np.ndarray, samples: SampleSet
) -> dict[str, float]:
    """Fraction of images whose top-1 caption / label is the one PyTorch picks (labels: mean of
    their prompt embeddings)."""

    def picks(images: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        captions = texts[: samples.n_captions]
        if len(captions):
            out["captions"] = top1(images, captions)
        prompts = normalise(texts[samples.n_captions :]).reshape(len(samples.labels), samples.templates, -1)
        out["labels"] = top1(images, prompts.mean(axis=1))
        return out

    want, got = picks(ref["image"], ref["text"]), picks(images, texts)
    return {key: float(np.mean(got[key] == want[key])) for key in want}


def judge_embeddings(
    run: EmbeddingRun,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    text_ids_real: bool = True,
) -> StageResult:
    """Pass when every tower's worst sample reaches the runner's threshold."""
    threshold = thresholds[run.precision]
    result = StageResult(
        stage=run.name, status=ERROR, runner=run.runner, precision=run.precision, threshold=threshold,
        seconds=round(run.seconds, 2),
    )
    if run.embeds is None:
        result.reason = run.error or "no embeddings"
        return result
    for tower in TOWERS:
        if run.embeds[tower].shape != ref[tower].shape:
            result.reason = f"{tower} embeddings have shape {run.embeds[tower].shape}, expected {ref[tower].shape}"
            return result
    names = {"image": samples.image_names, "text": samples.texts.raw}
    towers: dict[str, TowerFigures] = {}
    failures = []
    for tower in TOWERS:
        fig = compare_embeddings(ref[tower], run.embeds[tower])
        cos = cosine_rows(ref[tower], run.embeds[tower])
        # Per tower: the other tower stays PyTorch's, so a drop is this tower's own doing.
        other = {"image": (run.embeds["image"], ref["text"]), "text": (ref["image"], run.embeds["text"])}[tower]
        figures = TowerFigures(
            samples=fig["samples"], min_cosine=fig["min_cosine"], mean_cosine=fig["mean_cosine"],
            max_abs_diff=fig["max_abs_diff"], status=PASS if fig["min_cosine"] >= threshold else FAIL,
            zero_shot=zero_shot_agreement(ref, *other, samples),
            worst_sample=str(names[tower][int(np.argmin(cos))]) if len(cos) else None,
        )
        if figures.status == FAIL:
            failures.append(
                f"{run.name} {tower} tower: min cosine {figures.min_cosine:.6f} < {threshold} "
                f"(worst sample: {figures.worst_sample or '?'!r:.60})"
            )
        towers[tower] = figures
    result.status = FAIL if failures else PASS
    result.towers = towers
    result.zero_shot = zero_shot_agreement(ref, run.embeds["image"], run.embeds["text"], samples)
    result.failures = failures
    if not text_ids_real:
        result.note = "text compared on synthetic token ids (no tokenizer available here)"
    return result


def judge_pixels(stage: str, pixels: np.ndarray, samples: SampleSet) -> StageResult:
    """Server preprocessing vs open_clip's transform: every pixel within PIXEL_TOLERANCE."""
    want = samples.images.tensor
    if pixels.shape != want.shape:
        return StageResult(stage=stage, status=FAIL, tower="image", failures=[
            f"{stage}: pixel tensors have shape {pixels.shape}, expected {want.shape}"])
    diff = np.abs(pixels.astype(np.float64) - want).reshape(len(want), -1).max(axis=1)
    bad = [samples.image_names[i] for i in np.flatnonzero(~(diff < PIXEL_TOLERANCE))]
    return StageResult(
        stage=stage, status=FAIL if bad else PASS, tower="image", threshold=PIXEL_TOLERANCE,
        max_abs_diff=float(diff.max()), worst_sample=samples.image_names[int(np.argmax(diff))], mismatched=bad,
        failures=[f"{stage} image: pixels differ from open_clip in {len(bad)}/{len(want)} images "
                  f"(max abs diff {diff.max():.3g} >= {PIXEL_TOLERANCE}; e.g. {bad[0]})"] if bad else [],
    )


def judge_ids(stage: str, ids: np.ndarray, samples: SampleSet) -> StageResult:
    """Server tokenisation vs open_clip's tokenizer: equal ids, caption by caption."""
    want = samples.texts.tensor
    if ids.shape != want.shape:
        return StageResult(stage=stage, status=FAIL, tower="text", failures=[
            f"{stage}: ids have shape {ids.shape}, expected {want.shape}"])
    rows = np.flatnonzero((ids.astype(np.int64) != want.astype(np.int64)).any(axis=1))
    bad = [samples.texts.raw[i] for i in rows]
    return StageResult(
        stage=stage, status=FAIL if bad else PASS, tower="text", dtype=str(ids.dtype), mismatched=bad,
        failures=[f"{stage} text: ids differ from open_clip in {len(bad)}/{len(want)} captions "
                  f"(e.g. {bad[0]!r:.60})"] if bad else [],
    )


# ---------------------------------------------------------------------------------------------
# Reports (from the JSON form)
# ---------------------------------------------------------------------------------------------


def _rows(result: dict[str, Any]) -> list[list[str]]:
    """One table row per stage and tower: the figures, then a note (worst sample, skip reason)."""
    rows = []
    n_texts = len(result["samples"]["captions"]) + result["samples"]["prompts"]
    for stage in result["stages"]:
        name, status = stage["stage"], stage["status"]
        if "towers" in stage:
            for tower, fig in stage["towers"].items():
                zs = fig.get("zero_shot", {})
                note = f"worst: {fig['worst_sample']}" if fig["status"] == FAIL else stage.get("note", "")
                rows.append([
                    name, tower, fig["status"].upper(), f"{stage['threshold']:g}", f"{fig['min_cosine']:.7f}",
                    f"{fig['mean_cosine']:.7f}", f"{fig['max_abs_diff']:.2e}",
                    _pct(zs.get("captions")), _pct(zs.get("labels")), note[:80],
                ])
        elif status in (PASS, FAIL) and "max_abs_diff" in stage:
            bad = stage.get("mismatched", [])
            note = f"{len(bad)} images differ, e.g. {bad[0]}" if bad else ""
            rows.append([name, "pixels", status.upper(), f"<{stage['threshold']:g}", "", "",
                         f"{stage['max_abs_diff']:.2e}", "", "", note])
        elif status in (PASS, FAIL) and name == "triton-tokenize":
            bad = stage.get("mismatched", [])
            note = f"{n_texts - len(bad)}/{n_texts} captions equal" + (f", e.g. {bad[0]!r:.40}" if bad else "")
            rows.append([name, "ids", status.upper(), "equal", "", "", "", "", "", note])
        else:
            reason = stage.get("reason") or "; ".join(stage.get("failures", []))
            rows.append([name, stage.get("tower", "-"), status.upper(), "", "", "", "", "", "", reason])
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


HEADER = [
    "stage", "tower", "status", "threshold", "min cos", "mean cos", "max abs diff", "zs captions", "zs labels",
    "note",
]


def format_table(result: dict[str, Any]) -> str:
    rows = [HEADER, *_rows(result)]
    # The last column (a note, a skip reason) is left unpadded.
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1]).rstrip()
             for row in rows]
    lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failures"])
    return "\n".join([*lines, "", f"parity {verdict}"])


def format_markdown(result: dict[str, Any]) -> str:
    head = "| " + " | ".join(HEADER) + " |"
    rule = "|" + "|".join("---" for _ in HEADER) + "|"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(result)]
    n_img, n_cap = len(result["samples"]["images"]), len(result["samples"]["captions"])
    verdict = "**passed**" if result["passed"] else "**FAILED**"
    lines = [
        f"# Parity report: {result['model']}",
        "",
        f"Parity {verdict} ({result['created']}, {result['seconds']} s). Every stage is compared with the "
        f"PyTorch FP32 reference on {n_img} images, {n_cap} captions and {result['samples']['prompts']} "
        f"zero-shot prompts. Thresholds: min cosine {result['thresholds']['fp32']} (fp32), "
        f"{result['thresholds']['fp16']} (fp16); server pixels max abs diff < "
        f"{result['thresholds']['pixels_max_abs_diff']:g}; token ids equal.",
        "",
        "Zero-shot columns: share of images whose top-1 caption / label is the one PyTorch picks "
        "(per tower: the other tower stays PyTorch's).",
        "",
        head,
        rule,
        *body,
    ]
    if result["failures"]:
        lines += ["", "## Failures", "", *[f"- {line}" for line in result["failures"]]]
    if result.get("random_weights"):
        lines += ["", "_Random weights: embeddings are meaningless; zero-shot agreement is near ties._"]
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], report: Path, markdown: Path) -> None:
    for dest, text in ((report, json.dumps(result, indent=2, ensure_ascii=False) + "\n"),
                       (markdown, format_markdown(result))):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")


def summary(result: dict[str, Any], report: Path | None = None) -> dict[str, Any]:
    """The compact record kept in manifest.parity."""
    stages = {}
    for stage in result["stages"]:
        entry: dict[str, Any] = {"status": stage["status"]}
        if "towers" in stage:
            entry["threshold"] = stage["threshold"]
            for tower, fig in stage["towers"].items():
                entry[f"{tower}_min_cosine"] = fig["min_cosine"]
            entry["zero_shot"] = stage.get("zero_shot")
        if "max_abs_diff" in stage:
            entry["max_abs_diff"] = stage["max_abs_diff"]
        if "reason" in stage:
            entry["reason"] = stage["reason"]
        stages[stage["stage"]] = entry
    return {
        "passed": result["passed"],
        "created": result["created"],
        "thresholds": result["thresholds"],
        "samples": {"images": len(result["samples"]["images"]), "captions": len(result["samples"]["captions"])},
        "stages": stages,
        "report": str(report) if report is not None else None,
    }
