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
from clip_triton.exporter.parity.metrics import (
    agreement,
    class_embeddings,
    compare_embeddings,
    cosine_rows,
    normalise,
    recall_at_k,
    top1,
)
from clip_triton.exporter.parity.samples import SampleSet

MIN_COSINE_FP32 = 0.99999
MIN_COSINE_FP16 = 0.999
# Labelled-set top-1 agreement with PyTorch (share of images whose predicted class is PyTorch's), per
# precision class: FP32 stages flip only exact near-ties (one image in 100 allowed); FP16 stages
# (and TensorRT) move cosines by ~1e-3, enough to flip a close call now and then (two in 100).
MIN_AGREEMENT_FP32 = 0.99
MIN_AGREEMENT_FP16 = 0.98
# INT8 (Q/DQ graphs, docs/int8.md): cosines move by ~1e-3..1e-2, and a close call flips more often.
MIN_COSINE_INT8 = 0.98
MIN_AGREEMENT_INT8 = 0.95
RECALL_KS = (1, 5)
DEFAULT_AGREEMENT = {"fp32": MIN_AGREEMENT_FP32, "fp16": MIN_AGREEMENT_FP16, "int8": MIN_AGREEMENT_INT8}
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
class AccuracyRow:
    """One stage on one labelling of the labelled set: its zero-shot top-1 (both towers its own),
    PyTorch's, their agreement, and retrieval recall where the set has captions.

    A label set's row (`set` "shapes/shape_colour") has top-1; the captions row ("shapes/captions")
    has recall, and its agreement is over each image's top-1 caption."""

    set: str
    images: int
    agreement: float
    changed: int  # images whose pick differs from PyTorch's
    status: str
    min_agreement: float | None = None
    top1: float | None = None
    reference_top1: float | None = None
    recall: dict[str, float] | None = None  # "i2t@1", "i2t@5", "t2i@1", "t2i@5"
    reference_recall: dict[str, float] | None = None


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
    accuracy: list[AccuracyRow] | None = None  # on the labelled set, when one is used
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
        if self.accuracy is not None:
            data["accuracy"] = [_drop_none(asdict(row)) for row in self.accuracy]
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
        prompts = texts[samples.n_captions : samples.n_captions + len(samples.prompts)]
        prompts = normalise(prompts).reshape(len(samples.labels), samples.templates, -1)
        out["labels"] = top1(images, prompts.mean(axis=1))
        return out

    want, got = picks(ref["image"], ref["text"]), picks(images, texts)
    return {key: float(np.mean(got[key] == want[key])) for key in want}


def _labelled_picks(samples: SampleSet, images: np.ndarray, texts: np.ndarray) -> dict[str, Any]:
    """Per label set, each labelled image's predicted class; with captions, each image's top-1 caption
    and the recall figures. `images`/`texts`: the embeddings of all samples (labelled rows last)."""
    labelled = samples.labelled
    assert labelled is not None
    start = samples.labelled_image_start
    image_rows = images[start : start + len(labelled.images)]
    text_rows = texts[samples.labelled_text_start :]
    index = {text: i for i, text in enumerate(labelled.texts())}
    out: dict[str, Any] = {}
    for label_set in labelled.label_sets:
        classes = class_embeddings(text_rows, [[index[p] for p in prompts] for prompts in label_set.prompts])
        out[label_set.name] = top1(image_rows, classes)
    if labelled.captions:
        caption_rows = text_rows[[index[c] for c in labelled.captions]]
        positives = np.zeros((len(labelled.images), len(labelled.captions)), bool)
        for image, caption in labelled.pairs:
            positives[image, caption] = True
        sim = normalise(image_rows) @ normalise(caption_rows).T
        i2t, t2i = recall_at_k(sim, positives, RECALL_KS), recall_at_k(sim.T, positives.T, RECALL_KS)
        out["captions"] = np.argmax(sim, axis=1)
        out["recall"] = {**{f"i2t@{k}": v for k, v in i2t.items()}, **{f"t2i@{k}": v for k, v in t2i.items()}}
    return out


def judge_accuracy(
    samples: SampleSet, ref: dict[str, np.ndarray], embeds: dict[str, np.ndarray] | None, min_agreement: float | None
) -> list[AccuracyRow]:
    """The labelled set's rows for one stage (`embeds`), or PyTorch's own (`embeds` None): top-1 and
    recall beside PyTorch's, and the agreement with PyTorch's picks, gated at `min_agreement`.

    The gate holds every class row. A captions row's agreement (same top-1 caption) is gated only when
    the set has no classes (a captions file): beside classes, its captions include paraphrases of one
    another ("a red circle", "a photo of a red circle") whose order is a near-tie by design."""
    labelled = samples.labelled
    if labelled is None:
        return []
    want = _labelled_picks(samples, ref["image"], ref["text"])
    got = want if embeds is None else _labelled_picks(samples, embeds["image"], embeds["text"])
    n = len(labelled.images)
    rows = []
    keys = [ls.name for ls in labelled.label_sets] + (["captions"] if labelled.captions else [])
    truth = {ls.name: np.asarray(ls.truth) for ls in labelled.label_sets}
    for key in keys:
        agree = agreement(got[key], want[key])
        gate = min_agreement if key in truth or not truth else None
        row = AccuracyRow(
            set=f"{labelled.name}/{key}", images=n, agreement=agree, changed=int(np.sum(got[key] != want[key])),
            status=PASS if gate is None or agree >= gate else FAIL, min_agreement=gate,
        )
        if key in truth:
            row.top1 = float(np.mean(got[key] == truth[key]))
            row.reference_top1 = float(np.mean(want[key] == truth[key]))
        else:
            row.recall, row.reference_recall = got["recall"], want["recall"]
        rows.append(row)
    return rows


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
    if samples.labelled is not None:
        min_agreement = thresholds.get(f"agreement_{run.precision}", DEFAULT_AGREEMENT[run.precision])
        result.accuracy = judge_accuracy(samples, ref, run.embeds, min_agreement)
        failures += [
            f"{run.name} accuracy on {row.set}: top-1 agreement with PyTorch {row.agreement:.4f} < {min_agreement} "
            f"({row.changed}/{row.images} images changed their pick)"
            for row in result.accuracy if row.status == FAIL
        ]
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


REFERENCE_ROW = "pytorch"  # the stage name of PyTorch's own accuracy rows
ACCURACY_HEADER = [
    "stage", "set", "top-1", "PyTorch top-1", "agreement", "R@1 i->t", "R@5 i->t", "R@1 t->i", "R@5 t->i", "status",
]


def _pct1(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _accuracy_rows(result: dict[str, Any]) -> list[list[str]]:
    """PyTorch's own rows on the labelled set, then every stage's that reached it."""
    labelled = result.get("labelled")
    if not labelled:
        return []
    rows = []
    entries = [(REFERENCE_ROW, row, True) for row in labelled["pytorch"]]
    entries += [(stage["stage"], row, False) for stage in result["stages"] for row in stage.get("accuracy", [])]
    for name, row, reference in entries:
        recall = row.get("recall") or {}
        if reference:
            status = "reference"
        elif "min_agreement" not in row:
            status = f"not gated ({row['changed']}/{row['images']} changed)"
        else:
            status = row["status"].upper() + (f" (min {_pct1(row['min_agreement'])}, {row['changed']}/"
                                              f"{row['images']} changed)" if "min_agreement" in row else "")
        rows.append([
            name, row["set"], _pct1(row.get("top1")), _pct1(row.get("reference_top1")), _pct1(row["agreement"]),
            *(_pct1(recall.get(key)) for key in ("i2t@1", "i2t@5", "t2i@1", "t2i@5")), status,
        ])
    return rows


def _accuracy_title(result: dict[str, Any]) -> str:
    labelled = result["labelled"]
    return (f"accuracy on {labelled['source']}: zero-shot top-1 (prompt-ensembled classes, both towers the "
            "stage's own), agreement with PyTorch's picks, retrieval recall over the distinct captions")


def _aligned(rows: list[list[str]]) -> list[str]:
    # The last column (a note, a skip reason) is left unpadded.
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1]).rstrip()
             for row in rows]
    lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
    return lines


def format_accuracy_table(result: dict[str, Any]) -> str:
    """The accuracy rows alone ("" without a labelled set)."""
    rows = _accuracy_rows(result)
    return "\n".join([_accuracy_title(result), *_aligned([ACCURACY_HEADER, *rows])]) if rows else ""


def tested_lines(result: dict[str, Any]) -> list[str]:
    """What the run tested, one item a line (Markdown): the export, its weights, the repository folder, the
    server URL(s) and what each said it serves. Empty for a report written before it was recorded."""
    tested = result.get("tested")
    if not tested:
        return []
    lines = [f"- export: `{tested['export']}`", f"- weights: {tested['weights_text']}"]
    sha = tested.get("encoder_sha256") or {}
    if sha:
        lines.append("- encoder sha256 (FP32 graphs): " + ", ".join(f"{t} `{v}`" for t, v in sha.items()))
    if tested.get("repository"):
        lines.append(f"- repository: `{tested['repository']}`")
    if tested.get("urls"):
        lines.append("- server: " + ", ".join(f"`{url}`" for url in tested["urls"]))
    if not tested.get("repository") and not tested.get("urls"):
        lines.append("- server: none (no --repository or --url)")
    for served in tested.get("served", []):
        status = served.get("status")
        what = {
            "match": "serves this export (encoder checksums match)",
            "unknown": "publishes no encoder checksums: which model it serves is unknown",
            "unreachable": f"did not answer ({served.get('error', '')}): which model it serves is unknown",
        }.get(status, f"checksums {status}")
        name = f" ({served['model_name']})" if served.get("model_name") else ""
        lines.append(f"- {served['where']}{name}: {what}")
    return lines


def format_table(result: dict[str, Any]) -> str:
    tested = [line.removeprefix("- ").replace("`", "") for line in tested_lines(result)]
    lines = ([f"tested: {tested[0]}", *[f"        {line}" for line in tested[1:]], ""] if tested else [])
    lines += _aligned([HEADER, *_rows(result)])
    accuracy = format_accuracy_table(result)
    if accuracy:
        lines += ["", accuracy]
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
        *([*tested_lines(result), ""] if result.get("tested") else []),
        f"Parity {verdict} ({result['created']}, {result['seconds']} s). Every stage is compared with the "
        f"PyTorch FP32 reference on {n_img} images, {n_cap} captions and {result['samples']['prompts']} "
        f"zero-shot prompts. Thresholds: min cosine {result['thresholds']['fp32']} (fp32), "
        f"{result['thresholds']['fp16']} (fp16)"
        + (f", {result['thresholds']['int8']} (int8)" if "int8" in result["thresholds"] else "")
        + "; server pixels max abs diff < "
        f"{result['thresholds']['pixels_max_abs_diff']:g}; token ids equal.",
        "",
        "Zero-shot columns: share of images whose top-1 caption / label is the one PyTorch picks "
        "(per tower: the other tower stays PyTorch's).",
        "",
        head,
        rule,
        *body,
    ]
    accuracy = _accuracy_rows(result)
    if accuracy:
        lines += [
            "", "## Accuracy", "", _accuracy_title(result)[0].upper() + _accuracy_title(result)[1:] + ".", "",
            "| " + " | ".join(ACCURACY_HEADER) + " |", "|" + "|".join("---" for _ in ACCURACY_HEADER) + "|",
            *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in accuracy],
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
