"""`clip-triton build` and `clip-triton demo`: every stage in order, called directly.

The CI entry point: export -> fp16 -> (quantize, for --precision int8) -> engines (when possible) -> repository
-> parity; exit code 0 only
when every stage passed, with the failing stage named otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.clients.cli_options import option, same_option
from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import (
    ClipTritonError,
    MissingDependencyError,
    Progress,
    check_number,
    check_writable_parent,
    os_error_message,
    staged_file,
)
from clip_triton.exporter.base.manifest import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    repository_manifest,
    sha256_file,
    verify_files,
)
from clip_triton.exporter.base.releases import check_release_options
from clip_triton.exporter.parity.metrics import cosine_rows
from clip_triton.exporter.parity.report import FAIL, PASS, SKIP, format_table
from clip_triton.exporter.parity.run import TRITON_STAGES, ParityOptions, check_parity_options, run_parity
from clip_triton.exporter.runtimes.triton import TritonModels
from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

# ---------------------------------------------------------------------------------------------
# `clip-triton build`: every stage in order, called directly; the CI entry point
# ---------------------------------------------------------------------------------------------

AUTO = "auto"  # tensorrt when engines were built, else python (runtimes.AUTO_WITH[OUT]_ENGINES)


@dataclass(kw_only=True)
class ExportOptions:
    """The model and how to export it: options of `export` and of `build` (clients/cli_options.py)."""

    model: str | None = option(
        None, help="open_clip architecture name, e.g. ViT-B-32 (or the --model-config one's name)."
    )
    hf_model: str | None = option(
        None,
        help="A Hugging Face Transformers CLIPModel/SiglipModel checkpoint instead of --model: a save_pretrained "
        "folder (offline) or a hub id (org/name[@revision], the Hugging Face cache). Its own weights, image "
        "processor and tokenizer are used.",
    )
    model_config: Path | None = option(
        None,
        help="An open_clip model-config JSON (a custom architecture); --model names it, whatever the file's "
        "name. Weights: --checkpoint or --random-weights.",
    )
    pretrained: str | None = option(
        None, help="open_clip pretrained tag (downloads), or 'builtin': the weights shipped with clip-triton."
    )
    checkpoint: Path | None = option(None, help="Local state-dict file to load.")
    random_weights: bool = option(False, flags=("--random-weights",), help="Random weights (offline tests, demos).")
    seed: int = option(0, help="Torch seed for --random-weights.")
    opset: int = option(18, help="ONNX opset.")
    max_batch: int = option(128, help="Largest batch later stages configure.")
    exporter: str = option("torchscript", help="torchscript (default), dynamo, or auto.")
    preprocess_from: str | None = option(
        None, help="Take preprocessing from this pretrained tag's config (no download)."
    )
    image_mean: str | None = option(None, help="Override: 'r,g,b' or one value.")
    image_std: str | None = option(None, help="Override: 'r,g,b' or one value.")
    image_interpolation: str | None = option(None, help="bicubic, bilinear or nearest.")
    image_resize_mode: str | None = option(None, help="shortest, longest or squash.")
    tokenizer_file: Path | None = option(
        None, help="A Hugging Face tokenizer.json for models whose tokenizer is on the hub."
    )

    def check_source(self) -> None:
        """Exactly one model source: --model (open_clip, with its weight options) or --hf-model alone."""
        if self.hf_model is None:
            if not self.model:
                raise ClipTritonError("give --model NAME (an open_clip architecture) or --hf-model PATH_OR_REPO_ID")
            return
        given = [
            flag for flag, value in (
                ("--model", self.model), ("--model-config", self.model_config), ("--pretrained", self.pretrained),
                ("--checkpoint", self.checkpoint), ("--random-weights", self.random_weights or None),
                ("--preprocess-from", self.preprocess_from), ("--image-mean", self.image_mean),
                ("--image-std", self.image_std), ("--image-interpolation", self.image_interpolation),
                ("--image-resize-mode", self.image_resize_mode), ("--tokenizer-file", self.tokenizer_file),
            ) if value is not None
        ]
        if given:
            raise ClipTritonError(
                f"--hf-model takes the architecture, weights, preprocessing and tokenizer from the checkpoint: "
                f"drop {', '.join(given)}"
            )

    def preprocess_overlay(self) -> dict[str, Any]:
        """open_clip PreprocessCfg overrides: a tag's config (--preprocess-from), then the --image-* options."""
        from clip_triton.exporter.sources.open_clip import preprocess_overrides, tag_preprocess

        overrides = preprocess_overrides(
            self.image_mean, self.image_std, self.image_interpolation, self.image_resize_mode
        )
        if self.preprocess_from is None:
            return overrides
        if self.model_config is not None:
            raise ClipTritonError("--preprocess-from needs an architecture with pretrained tags, not --model-config")
        return {**tag_preprocess(self.model or "", self.preprocess_from), **overrides}


@dataclass(kw_only=True)
class BuildOptions(ParityOptions, ExportOptions, RepositoryOptions):
    """The `build` command's options: the repository options, the export options, the parity options, then
    build's own. Two repository options are export's or build's here: --max-batch is the export's (the
    repository takes the manifest's, capped by the engines) and --runtime may be auto."""

    out: Path = option(help="Output folder: export/, repository/, parity.json, parity.md.")
    runtime: str = option(
        AUTO, help=f"auto (tensorrt if engines were built, else python) or {', '.join(runtimes.serving_names())}."
    )
    max_batch: int = same_option(ExportOptions, "max_batch")
    skip_engines: bool = option(False, flags=("--skip-engines",), help="Do not try to build TensorRT engines.")
    require_engines: bool = option(
        False, flags=("--require-engines",), help="Fail (exit 3) when engines cannot be built here."
    )
    force: bool = option(False, flags=("--force",), help="Replace an existing output folder.")

    def repository_options(self, runtime: str) -> RepositoryOptions:
        """The repository stage's options: this build's values of them, for `runtime` (auto resolved)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RepositoryOptions)}
        return RepositoryOptions(**{**values, "runtime": runtime, "max_batch": None})


def run_export(
    opts: ExportOptions, out: Path, *, force: bool = False, progress: Progress | None = None
) -> Manifest:
    """The export step (`export`, and `build`'s first stage): load the model and write its ONNX graphs and
    manifest.json into `out`. The options and `out` are checked before the (slow) model load."""
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import check_export_options, export_model

    progress = progress or Progress("export", quiet=True)
    out = Path(out)
    opts.check_source()
    check_export_options(opts.opset, opts.max_batch, opts.exporter)
    preprocess = opts.preprocess_overlay() if opts.hf_model is None else {}
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ClipTritonError(f"{out} already exists; pass --force to replace it")
    if opts.hf_model is not None:
        from clip_triton.exporter.sources import hf_transformers

        with progress.step(f"loading {opts.hf_model}"):
            loaded = hf_transformers.load_model(opts.hf_model, progress)
    else:
        with progress.step(f"loading {opts.model}"):
            loaded = load_model(
                opts.model or "",  # check_source: set when --hf-model is not
                pretrained=opts.pretrained,
                checkpoint=opts.checkpoint,
                random_weights=opts.random_weights,
                seed=opts.seed,
                preprocess=preprocess,
                tokenizer_file=opts.tokenizer_file,
                model_config=opts.model_config,
                progress=progress,
            )
    # release_model: one tower's weights alive at a time (docs/engines.md, "Memory").
    return export_model(
        loaded, out, opset=opts.opset, max_batch=opts.max_batch, exporter=opts.exporter, force=force,
        progress=progress, release_model=True,
    )


def _stage_error(stage: str, exc: ClipTritonError) -> ClipTritonError:
    """The same error class (same exit code) with the failing build stage named first."""
    error = type(exc)(f"build failed at {stage}: {exc}")
    return error


def _check_build_options(opts: BuildOptions) -> None:
    if opts.runtime != AUTO and opts.runtime not in runtimes.serving_names():
        choices = ", ".join((AUTO, *runtimes.serving_names()))
        raise ClipTritonError(f"--runtime must be one of {choices}, got {opts.runtime!r}")
    if opts.precision not in ("fp32", "fp16", "int8"):
        raise ClipTritonError(f"--precision must be fp32, fp16 or int8, got {opts.precision!r}")
    if opts.skip_engines and opts.require_engines:
        raise ClipTritonError("--skip-engines and --require-engines contradict each other")
    if opts.skip_engines and _needs_engines(opts.runtime):
        raise ClipTritonError(f"--runtime {opts.runtime} needs engines: drop --skip-engines")
    check_release_options(opts.triton_release, opts.min_driver)  # the engines' TensorRT: at the repository stage
    # Every stage's numbers, before the first stage's work (each stage checks its own again).
    from clip_triton.exporter.sources.open_clip import MAX_SEED, read_model_config
    from clip_triton.exporter.stages.export import check_export_options

    opts.check_source()
    check_number("--seed", opts.seed, 0, MAX_SEED)
    if opts.model_config is not None:
        read_model_config(opts.model_config)  # before build.json: a bad file leaves no output folder
    check_export_options(opts.opset, opts.max_batch, opts.exporter)
    if opts.hf_model is None:
        opts.preprocess_overlay()  # --preprocess-from and --image-* (no download)
    check_parity_options(
        opts.samples, opts.min_cosine_fp32, opts.min_cosine_fp16, labelled_set=opts.labelled_set,
        labelled_samples=opts.labelled_samples, min_agreement_fp32=opts.min_agreement_fp32,
        min_agreement_fp16=opts.min_agreement_fp16, min_cosine_int8=opts.min_cosine_int8,
        min_agreement_int8=opts.min_agreement_int8,
    )
    if opts.precision == "int8":
        from clip_triton.exporter.stages.quantize import check_options

        check_options(_quantize_options(opts))  # NNCF present, thresholds in range: before the slow stages
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ClipTritonError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not opts.force and not _is_build_folder(out):
        raise ClipTritonError(f"{out} already exists and is not a clip-triton build folder; pass --force to replace it")
    check_writable_parent(out / "export")
    if opts.require_engines or _needs_engines(opts.runtime):
        # Fail before the slow stages when engines are required and cannot be built here.
        from clip_triton.exporter.runtimes.tensorrt import require_runtime

        why = "--require-engines" if opts.require_engines else f"--runtime {opts.runtime}"
        try:
            require_runtime()
        except MissingDependencyError as exc:
            raise MissingDependencyError(f"build needs engines ({why}): {exc}") from None


def _needs_engines(runtime: str) -> bool:
    """The runtime serves the engines stage's plans."""
    entry = runtimes.find(runtime)
    return entry is not None and entry.serving is not None and entry.serving.fmt == "plan"


def _is_build_folder(out: Path) -> bool:
    return (out / "build.json").is_file() or (out / "export").is_dir()


def _same_model(manifest: Any, opts: BuildOptions) -> str | None:
    """Why an existing export is not this build's model (None when it is)."""
    if opts.hf_model is not None:
        from clip_triton.exporter.sources import hf_transformers

        return hf_transformers.same_checkpoint(manifest, opts.hf_model)
    if manifest.source != "open_clip":
        return f"it was exported from a {manifest.source} checkpoint"
    wanted = {
        "model": opts.model,
        "pretrained": opts.pretrained,
        "random weights": bool(opts.random_weights),
        "seed": opts.seed if opts.random_weights else None,
    }
    found = {
        "model": manifest.model_name,
        "pretrained": manifest.pretrained,
        "random weights": bool(manifest.random_weights),
        "seed": manifest.seed if manifest.random_weights else None,
    }
    if opts.checkpoint is not None:
        recorded = (manifest.checkpoint or {}).get("sha256")
        if not Path(opts.checkpoint).is_file() or recorded != sha256_file(Path(opts.checkpoint)):
            return "it was exported from another checkpoint"
    from clip_triton.exporter.sources.open_clip import BUILTIN_WEIGHTS, builtin_weights, read_model_config

    config = read_model_config(opts.model_config) if opts.model_config is not None else None
    if config != manifest.model_config:
        return "it was exported from another --model-config"
    if opts.pretrained == BUILTIN_WEIGHTS and manifest.builtin_sha256 != sha256_file(builtin_weights(opts.model or "")):
        return "the builtin weights changed since"
    diff = [f"{k} {found[k]!r} (this build: {wanted[k]!r})" for k in wanted if wanted[k] != found[k]]
    return f"it holds {', '.join(diff)}" if diff else None


def resumable_stages(out: Path, opts: BuildOptions) -> tuple[set[str], list[str]]:
    """Stages of an earlier (interrupted) build in `out` whose outputs are complete and verified.

    Returns (stages to reuse, notes for the progress lines). Export and fp16 are reused when every
    file their manifest section records is present with its recorded size and sha256; anything
    else is redone. Refuses (ClipTritonError) when `out` holds another model's build.
    """
    reuse: set[str] = set()
    notes: list[str] = []
    export_dir = out / "export"
    for leftover in out.glob(".*.tmp-*"):  # staged folders of a killed run: never complete
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    if not export_dir.is_dir():
        return reuse, notes
    try:
        manifest = load_manifest(export_dir)
    except ClipTritonError as exc:
        notes.append(f"export/ is incomplete ({str(exc).splitlines()[0]}): redoing it")
        return reuse, notes
    other = _same_model(manifest, opts)
    if other is not None:
        raise ClipTritonError(f"{out} holds a build of another model: {other}; pass --force to replace it")
    problem = verify_files(export_dir, manifest.files)
    if problem is not None:
        notes.append(f"export/ cannot be reused ({problem}): redoing it")
        return reuse, notes
    reuse.add("export")
    notes.append("export/ is complete (checksums verified): reusing it")
    derived = [("fp16", manifest.fp16, "FP16")]  # stages whose graphs the export's manifest records
    if opts.precision == "int8":
        derived.append(("quantize", manifest.int8, "INT8"))
    for stage, section, graphs in derived:
        problem = verify_files(export_dir, section.get("files") or {}) if section else "not run"
        if problem is None:
            reuse.add(stage)
            notes.append(f"the {graphs} graphs are complete (checksums verified): reusing them")
        else:
            notes.append(f"{stage}: {problem}: redoing it")
    return reuse, notes


def _quantize_options(opts: BuildOptions) -> Any:
    """The quantize stage's options from a build's: its parity data (--images/--texts: calibration and the
    top-1 caption check), labelled set and INT8 thresholds."""
    from clip_triton.exporter.stages.quantize import QuantizeOptions

    return QuantizeOptions(
        calibration_images=opts.images, calibration_texts=opts.texts, labelled_set=opts.labelled_set,
        labelled_samples=opts.labelled_samples, min_cosine=opts.min_cosine_int8,
        min_agreement=opts.min_agreement_int8,
    )


def run_build(opts: BuildOptions, quiet: bool = False, echo: Any = None) -> dict[str, Any]:
    """export -> fp16 -> engines (when possible) -> repository -> parity, into opts.out.

    Writes OUT/export, OUT/repository, OUT/parity.json, OUT/parity.md and OUT/build.json; raises
    (ParityError exit 1, ClipTritonError exit 2, MissingDependencyError exit 3) naming the stage.
    Resumable: run again after an interruption and the complete, verified stages are reused
    (resumable_stages); --force rebuilds everything.
    """
    from clip_triton.exporter.stages.fp16 import make_fp16

    _check_build_options(opts)
    out = Path(opts.out)
    export_dir, repo_dir = out / "export", out / "repository"
    record: dict[str, Any] = {"model": opts.model or opts.hf_model, "stages": {}, "out": str(out.resolve())}
    build = Progress("build", quiet)
    total = time.perf_counter()
    reuse: set[str] = set()
    if not opts.force and out.is_dir():
        reuse, notes = resumable_stages(out, opts)
        for note in notes:
            build.info(note)

    def timed(stage: str, func: Any) -> Any:
        build.info(f"== {stage} ==")
        start = time.perf_counter()
        try:
            result = func()
        except (ClipTritonError, OSError) as exc:
            if isinstance(exc, OSError):
                exc = ClipTritonError(os_error_message(exc))
            record["stages"][stage] = {"status": FAIL, "reason": str(exc).splitlines()[0]}
            with contextlib.suppress(OSError):  # the disk may be the very thing that failed
                _write_build_record(out, record)
            raise _stage_error(stage, exc) from None
        record["stages"].setdefault(stage, {"status": PASS})
        record["stages"][stage]["seconds"] = round(time.perf_counter() - start, 1)
        return result

    def engines() -> bool:
        from clip_triton.exporter.stages.engines import build_engines

        if opts.skip_engines:
            record["stages"]["engines"] = {"status": SKIP, "reason": "--skip-engines"}
            build.info("engines skipped (--skip-engines)")
            return False
        try:
            build_engines(
                export_dir, progress=Progress("engines", quiet),
                precision="int8" if opts.precision == "int8" else "fp16",
                min_cosine=opts.min_cosine_int8 if opts.precision == "int8" else opts.min_cosine_fp16,
            )
        except MissingDependencyError as exc:
            if opts.require_engines or _needs_engines(opts.runtime):
                raise
            record["stages"]["engines"] = {"status": SKIP, "reason": str(exc)}
            build.warn(
                f"no TensorRT engines built: {exc}. The repository uses the {runtimes.AUTO_WITHOUT_ENGINES} runtime; "
                "pass --require-engines to make this an error"
            )
            return False
        return True

    def reused(stage: str) -> None:
        record["stages"][stage] = {"status": PASS, "reused": True}

    if "export" in reuse:
        reused("export")
    else:
        # The build owns OUT/export: an incomplete one (resumable_stages said why) is replaced.
        timed("export", lambda: run_export(opts, export_dir, force=True, progress=Progress("export", quiet)))
    if "fp16" in reuse:
        reused("fp16")
    else:
        timed("fp16", lambda: make_fp16(export_dir, progress=Progress("fp16", quiet)))
    if opts.precision == "int8":
        from clip_triton.exporter.stages.quantize import make_int8

        if "quantize" in reuse:
            reused("quantize")
        else:
            timed("quantize", lambda: make_int8(
                export_dir, _quantize_options(opts), progress=Progress("quantize", quiet)))
    built_engines = timed("engines", engines)
    if opts.runtime == AUTO:
        runtime = runtimes.AUTO_WITH_ENGINES if built_engines else runtimes.AUTO_WITHOUT_ENGINES
    else:
        runtime = opts.runtime
    record["runtime"], record["precision"] = runtime, opts.precision
    timed(
        "repository",
        lambda: write_repository(
            export_dir, repo_dir, opts.repository_options(runtime),
            force=True, progress=Progress("repository", quiet),
        ),
    )
    result = timed(
        "parity",
        lambda: run_parity(
            export_dir,
            repository=repo_dir,
            **opts.parity_kwargs(),
            report=out / "parity.json",
            markdown=out / "parity.md",
            progress=Progress("parity", quiet),
            echo=echo,
        ),
    )
    record["passed"] = True
    record["seconds"] = round(time.perf_counter() - total, 1)
    _write_build_record(out, record)
    return result


def _write_build_record(out: Path, record: dict[str, Any]) -> None:
    record.setdefault("passed", False)
    out.mkdir(parents=True, exist_ok=True)
    with staged_file(out / "build.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# `clip-triton demo`: build (or reuse) a repository, serve it, rank captions of a held-out image
# ---------------------------------------------------------------------------------------------


DEMO_RUNTIME = runtimes.AUTO_WITHOUT_ENGINES  # runs on any host and on the embedded server
DEMO_MODEL = "ShapesCLIP-RN-T"  # the project's own trained model (exporter/sources/builtin/)
DEMO_IMAGE_INDEX = 0  # the held-out shapes image the demo ranks captions for (fixed: not a picked success)


def demo_weights(model: str) -> dict[str, Any]:
    """The demo's weights: the shipped ones when `model` has builtin weights, seeded random ones otherwise."""
    from clip_triton.exporter.sources.open_clip import BUILTIN_WEIGHTS, builtin_models

    return {"pretrained": BUILTIN_WEIGHTS} if model in builtin_models() else {"random_weights": True}


def reusable_build(out: Path, model: str) -> bool:
    """A previous passing demo build of the same model and weights, with its repository, lies in `out`."""
    from clip_triton.exporter.sources.open_clip import builtin_weights

    try:
        manifest = load_manifest(Path(out) / "export")
        record = json.loads((Path(out) / "build.json").read_text())
        weights = demo_weights(model)
        if "pretrained" in weights:
            same_weights = (manifest.pretrained == weights["pretrained"]
                            and manifest.builtin_sha256 == sha256_file(builtin_weights(model)))
        else:
            same_weights = manifest.random_weights
    except Exception:  # noqa: BLE001 - anything unreadable means: build again
        return False
    return (
        manifest.model_name == model
        and bool(same_weights)
        and bool(record.get("passed"))
        and record.get("runtime") == DEMO_RUNTIME
        and (Path(out) / "repository" / MANIFEST_NAME).is_file()
        and (Path(out) / "parity.json").is_file()
    )


def _with_article(text: str) -> str:
    """ "a orange" -> "an orange", "an red" -> "a red" after a word was swapped in a caption."""
    import re

    text = re.sub(r"\ban? (?=[aeiou])", "an ", text)
    return re.sub(r"\ban (?=[^aeiou])", "a ", text)


def demo_captions(caption: str, labels: dict[str, str]) -> list[str]:
    """The true caption and close confusers, each one word (or phrase) away: other colours, other shapes,
    both, the other size, another position; the true caption first."""
    import re

    from clip_triton.exporter.parity import shapes

    def swap(text: str, old: str, new: str) -> str:
        return _with_article(re.sub(rf"\b{re.escape(old)}\b", new, text, count=1))

    def others(values: list[str], value: str, n: int) -> list[str]:
        at = values.index(value)
        return [values[(at + i) % len(values)] for i in range(1, n + 1)]

    colour, shape = labels["colour"], labels["shape"]
    colours, kinds = others(list(shapes.COLOURS), colour, 2), others(list(shapes.SHAPES), shape, 2)
    out = [caption]
    out += [swap(caption, colour, c) for c in colours]
    out += [swap(caption, shape, k) for k in kinds]
    out.append(swap(swap(caption, colour, colours[0]), shape, kinds[0]))
    size = labels.get("size")
    if size and re.search(rf"\b{size}\b", caption):
        out.append(swap(caption, size, others(list(shapes.SIZES), size, 1)[0]))
    return list(dict.fromkeys(out))


def _torch_probabilities(out: Path, manifest: Manifest, image: Any, captions: list[str]) -> np.ndarray | None:
    """PyTorch's (open_clip, FP32) probabilities of `captions` for `image` (None without a tokenizer here)."""
    from clip_triton.clients._core import probabilities
    from clip_triton.exporter.parity.samples import reference_pixels, reference_transform
    from clip_triton.exporter.runtimes.base import TowerBatch
    from clip_triton.exporter.runtimes.torch import TorchRunner
    from clip_triton.exporter.sources import load_reference, release_model

    loaded = load_reference(manifest, export_dir=out / "export")
    try:
        if loaded.tokenizer is None:
            return None
        pixels = reference_pixels(reference_transform(manifest), [image])
        ids = np.asarray(loaded.tokenizer(captions)).astype(manifest.text.input.dtype)
        runner = TorchRunner(loaded)
        runner.open()
        try:
            image_emb = runner.embed_all("image", TowerBatch(pixels, [image.data]))
            text_emb = runner.embed_all("text", TowerBatch(ids, captions))
        finally:
            runner.close()
    finally:
        release_model(loaded)
    return probabilities(image_emb, text_emb, manifest.logit_scale, manifest.logit_bias)[0]


def _demo_accuracy(report: dict[str, Any]) -> list[str]:
    """The served zero-shot accuracy on the labelled set beside PyTorch's, from the build's parity report."""
    labelled = report.get("labelled")
    if not labelled:
        return ["zero-shot accuracy: no labelled set in this build's parity run (random weights: it would "
                "mean nothing; --labelled-set shapes on `parity` measures it anyway)"]
    lines = [f"zero-shot top-1 on {labelled['source']} (parity.json):"]
    served = [s for s in report["stages"] if s["stage"] in TRITON_STAGES and s.get("accuracy")]
    for stage in served:
        for row in stage["accuracy"]:
            if row.get("top1") is None:
                continue
            lines.append(
                f"  {stage['stage']:<14} {row['set']:<20} served {100 * row['top1']:5.1f}%   PyTorch "
                f"{100 * row['reference_top1']:5.1f}%   same pick as PyTorch: {row['images'] - row['changed']}/"
                f"{row['images']}"
            )
    return lines


def run_demo(
    model: str = DEMO_MODEL, out: Path = Path("build/demo"), quiet: bool = False, rebuild: bool = False,
    echo: Any = print,
) -> float:
    """Build (or reuse) `model`'s python-runtime repository (builtin weights when it has them, random ones
    otherwise), serve it, and rank a held-out shapes image's true caption among close confusers, served
    (ClipClient.classify over gRPC) beside PyTorch. Returns the served cosine of the image and its caption."""
    from clip_triton.clients.sync import ClipClient
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.parity import shapes
    from clip_triton.exporter.parity.labelled import SHAPES_SPLIT, png_bytes
    from clip_triton.exporter.parity.samples import ImageSample

    out = Path(out)
    progress = Progress("demo", quiet)
    weights = demo_weights(model)
    if rebuild or not reusable_build(out, model):
        run_build(
            BuildOptions(model=model, out=out, runtime=DEMO_RUNTIME, skip_engines=True, force=True, **weights),
            quiet=quiet,
        )
    else:
        progress.info(f"reusing the build in {out} (pass --rebuild to build again)")
    manifest = load_manifest(out / "export")
    served = repository_manifest(out / "repository")  # the repository's own record (the export keeps none)
    section = (served.repository if served is not None else None) or {}
    models = TritonModels.from_section(section)
    sample = shapes.sample(SHAPES_SPLIT, DEMO_IMAGE_INDEX)
    image_path = out / f"shapes-{SHAPES_SPLIT}-{DEMO_IMAGE_INDEX:04d}.png"
    with staged_file(image_path) as tmp:
        tmp.write_bytes(png_bytes(sample.image))
    image = ImageSample(image_path.name, image_path.read_bytes())
    captions = demo_captions(sample.caption, sample.labels)
    with progress.step("PyTorch reference: the same image and captions"):
        reference = _torch_probabilities(out, manifest, image, captions)
    with progress.step(f"starting tritonserver for {out / 'repository'}"):
        server = TritonServer(out / "repository").start()
    try:
        with ClipClient(server.grpc_url, prefix=models.prefix) as client:
            with progress.step(f"gRPC {server.grpc_url}: classify {image_path.name} over {len(captions)} captions"):
                served = client.classify([image.data], captions, templates=["{}"])[0]
            image_embedding = client.embed_images([image.data])[0]
            text_embedding = client.embed_texts([sample.caption])[0]
    finally:
        with progress.step("stopping tritonserver"):
            server.stop()
    cosine = float(cosine_rows(image_embedding[None], text_embedding[None])[0])
    report = json.loads((out / "parity.json").read_text())
    echo(format_table(report))
    echo("")
    weights_note, closing = demo_weights_notes(model, bool(manifest.random_weights))
    echo(f"model {model} ({weights_note}), served by the embedded tritonserver ({section.get('runtime')} runtime), "
         "queried over gRPC with ClipClient")
    echo(f"held-out image: {image_path} ({sample.image.size[0]}x{sample.image.size[1]} PNG)")
    echo(f"true caption:   {sample.caption!r}  (cosine with the image, served: {cosine:.4f})")
    width = max(len(c) for c in captions) + 2
    echo(f"  rank  {'caption':<{width}}served   PyTorch")
    for rank, index in enumerate(np.argsort(-served, kind="stable"), 1):
        torch_p = "" if reference is None else f"{100 * reference[index]:6.2f}%"
        mark = "  <- true caption" if index == 0 else ""
        echo(f"  {rank:<4}  {captions[index]:<{width}}{100 * served[index]:6.2f}%  {torch_p}{mark}")
    if reference is None:
        echo("  (no PyTorch column: the model's tokenizer is not available here)")
    for line in _demo_accuracy(report):
        echo(line)
    if closing:
        echo(closing)
    return cosine


def demo_weights_notes(model: str, random_weights: bool) -> tuple[str, str | None]:
    """The demo's words for its weights: the note beside the model name, and a closing line for random ones."""
    if not random_weights:
        return "builtin weights", None
    trained = (f"this installation ships no weights for {DEMO_MODEL}" if model == DEMO_MODEL
               else f"`clip-triton demo --model {DEMO_MODEL}` serves the trained model")
    return ("random weights: the values mean nothing",
            f"(random weights: rankings and accuracy mean nothing; {trained})")
