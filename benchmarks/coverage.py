"""Export coverage across the open_clip families users pick (random weights, CPU, ONNX Runtime).

Each model is exported with `export_model` (both towers, verified at batch 1 and 8 against
PyTorch); its row records pass/fail per tower, the worst cosine, the exporter used and the
seconds. Results merge into `coverage.json` (one entry per model, so models can be run one at a
time) and the markdown table `COVERAGE.md` is regenerated from the JSON.

Hugging Face Transformers rows (names `hf:<shape>`, shapes from benchmarks/hf_checkpoints.py's SHAPES:
the published configs of openai/clip-vit-*, google/siglip-* and google/siglip2-*): a random-weight
`save_pretrained` folder is built offline (its own process), then exported exactly as a user does, each
stage its own process: `clip-triton export --hf-model FOLDER` and (with `--fp16`) `clip-triton fp16`.
Each stage's peak RSS is measured like benchmarks/memory.py (VmHWM of the clip-triton process, polled,
under /usr/bin/time -v) and lands in the row's `peak_memory` and the table's peak memory column.

    .venv/bin/python -m benchmarks.coverage                      # every non-slow model
    .venv/bin/python -m benchmarks.coverage --models RN50 EVA02-B-16
    .venv/bin/python -m benchmarks.coverage --slow               # the large ones too
    .venv/bin/python -m benchmarks.coverage --models hf:clip-vit-base-patch32 --fp16   # a Transformers shape
    .venv/bin/python -m benchmarks.coverage --render             # only rewrite COVERAGE.md

JSON shape (a later stage adds e.g. `"fp16": {"image": {...}, "text": {...}}` to a row; the
table shows `fp16.<tower>.min_cosine` in its FP16 column when present):
    {"threshold": ..., "versions": {...}, "models": {NAME: {"family", "slow", "status",
     "exporter", "export_seconds", "notes", "image": {"status", "min_cosine", "seconds"},
     "text": {...}, "manifest": {"embed_dim", "image_size", "context_length", ...}}}}
A Transformers row adds `"source": "transformers"`, `"checkpoint": {"shape", "bytes", "build_seconds"}` and
`"peak_memory": {"covers", "export": {"peak_gib", "time_v_gib", "seconds", "rc", ...}, "fp16": {...}}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from clip_triton.exporter.base.common import staged_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of waiting on it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    slow: bool = False
    exporter: str = "torchscript"
    note: str = ""  # why a row is special (shown in the notes column)
    test_tier: str = "slow"  # tests/test_coverage.py's tier for this model ("-": not in the tests)
    hf_shape: str = ""  # a Transformers checkpoint of benchmarks/hf_checkpoints.py's SHAPES (not open_clip)


HF_TIER = "- (tiny shapes: test_hf_source)"
# The tokenizers save_checkpoint makes offline (benchmarks/hf_checkpoints.py), per checkpoint kind.
HF_TOKENIZERS = {
    "clip": "real CLIP BPE (open_clip's bundled 49,408-token vocabulary, CLIPTokenizer)",
    "siglip": "SentencePiece unigram spiece.model trained offline on captions (64 pieces, SiglipTokenizer; "
              "the real one has 32,000)",
    "siglip2": "Gemma-style byte-fallback BPE tokenizer.json trained offline on captions (400 tokens, "
               "GemmaTokenizer; the real one has 256,000)",
}


# The families users pick. `slow`: large, left out of a default run of this script (--slow adds them).
MODELS: list[Entry] = [
    Entry("ViT-B-32", "OpenAI CLIP / LAION ViT", note="OpenAI CLIP architecture", test_tier="default (test_export)"),
    Entry("ViT-B-16-quickgelu", "OpenAI CLIP ViT (QuickGELU)"),
    Entry("RN50", "OpenAI CLIP ResNet", note="attention pooling; OpenAI CLIP architecture", test_tier="default"),
    Entry("convnext_base", "ConvNeXt (timm)"),
    Entry("ViT-B-16-SigLIP", "SigLIP", note="text pools the last token", test_tier="default"),
    Entry("EVA02-B-16", "EVA02 (timm)"),
    Entry("MobileCLIP2-S0", "MobileCLIP2", note="re-parameterised before export", test_tier="default"),
    Entry("ViT-S-16", "ViT-S", test_tier="default"),
    Entry("ViT-B-16-SigLIP2", "SigLIP2", note="context length 64, last-token pooling"),
    Entry("ViT-L-14-worldwide-quickgelu", "MetaCLIP2", slow=True,
          note="smallest MetaCLIP2 architecture (mT5 vocab, eos pooling); "
          "the released metaclip2_worldwide weights are ViT-H-14-worldwide-quickgelu"),
    Entry("ViT-L-14", "OpenAI CLIP / LAION ViT-L", slow=True),
    Entry("ViT-H-14-quickgelu", "DFN", slow=True, note="DFN5B / MetaCLIP fullcc architecture"),
    Entry("ViT-bigG-14", "LAION bigG", slow=True, note="image tower > 2 GB: external data", test_tier="-"),
    # Transformers checkpoints (--hf-model) at the published architectures' shapes, random weights.
    Entry("hf:clip-vit-base-patch32", "Transformers CLIPModel", note="openai/clip-vit-base-patch32 shapes",
          test_tier=HF_TIER, hf_shape="clip-vit-base-patch32"),
    Entry("hf:clip-vit-large-patch14", "Transformers CLIPModel", slow=True, note="openai/clip-vit-large-patch14 shapes",
          test_tier=HF_TIER, hf_shape="clip-vit-large-patch14"),
    Entry("hf:siglip-base-patch16-224", "Transformers SiglipModel", note="google/siglip-base-patch16-224 shapes",
          test_tier=HF_TIER, hf_shape="siglip-base-patch16-224"),
    Entry("hf:siglip-so400m-patch14-384", "Transformers SiglipModel", slow=True,
          note="google/siglip-so400m-patch14-384 shapes", test_tier=HF_TIER, hf_shape="siglip-so400m-patch14-384"),
    Entry("hf:siglip2-base-patch16-224", "Transformers SiglipModel (SigLIP 2)",
          note="google/siglip2-base-patch16-224 shapes (fixed resolution)", test_tier=HF_TIER,
          hf_shape="siglip2-base-patch16-224"),
]
BY_NAME = {e.name: e for e in MODELS}


def _towers_from_manifest(manifest: Any) -> dict[str, dict[str, Any]]:
    parity = manifest.export_parity
    return {
        tower: {
            "status": "ok" if parity[tower]["min_cosine"] >= parity["threshold"] else "fail",
            "min_cosine": parity[tower]["min_cosine"],
            "mean_cosine": parity[tower]["mean_cosine"],
            "max_abs_diff": parity[tower]["max_abs_diff"],
            "seconds": parity["seconds"][tower],
        }
        for tower in ("image", "text")
    }


def run_fp16(out: Path, progress: Any) -> dict[str, Any]:
    """The fp16 stage on an export: its per-tower parity (ONNX Runtime CPU vs PyTorch FP32)."""
    from clip_triton.exporter.base.common import ClipTritonError
    from clip_triton.exporter.stages.fp16 import make_fp16

    start = time.perf_counter()
    try:
        section = make_fp16(out, progress=progress).fp16 or {}
    except ClipTritonError as exc:
        return {"status": "fail", "error": str(exc)[:500], "seconds": round(time.perf_counter() - start, 1)}
    result: dict[str, Any] = {"status": "ok", "seconds": round(time.perf_counter() - start, 1)}
    for tower in ("image", "text"):
        result[tower] = {k: section[tower][k] for k in ("min_cosine", "mean_cosine") if k in section[tower]}
    return result


def run_one(entry: Entry, workdir: Path, exporter: str | None = None, fp16: bool = False) -> dict[str, Any]:
    """Export one model; never raises for a model that fails (the row records why)."""
    from clip_triton.exporter.base.common import ClipTritonError, Progress
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model

    progress = Progress(f"coverage {entry.name}")
    row: dict[str, Any] = {"family": entry.family, "slow": entry.slow, "test_tier": entry.test_tier,
                           "notes": entry.note}
    out = workdir / entry.name
    start = time.perf_counter()
    try:
        loaded = load_model(entry.name, random_weights=True, progress=progress)
        row["load_seconds"] = round(time.perf_counter() - start, 2)
        if loaded.tokenizer is None:
            extra = "synthetic token ids (HF tokenizer not available offline)"
            row["notes"] = f"{row['notes']}; {extra}" if row["notes"] else extra
        # One tower's weights at a time, as the CLI exports (docs/engines.md, "Memory"): ViT-bigG fits.
        manifest = export_model(
            loaded, out, exporter=exporter or entry.exporter, force=True, progress=progress, release_model=True
        )
    except ClipTritonError as exc:
        row.update(status="fail", error=str(exc)[:500])
        row["export_seconds"] = round(time.perf_counter() - start, 1)
        return row
    except Exception as exc:  # noqa: BLE001 - a coverage run reports, it does not stop
        row.update(status="fail", error=f"{type(exc).__name__}: {str(exc).strip()[:400]}")
        row["export_seconds"] = round(time.perf_counter() - start, 1)
        return row
    finally:
        gc.collect()
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    row["status"] = "ok"
    if fp16:
        row["fp16"] = run_fp16(out, progress)
    row["exporter"] = manifest.exporter
    row.update(_towers_from_manifest(manifest))
    row["manifest"] = {
        "embed_dim": manifest.embed_dim,
        "image_size": manifest.image_size,
        "context_length": manifest.tokenizer.context_length,
        "tokenizer_kind": manifest.tokenizer.kind,
        "resize_mode": manifest.preprocess.resize_mode,
        "onnx_bytes": sum(rec["bytes"] for rec in manifest.files.values()),
    }
    return row


HF_MEMORY_COVERS = (
    "peak RSS of the clip-triton process per stage (VmHWM, as benchmarks/memory.py measures it): `clip-triton "
    "export --hf-model FOLDER` (loading the checkpoint, both ONNX exports, both parity checks) and `clip-triton "
    "fp16` (conversion and its parity, which rebuilds the PyTorch reference)"
)


def hf_versions() -> dict[str, str]:
    """The versions a Transformers row ran with (kept in the row: the header's are the open_clip rows')."""
    import importlib.metadata

    import clip_triton.exporter.stages.export as onnx_export

    versions = dict(onnx_export.versions())
    versions.pop("open_clip", None)
    for package in ("transformers", "tokenizers"):
        versions[package] = importlib.metadata.version(package)
    return versions


def entry_notes(entry: Entry) -> str:
    """The notes column: for a Transformers row also the tokenizer it was made with, and random weights."""
    if not entry.hf_shape:
        return entry.note
    from benchmarks.hf_checkpoints import SHAPES

    tokenizer = f"tokenizer: {HF_TOKENIZERS[SHAPES[entry.hf_shape]['kind']]}"
    return "; ".join(n for n in (entry.note, tokenizer, "random weights (seeded), built offline") if n)


def _fp16_from_manifest(section: dict[str, Any] | None, stage: dict[str, Any]) -> dict[str, Any]:
    """run_fp16's row shape from the manifest's `fp16` section a `clip-triton fp16` process wrote."""
    if stage["rc"] != 0 or not section:
        return {"status": "fail", "error": stage.get("error", f"exit code {stage['rc']}"), "seconds": stage["seconds"]}
    result: dict[str, Any] = {"status": "ok", "seconds": stage["seconds"]}
    for tower in ("image", "text"):
        result[tower] = {k: section[tower][k] for k in ("min_cosine", "mean_cosine") if k in section[tower]}
    return result


def run_hf(
    entry: Entry, workdir: Path, exporter: str | None = None, fp16: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """A Transformers checkpoint at `entry.hf_shape`: built offline with random weights, then exported (and
    converted to FP16) by the CLI, each in its own process, with each stage's peak memory. Never raises."""
    from benchmarks.memory import run_stage

    row: dict[str, Any] = {"family": entry.family, "slow": entry.slow, "test_tier": entry.test_tier,
                           "notes": entry_notes(entry), "source": "transformers"}
    root = workdir / entry.name
    folder, out, logs = root / entry.hf_shape, root / "export", root / "logs"  # the folder names the manifest
    shutil.rmtree(root, ignore_errors=True)
    logs.mkdir(parents=True)
    # The checkpoint in a process of its own, so this one never holds the model's weights.
    build = (
        "import sys; from benchmarks.hf_checkpoints import save_checkpoint; "
        "save_checkpoint(sys.argv[1], sys.argv[2], seed=0)"
    )
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", build, entry.hf_shape, str(folder)], cwd=HERE.parent,
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess([], -9, "", f"timed out after {timeout} s")
    row["checkpoint"] = {
        "shape": entry.hf_shape,
        "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0,
        "build_seconds": round(time.perf_counter() - start, 1),
        "seed": 0,
    }
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        row.update(status="fail", error=f"building the checkpoint failed: {tail[:400]}")
        return row
    memory: dict[str, Any] = {"covers": HF_MEMORY_COVERS}
    row["peak_memory"] = memory
    export = ["export", "--hf-model", str(folder), "--out", str(out), "-q"]
    export += ["--exporter", exporter or entry.exporter]
    memory["export"] = run_stage(export, logs / "export.log", timeout)
    row["export_seconds"] = memory["export"]["seconds"]
    if memory["export"]["rc"] != 0:
        memory["export"]["command"] = memory["export"]["command"].replace(str(folder), "FOLDER")
        row.update(status="fail", error=memory["export"].get("error", "export failed"))
        return row
    if fp16:
        memory["fp16"] = run_stage(["fp16", "--export", str(out), "-q"], logs / "fp16.log", timeout)
    for stage in memory.values():  # the temp folders' names mean nothing later
        if isinstance(stage, dict):
            stage["command"] = stage["command"].replace(str(folder), "FOLDER").replace(str(out), "EXPORT")
    # The manifest as JSON, not as a Manifest: only the fields read here, whatever sections later stages add.
    try:
        manifest = SimpleNamespace(**json.loads((out / "manifest.json").read_text()))
        row["status"] = "ok"
        if fp16:
            row["fp16"] = _fp16_from_manifest(manifest.fp16, memory["fp16"])
        row["exporter"] = manifest.exporter
        row["versions"] = hf_versions()
        row.update(_towers_from_manifest(manifest))
        row["manifest"] = {
            "embed_dim": manifest.embed_dim,
            "image_size": manifest.image_size,
            "context_length": manifest.tokenizer["context_length"],
            "tokenizer_kind": manifest.tokenizer["kind"],
            "vocab_size": manifest.tokenizer["vocab_size"],
            "resize_mode": manifest.preprocess["resize_mode"],
            "onnx_bytes": sum(rec["bytes"] for rec in manifest.files.values()),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        row.update(status="fail", error=f"reading {out / 'manifest.json'}: {type(exc).__name__}: {exc}"[:500])
    return row


def _fmt_gib(stage: Any) -> str:
    if not isinstance(stage, dict):
        return "-"
    if stage.get("rc"):
        return "fail"
    return f"{stage['peak_gib']:.2f}" if isinstance(stage.get("peak_gib"), float) else "-"


def _fmt_cos(value: Any) -> str:
    return f"{value:.10f}" if isinstance(value, float) else "-"


def render_markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Export coverage",
        "",
        "Random weights (seeded), CPU, ONNX Runtime vs PyTorch FP32 at batch 1 and batch 8; "
        f"a tower passes at min cosine >= {data.get('threshold', 0.99999)}. "
        "Export seconds cover loading, both exports and both parity checks on a 2-core machine shared with other jobs "
        "(contention varied 1-3x between runs). Cosines are rounded; coverage.json has full precision. "
        "FP16 column: image / text min cosine of the fp16 stage's graphs (ONNX Runtime CPU, optimiser off) vs "
        "PyTorch FP32, threshold 0.999 (`--fp16`). "
        "Transformers rows (`hf:<shape>`): a random-weight `save_pretrained` folder at the published "
        "architecture's shape, built offline (benchmarks/hf_checkpoints.py), exported by the CLI "
        "(`clip-triton export --hf-model FOLDER`, then `clip-triton fp16`), each stage its own process; their "
        "export seconds are that process's wall clock (imports and checkpoint loading included). Peak memory "
        "column (Transformers rows only): " + HF_MEMORY_COVERS + "; the open_clip families' per-stage memory is "
        "the memory benchmark's (benchmarks/memory.py, RESULTS.md).",
        "Generated by `python -m benchmarks.coverage` (see benchmarks/coverage.py); "
        "open_clip rows' versions: " + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()) + ".",
    ]
    hf_rows = {json.dumps(r["versions"], sort_keys=True): r["versions"] for r in data["models"].values()
               if r.get("source") == "transformers" and r.get("versions")}
    for versions in hf_rows.values():
        lines.append("Transformers rows' versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    lines += [
        "",
        "| model | family | image tower | text tower | min cosine image | min cosine text "
        "| FP16 min cosine | peak memory GiB (export / fp16) | export seconds | exporter | test tier | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [e.name for e in MODELS] + sorted(set(data["models"]) - set(BY_NAME))
    for name in order:
        row = data["models"].get(name)
        if row is None:
            entry = BY_NAME[name]
            row = {"family": entry.family, "status": "not run", "notes": entry_notes(entry)}
        image, text = row.get("image", {}), row.get("text", {})
        fp16 = row.get("fp16") or {}
        fp16_cell = "-"
        if fp16.get("status") == "fail":
            fp16_cell = f"fail: {fp16.get('error', '')[:120]}"
        elif fp16:
            fp16_cell = " / ".join(_fmt_cos(fp16.get(t, {}).get("min_cosine")) for t in ("image", "text"))
        memory = row.get("peak_memory") or {}
        mem_cell = "-"
        if memory:
            mem_cell = " / ".join(_fmt_gib(memory.get(stage)) for stage in ("export", "fp16"))
        notes = [n for n in (row.get("notes"), row.get("error")) if n]
        status = row.get("status", "not run")
        lines.append(
            "| {model} | {family} | {img} | {txt} | {ci} | {ct} | {fp16} | {mem} | {secs} | {exp} | {tier} "
            "| {notes} |".format(
                model=name,
                family=row.get("family", ""),
                img=image.get("status", status if status != "ok" else "-"),
                txt=text.get("status", status if status != "ok" else "-"),
                ci=_fmt_cos(image.get("min_cosine")),
                ct=_fmt_cos(text.get("min_cosine")),
                fp16=fp16_cell,
                mem=mem_cell,
                secs=row.get("export_seconds", "-"),
                exp=row.get("exporter", "-"),
                tier=BY_NAME[name].test_tier if name in BY_NAME else "-",
                notes="; ".join(notes).replace("|", "\\|").replace("\n", " "),
            )
        )
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"models": {}}


README = HERE.parent / "README.md"
README_BEGIN, README_END = "<!-- COVERAGE TABLE -->", "<!-- /COVERAGE TABLE -->"


def sync_readme(data: dict[str, Any], readme: Path = README) -> bool:
    """Replace the table between the README's COVERAGE TABLE markers with COVERAGE.md's; False if no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    table = [line for line in render_markdown(data).splitlines() if line.startswith("|")]
    new = text[: begin + len(README_BEGIN)] + "\n" + "\n".join(table) + "\n" + text[end:]
    if new != text:
        with staged_file(readme) as tmp:
            tmp.write_text(new)
    return True


def _save(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("coverage.json", json.dumps(data, indent=2) + "\n"), ("COVERAGE.md", render_markdown(data))):
        with staged_file(out / name) as tmp:  # atomic: a reader never sees half a table
            tmp.write_text(text)
    if out.resolve() == HERE:  # the published table: the README shows the same rows
        sync_readme(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="names to run (default: every non-slow model)")
    parser.add_argument("--slow", action="store_true", help="include the slow (large) models")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), help="override per-model exporter")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for coverage.json and COVERAGE.md")
    parser.add_argument("--fp16", action="store_true", help="also run the fp16 stage and fill its column")
    parser.add_argument("--render", action="store_true", help="only rewrite COVERAGE.md from coverage.json")
    parser.add_argument("--not-run", metavar="REASON", help="record --models as not run, with REASON")
    parser.add_argument("--timeout", type=float, help="seconds per process of a Transformers row (default: none)")
    args = parser.parse_args(argv)

    data = _load(args.out / "coverage.json")
    if args.not_run:
        # A model that cannot be exported here (e.g. killed for memory) keeps its row and the reason.
        for name in args.models or []:
            entry = BY_NAME.get(name, Entry(name, "other"))
            old = data["models"].get(name, {})
            data["models"][name] = {**{k: v for k, v in old.items() if k == "fp16"}, "family": entry.family,
                                    "slow": entry.slow, "notes": entry_notes(entry), "status": "not run",
                                    "error": args.not_run}
    elif not args.render:
        import clip_triton.exporter.stages.export as onnx_export

        names = args.models or [e.name for e in MODELS if args.slow or not e.slow]
        entries = [BY_NAME.get(n, Entry(n, "other")) for n in names]
        data["threshold"] = onnx_export.EXPORT_MIN_COSINE
        if any(not e.hf_shape for e in entries):  # the header's versions are the open_clip rows'
            data["versions"] = onnx_export.versions()
        workdir = Path(tempfile.mkdtemp(prefix="clip-triton-coverage-"))
        try:
            for entry in entries:
                print(f"== {entry.name}", file=sys.stderr, flush=True)
                if entry.hf_shape:
                    row = run_hf(entry, workdir, args.exporter, fp16=args.fp16, timeout=args.timeout)
                else:
                    row = run_one(entry, workdir, args.exporter, fp16=args.fp16)
                shutil.rmtree(workdir / entry.name, ignore_errors=True)
                # A fresh row replaces the old one; sections other stages added (fp16) are kept.
                old = data["models"].get(entry.name, {})
                data["models"][entry.name] = {**{k: v for k, v in old.items() if k == "fp16"}, **row}
                _save(data, args.out)  # after each model: a long run keeps what it measured
                print(
                    f"== {entry.name}: {row['status']} in {row['export_seconds']}s "
                    f"image {_fmt_cos(row.get('image', {}).get('min_cosine'))} "
                    f"text {_fmt_cos(row.get('text', {}).get('min_cosine'))} {row.get('error', '')}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    _save(data, args.out)
    print(render_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
