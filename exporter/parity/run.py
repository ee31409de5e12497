"""The parity suite, running side: every stage's runner over the same samples, then judged.

The runners come from the runtime registry (clip_triton.exporter.runtimes: ONNX Runtime per graph precision
and execution provider, TensorRT, a live Triton); PyTorch FP32 is the reference. This module runs
them and the server's preprocessing/tokenisation checks; `clip_triton.exporter.parity.report` judges the
results against the thresholds and writes the reports (docs/design.md, "Parity").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.clients import contract
from clip_triton.clients.cli_options import option
from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import (
    ClipTritonError,
    ParityError,
    Progress,
    check_min_cosine,
    check_number,
    check_writable_parent,
)
from clip_triton.exporter.base.export_inputs import load_export
from clip_triton.exporter.base.manifest import (
    ARTIFACTS,
    MANIFEST_NAME,
    TOWERS,
    Manifest,
    describe_weights,
    weights_record,
)
from clip_triton.exporter.parity import identity
from clip_triton.exporter.parity import labelled as labelled_sets
from clip_triton.exporter.parity.report import (
    ERROR,
    MIN_AGREEMENT_FP16,
    MIN_AGREEMENT_FP32,
    MIN_AGREEMENT_INT8,
    MIN_COSINE_FP16,
    MIN_COSINE_FP32,
    MIN_COSINE_INT8,
    PIXEL_TOLERANCE,
    SKIP,
    EmbeddingRun,
    StageResult,
    format_table,
    judge_accuracy,
    judge_embeddings,
    judge_ids,
    judge_pixels,
    write_reports,
)
from clip_triton.exporter.parity.samples import SampleSet, build_samples
from clip_triton.exporter.runtimes.torch import TorchRunner
from clip_triton.exporter.runtimes.triton import (
    TritonModels,
    TritonPixelsRunner,
    TritonRunner,
    triton_runner,
    triton_runners,
)

DEFAULT_SAMPLES = 16
MAX_SAMPLES = 10_000  # built-in samples of one run (each is rendered, preprocessed and embedded per stage)
TRITON_STAGES = ("triton-preprocess", "triton-tokenize", "triton", TritonPixelsRunner.name)  # what a live server adds


@dataclass(kw_only=True)
class ParityOptions:
    """The samples and thresholds of a parity run: options of `parity` and of `build` (clients/cli_options.py)."""

    samples: int = option(DEFAULT_SAMPLES, help="Built-in images and captions to compare (plus --images/--texts).")
    min_cosine_fp32: float = option(MIN_COSINE_FP32, help="Min cosine vs PyTorch for FP32 stages.")
    min_cosine_fp16: float = option(MIN_COSINE_FP16, help="Min cosine vs PyTorch for FP16 and TensorRT stages.")
    images: Path | None = option(None, help="A folder of your own images to add to the samples.")
    texts: Path | None = option(None, help="A UTF-8 file of your own captions, one per line.")
    labelled_set: str = option(
        labelled_sets.AUTO,
        help="Accuracy rows (zero-shot top-1, recall@1/5, agreement with PyTorch) on: shapes (the built-in "
        "held-out shapes), a folder of class sub-folders, a folder with captions.jsonl/.tsv (or that file), "
        "none, or auto (shapes for the builtin trained model, none otherwise).",
    )
    labelled_samples: int = option(
        labelled_sets.DEFAULT_SHAPES_IMAGES, help="Held-out shapes images of --labelled-set shapes."
    )
    min_agreement_fp32: float = option(
        MIN_AGREEMENT_FP32, help="Min share of labelled images whose top-1 equals PyTorch's, FP32 stages (0: off)."
    )
    min_agreement_fp16: float = option(
        MIN_AGREEMENT_FP16, help="Min top-1 agreement with PyTorch for FP16 and TensorRT stages (0: off)."
    )
    min_cosine_int8: float = option(MIN_COSINE_INT8, help="Min cosine vs PyTorch for INT8 (Q/DQ) stages.")
    min_agreement_int8: float = option(
        MIN_AGREEMENT_INT8, help="Min top-1 agreement with PyTorch for INT8 stages (0: off)."
    )

    def parity_kwargs(self) -> dict[str, Any]:
        """These options as run_parity's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(ParityOptions)}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _tower_batch(samples: SampleSet, tower: str) -> runtimes.TowerBatch:
    return samples.images if tower == "image" else samples.texts


def run_runner(runner: runtimes.Runner, samples: SampleSet, progress: Progress) -> EmbeddingRun:
    """Open `runner`, embed both towers' samples, close it; an error is recorded, never raised."""
    run = EmbeddingRun(runner.name, runner.describe(), runner.precision)
    start = time.perf_counter()
    try:
        with progress.step(f"{runner.name}: loading"):
            runner.open()
        embeds = {}
        for tower in TOWERS:
            batch = _tower_batch(samples, tower)
            with progress.step(f"{runner.name}: {tower} tower, {len(batch)} samples"):
                embeds[tower] = runner.embed_all(tower, batch)
        run.embeds = embeds
    except Exception as exc:  # noqa: BLE001 - one broken stage is reported, the others still run
        run.error = _one_line(exc)
        progress.warn(f"{runner.name}: {run.error}")
    finally:
        runner.close()
        run.seconds = time.perf_counter() - start
    return run


def compare_runner(
    runner: runtimes.Runner,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    text_ids_real: bool = True,
) -> dict[str, Any]:
    """Run `runner` and judge it against the reference embeddings (the report's JSON form)."""
    return _compare(runner, ref, samples, thresholds, progress, text_ids_real).to_dict()


def _compare(
    runner: runtimes.Runner | runtimes.Skipped,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    text_ids_real: bool,
) -> StageResult:
    """A planned runner's result: judged if it runs here, a SKIP with its reason if not."""
    if isinstance(runner, runtimes.Skipped):
        return StageResult(runner.name, SKIP, reason=runner.reason)
    run = run_runner(runner, samples, progress)
    result = judge_embeddings(run, ref, samples, thresholds, text_ids_real)
    if result.status == ERROR and run.embeds is not None:  # it ran, but gave the wrong shape
        progress.warn(f"{runner.name}: {result.reason}")
    return result


def check_triton_preprocessing(runner: TritonRunner, samples: SampleSet, progress: Progress) -> list[dict[str, Any]]:
    """Server-side preprocess and tokenize models vs open_clip: equality, not closeness (JSON form)."""
    return [r.to_dict() for r in _preprocessing_checks(runner, samples, progress)]


def _preprocessing_checks(runner: TritonRunner, samples: SampleSet, progress: Progress) -> list[StageResult]:
    results: list[StageResult] = []
    try:
        runner.open()
        with progress.step(f"triton: {runner.models.preprocess} vs open_clip's transform"):
            pixels = runner.infer_raw(runner.models.preprocess, samples.images.raw).astype(np.float32)
        results.append(judge_pixels("triton-preprocess", pixels, samples))
    except Exception as exc:  # noqa: BLE001
        results.append(StageResult("triton-preprocess", ERROR, tower="image", reason=_one_line(exc)))
    try:
        with progress.step(f"triton: {runner.models.tokenize} vs open_clip's tokenizer"):
            ids = runner.infer_raw(runner.models.tokenize, samples.texts.raw)
        results.append(judge_ids("triton-tokenize", ids, samples))
    except Exception as exc:  # noqa: BLE001
        results.append(StageResult("triton-tokenize", ERROR, tower="text", reason=_one_line(exc)))
    finally:
        runner.close()
    for result in results:
        if result.status == ERROR:
            progress.warn(f"{result.stage}: {result.reason}")
    return results


def repository_section(manifest: Manifest, repository: Path | None) -> dict[str, Any] | None:
    """The served repository's record: its own manifest's; without a repository folder (--url alone), the
    record an older clip-triton left in the export's manifest, if any (runtime, precision and prefix then
    unknown: the triton stages are judged at the FP32 threshold, with the default prefix)."""
    if repository is not None:
        from clip_triton.exporter.base.manifest import repository_manifest

        try:
            own = repository_manifest(Path(repository))
        except (ValueError, KeyError, TypeError) as exc:
            raise ClipTritonError(f"{repository}/manifest.json is not a clip-triton manifest: {exc}") from None
        if own is not None and own.repository:
            return own.repository
    return manifest.repository


def default_out(export_dir: Path) -> Path:
    """Where `parity` writes its reports by default: a folder beside the export (`<export>-parity`), never
    inside it; the export is another stage's artifact and stays byte-identical."""
    export_dir = Path(export_dir).resolve()
    return export_dir.with_name(f"{export_dir.name}-parity")


def report_paths(export_dir: Path, out: Path | None, report: Path | None, markdown: Path | None) -> tuple[Path, Path]:
    """(JSON, Markdown) report paths: --report/--markdown as given, else OUT/parity.json and OUT/parity.md
    (OUT: --out, else `default_out`). Neither may lie inside the export folder."""
    folder = Path(out) if out is not None else default_out(export_dir)
    json_path = Path(report) if report is not None else folder / "parity.json"
    md_path = Path(markdown) if markdown is not None else (
        json_path.with_suffix(".md") if report is not None else folder / "parity.md")
    inside = Path(export_dir).resolve()
    for flag, dest in (("--report", json_path), ("--markdown", md_path)):
        resolved = dest.resolve()
        if resolved == inside or inside in resolved.parents:
            raise ClipTritonError(
                f"{flag} {dest} is inside the export folder: parity writes its reports beside the export, "
                "never into it (give --out DIR or another path)"
            )
        check_writable_parent(dest)
    return json_path, md_path


def check_parity_options(
    samples: int,
    min_cosine_fp32: float,
    min_cosine_fp16: float,
    *,
    labelled_set: str | Path | None = None,
    labelled_samples: int = labelled_sets.DEFAULT_SHAPES_IMAGES,
    min_agreement_fp32: float = MIN_AGREEMENT_FP32,
    min_agreement_fp16: float = MIN_AGREEMENT_FP16,
    min_cosine_int8: float = MIN_COSINE_INT8,
    min_agreement_int8: float = MIN_AGREEMENT_INT8,
) -> None:
    """The options of a parity run (`parity`, and `build` before any work): one line each, exit 2."""
    check_number("--samples", samples, 0, MAX_SAMPLES)
    check_min_cosine("--min-cosine-fp32", min_cosine_fp32)
    check_min_cosine("--min-cosine-fp16", min_cosine_fp16)
    check_number("--labelled-samples", labelled_samples, 1, labelled_sets.MAX_LABELLED_IMAGES)
    check_number("--min-agreement-fp32", min_agreement_fp32, 0, 1)
    check_number("--min-agreement-fp16", min_agreement_fp16, 0, 1)
    check_min_cosine("--min-cosine-int8", min_cosine_int8)
    check_number("--min-agreement-int8", min_agreement_int8, 0, 1)
    labelled_sets.check_choice(labelled_set)


def plan_runners(ctx: runtimes.RunContext) -> list[runtimes.Runner | runtimes.Skipped]:
    """Every registered runtime's runners, in registry order: those that can run here, and a skip
    record (with its reason) for every other one."""
    return [item for runtime in runtimes.registered() for item in runtime.runners(ctx)]


def run_parity(
    export_dir: Path,
    *,
    repository: Path | None = None,
    url: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    min_cosine_fp32: float = MIN_COSINE_FP32,
    min_cosine_fp16: float = MIN_COSINE_FP16,
    images: Path | None = None,
    texts: Path | None = None,
    labelled_set: str | Path | None = labelled_sets.AUTO,
    labelled_samples: int = labelled_sets.DEFAULT_SHAPES_IMAGES,
    min_agreement_fp32: float = MIN_AGREEMENT_FP32,
    min_agreement_fp16: float = MIN_AGREEMENT_FP16,
    min_cosine_int8: float = MIN_COSINE_INT8,
    min_agreement_int8: float = MIN_AGREEMENT_INT8,
    out: Path | None = None,
    report: Path | None = None,
    markdown: Path | None = None,
    providers: list[str] | None = None,
    check_runtimes: tuple[str, ...] = (),
    progress: Progress | None = None,
    echo: Any = None,
) -> dict[str, Any]:
    """Compare every available stage with the PyTorch reference; write the reports (beside the export,
    never into it: `report_paths`); raise ParityError naming each failing stage and tower, and
    identity.DifferentModelError, before any comparison, when the server or repository serves another model.

    `repository` alone: a local tritonserver is started for it. `url` alone: a running server (several,
    comma-separated: replicas, each checked). Both: the server at `url` serves `repository` (its record
    gives runtime, precision and prefix; no local server). `providers`: ONNX Runtime execution providers
    to check (None: CPU plus every GPU provider that can run here). `check_runtimes`: runtimes judged only
    where they serve (openvino) to check on this export anyway, before a repository for them exists."""
    progress = progress or Progress("parity", quiet=True)
    export_dir = Path(export_dir)
    check_parity_options(
        samples, min_cosine_fp32, min_cosine_fp16, labelled_set=labelled_set, labelled_samples=labelled_samples,
        min_agreement_fp32=min_agreement_fp32, min_agreement_fp16=min_agreement_fp16,
        min_cosine_int8=min_cosine_int8, min_agreement_int8=min_agreement_int8,
    )
    if repository is not None and not Path(repository).is_dir():
        raise ClipTritonError(f"--repository {repository} is not a folder")
    unknown = [name for name in check_runtimes if runtimes.find(name) is None]
    if unknown:
        known = ", ".join(r.name for r in runtimes.registered())
        raise ClipTritonError(f"--check-runtime {unknown[0]!r} is not a runtime; known: {known}")
    urls = _parse_urls(url)
    manifest = load_export(export_dir, list(ARTIFACTS))  # every graph that exists is compared
    report, markdown = report_paths(export_dir, out, report, markdown)
    section = repository_section(manifest, repository)
    if urls and repository is None and section is None:
        section = _served_models(urls[0])
        if not (section or {}).get("precision"):
            progress.warn(
                "the served repository's runtime and precision are unknown (the server does not publish them; "
                "pass --repository REPO): the triton stages are judged at the FP32 threshold"
            )
    # Which model is served, before anything is computed: another model is one line, not drift.
    expected = identity.expected_checksums(manifest)
    served: list[identity.Served] = []
    if repository is not None:
        served.append(identity.from_repository(Path(repository)))
    prefix = TritonModels.from_section(section).prefix
    served += [identity.from_server(u, prefix) for u in urls]
    _check_identity(manifest, expected, served, progress)

    thresholds = {"fp32": float(min_cosine_fp32), "fp16": float(min_cosine_fp16), "int8": float(min_cosine_int8)}
    chosen = labelled_sets.resolve(labelled_set, manifest.pretrained)
    labelled = None
    if chosen is not None:
        thresholds.update(
            agreement_fp32=float(min_agreement_fp32), agreement_fp16=float(min_agreement_fp16),
            agreement_int8=float(min_agreement_int8),
        )
        with progress.step(f"labelled set: {chosen}"):
            labelled = labelled_sets.load(chosen, labelled_samples)
    started = time.perf_counter()

    # The live server's stages are run below, not planned by the registry (one set per replica).
    ctx = runtimes.RunContext(export_dir, manifest, providers=providers, url=None, section=section,
                              check_runtimes=tuple(check_runtimes))
    planned = plan_runners(ctx)
    from clip_triton.exporter.sources import load_reference

    with progress.step(f"rebuilding the PyTorch reference ({manifest.model_name})"):
        loaded = load_reference(manifest, progress=progress, export_dir=export_dir)
    with progress.step("samples: open_clip preprocessing and tokenisation"):
        sample_set, ids_real = build_samples(manifest, loaded, samples, images, texts, labelled)
    progress.info(
        f"{len(sample_set.image_names)} images, {sample_set.n_captions} captions, "
        f"{len(sample_set.prompts)} zero-shot prompts"
        + (f" (labelled set: {labelled.source})" if labelled is not None else "")
    )
    reference = TorchRunner(loaded)
    reference.open()
    ref = {}
    for tower in TOWERS:
        batch = _tower_batch(sample_set, tower)
        with progress.step(f"pytorch: {tower} tower, {len(batch)} samples"):
            ref[tower] = reference.embed_all(tower, batch)
    reference.close()
    # The reference is computed: release the PyTorch model before any runner opens its sessions
    # (docs/engines.md, "Memory"); nothing below needs it.
    from clip_triton.exporter.sources import release_model

    release_model(loaded)

    stages: list[StageResult] = [_compare(item, ref, sample_set, thresholds, progress, ids_real) for item in planned]
    if not urls and repository is None:
        stages.append(StageResult("triton", SKIP, reason="no --repository or --url given"))
    elif urls:
        for u in urls:
            tag = u if len(urls) > 1 else None
            stages.extend(_served_stages(u, section, ref, sample_set, thresholds, progress, ids_real, tag))
    else:
        assert repository is not None
        stages.extend(_local_triton(
            Path(repository), manifest, expected, served, section, ref, sample_set, thresholds, progress, ids_real))

    failures = [line for stage in stages for line in stage.failure_lines()]
    result = {
        "passed": not failures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export": str(export_dir.resolve()),
        "model": manifest.model_name,
        "pretrained": manifest.pretrained,
        "random_weights": manifest.random_weights,
        "tested": _tested_record(export_dir, manifest, repository, urls, expected, served),
        "thresholds": {**thresholds, "pixels_max_abs_diff": PIXEL_TOLERANCE},
        "samples": {
            "images": sample_set.image_names,
            "captions": sample_set.captions,
            "prompts": len(sample_set.prompts),
            "labels": sample_set.labels,
        },
        **({"labelled": _labelled_record(labelled, sample_set, ref)} if labelled is not None else {}),
        "stages": [stage.to_dict() for stage in stages],
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_reports(result, report, markdown)
    if echo is not None:
        echo(format_table(result))
    if failures:
        raise ParityError("parity failed: " + "; ".join(failures) + f" (report: {report})")
    return result


def _parse_urls(url: str | None) -> list[str]:
    """--url as a list of endpoints (the clients' syntax: comma-separated replicas); a bad one is one line."""
    if url is None:
        return []
    from clip_triton.clients._core import parse_urls
    from clip_triton.clients.errors import ClipClientError

    try:
        return list(parse_urls(url))
    except ClipClientError as exc:
        raise ClipTritonError(f"--url: {exc}") from None


def _served_models(url: str) -> dict[str, Any] | None:
    """A record for a server whose repository is not at hand: the default prefix's models it has ready (so
    an entry point it lacks is skipped, one it has is checked), and the runtime and precision its image
    ensemble publishes (older repositories publish none: then they stay unknown)."""
    import tritonclient.grpc as grpcclient

    names = contract.model_names(contract.DEFAULT_PREFIX)
    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            ready = {role: name for role, name in names.items() if client.is_model_ready(name)}
            params: dict[str, str] = {}
            if "image" in ready:
                config = client.get_model_config(ready["image"]).config
                params = {key: value.string_value for key, value in config.parameters.items()}
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreachable: the stages report it
        return None
    if not ready:
        return None
    served = {key: params[p] for key, p in (("runtime", contract.PARAM_RUNTIME),
                                            ("precision", contract.PARAM_PRECISION)) if params.get(p)}
    return {"prefix": contract.DEFAULT_PREFIX, "models": ready, **served}


def _check_identity(
    manifest: Manifest, expected: dict[str, str], served: list[identity.Served], progress: Progress
) -> None:
    """Stop on another model (identity.check); warn once per server/repository whose model is unknown."""
    if not served:
        return
    identity.check(manifest, served)
    if not expected:
        progress.warn(f"the export's {MANIFEST_NAME} records no encoder checksums: which model is served is unknown")
        return
    for item in served:
        if item.status == identity.MATCH:
            progress.info(f"the {item.where} serves this export (encoder checksums match)")
        else:
            progress.warn(identity.unknown_line(item))


def _tested_record(
    export_dir: Path,
    manifest: Manifest,
    repository: Path | None,
    urls: list[str],
    expected: dict[str, str],
    served: list[identity.Served],
) -> dict[str, Any]:
    """What this run tested: the export, its weights, the repository folder and the server URL(s), and
    what each server/repository said it serves."""
    return {
        "export": str(Path(export_dir).resolve()),
        "weights": weights_record(manifest),
        "weights_text": describe_weights(manifest, full=True),
        "encoder_sha256": expected,
        "repository": str(Path(repository).resolve()) if repository is not None else None,
        "urls": urls,
        "served": [item.to_dict() for item in served],
    }


def _labelled_record(
    labelled: labelled_sets.LabelledSet, samples: SampleSet, ref: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The report's labelled-set record: what it is, and PyTorch's own accuracy rows on it."""
    return {
        "name": labelled.name,
        "source": labelled.source,
        "images": len(labelled.images),
        "label_sets": {ls.name: len(ls.labels) for ls in labelled.label_sets},
        "captions": len(labelled.captions),
        "pytorch": [
            {k: v for k, v in asdict(row).items() if v is not None and k not in ("status", "min_agreement")}
            for row in judge_accuracy(samples, ref, None, None)
        ],
    }


def _triton_checks(
    url: str, section: dict[str, Any] | None, samples: SampleSet, progress: Progress, ids_real: bool
) -> list[StageResult]:
    """Preprocess/tokenize equality checks for the Triton at `url` (its embedding stage is a runner)."""
    checks = _preprocessing_checks(triton_runner(url, section), samples, progress)
    if not ids_real:
        checks = [c for c in checks if c.stage != "triton-tokenize"]
        checks.append(StageResult("triton-tokenize", SKIP, reason="no reference tokenizer here"))
    return checks


def _served_stages(
    url: str,
    section: dict[str, Any] | None,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    ids_real: bool,
    tag: str | None = None,
) -> list[StageResult]:
    """Every Triton stage against the server at `url`: the equality checks, then both entry points.
    `tag` (one of several replicas): appended to each stage name as `@HOST:PORT`."""
    results = _triton_checks(url, section, samples, progress, ids_real)
    if tag is not None:
        for check in results:
            _tag_stage(check, tag)
    for item in triton_runners(url, section):
        if tag is not None:
            if isinstance(item, runtimes.Skipped):
                item = replace(item, name=f"{item.name}@{tag}")
            else:
                item.name = f"{item.name}@{tag}"  # before it runs: its failure lines carry the name
        results.append(_compare(item, ref, samples, thresholds, progress, ids_real))
    return results


def _tag_stage(result: StageResult, tag: str) -> None:
    old = result.stage
    result.stage = f"{old}@{tag}"
    if result.failures is not None:
        result.failures = [result.stage + line[len(old):] if line.startswith(old) else line for line in result.failures]


def _local_triton(
    repository: Path,
    manifest: Manifest,
    expected: dict[str, str],
    served: list[identity.Served],
    section: dict[str, Any] | None,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    ids_real: bool,
) -> list[StageResult]:
    """Start the embedded tritonserver for `repository`, check which model it serves (its configs may say
    otherwise than its manifest), run the Triton stages, stop it."""
    served_runtime = runtimes.find((section or {}).get("runtime"))
    why = served_runtime.serving.embedded_reason if served_runtime is not None and served_runtime.serving else None
    if why is not None:
        return [StageResult(name, SKIP, reason=why) for name in TRITON_STAGES]
    from clip_triton.exporter.base.server import TritonServer

    try:
        with progress.step(f"starting a local tritonserver for {repository}"):
            server = TritonServer(repository)
            server.start()
    except Exception as exc:  # noqa: BLE001 - the stage fails with the server's reason, others stand
        reason = f"could not start tritonserver: {_one_line(exc)}"
        progress.warn(reason)
        return [StageResult("triton", ERROR, reason=reason)]
    try:
        url = server.grpc_url
        live = identity.from_server(url, TritonModels.from_section(section).prefix)
        live.where = f"local tritonserver for repository {repository}"
        served.append(live)
        identity.check(manifest, [live])
        if live.status != identity.MATCH and expected:
            progress.warn(identity.unknown_line(live))
        return _served_stages(url, section, ref, samples, thresholds, progress, ids_real)
    finally:
        with progress.step("stopping tritonserver"):
            server.stop()
