"""Stage-by-stage comparison with the PyTorch reference.

Cosine is computed per row (per sample), never over a flattened batch: one bad embedding in a
batch of many must fail the check (Polygraphy's cosine judges the batch as one vector).
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from exporter.common import ClipTritonError, MissingDependencyError, ParityError, Progress, check_writable_parent
from exporter.manifest import (
    IMAGE_FP16_ONNX,
    IMAGE_PLAN,
    TEXT_FP16_ONNX,
    TEXT_PLAN,
    TOWERS,
    Manifest,
    load_manifest,
)


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
    cos = cosine_rows(reference, other)
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64))
    return {
        "samples": int(len(cos)),
        "min_cosine": float(cos.min()) if len(cos) else float("nan"),
        "mean_cosine": float(cos.mean()) if len(cos) else float("nan"),
        "max_abs_diff": float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# The parity suite: runners with one small interface, a comparator that loops over them.
# ---------------------------------------------------------------------------------------------

MIN_COSINE_FP32 = 0.99999
MIN_COSINE_FP16 = 0.999
PIXEL_TOLERANCE = 1e-6
DEFAULT_SAMPLES = 16
BATCH = 16  # rows per call into a runner: bounds memory, exercises batching
PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"


@dataclass
class TowerBatch:
    """What a runner embeds: the reference-preprocessed tensor and the raw samples it came from.

    Tensor runners (PyTorch, ONNX Runtime, TensorRT) read `tensor`; Triton reads `raw` (encoded
    image bytes, caption strings) so its own preprocessing and tokenisation are part of the check.
    """

    tensor: np.ndarray
    raw: list[Any]

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, rows: slice) -> TowerBatch:
        return TowerBatch(self.tensor[rows], self.raw[rows])


class Runner:
    """Embed a batch -> numpy [B, D] float32. Subclasses set name/precision and load in `open`."""

    name = "runner"
    precision = "fp32"  # decides the threshold: fp32 or fp16
    max_batch = BATCH

    def describe(self) -> str:
        return self.name

    def open(self) -> None:  # noqa: B027 - optional hook
        pass

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def embed_all(self, tower: str, batch: TowerBatch) -> np.ndarray:
        step = max(1, min(self.max_batch, BATCH))
        parts = [self.embed(tower, batch[i : i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(parts, axis=0).astype(np.float32)


class TorchRunner(Runner):
    """The PyTorch FP32 reference every other stage is compared with."""

    name = "pytorch"

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.modules: dict[str, Any] = {}

    def describe(self) -> str:
        return f"PyTorch FP32 reference ({self.loaded.name})"

    def open(self) -> None:
        from exporter.onnx_export import tower_modules

        self.modules = tower_modules(self.loaded)

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        from exporter.onnx_export import torch_embed

        return torch_embed(self.modules[tower], np.ascontiguousarray(batch.tensor))


class OrtRunner(Runner):
    """ONNX Runtime on CPU over the exported graphs (FP32, or FP16 with the optimiser off)."""

    def __init__(self, name: str, precision: str, files: dict[str, Path], optimize: bool = True) -> None:
        self.name = name
        self.precision = precision
        self.files = files
        self.optimize = optimize
        self.sessions: dict[str, Any] = {}

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.files.values())
        return f"ONNX Runtime CPU ({names}{'' if self.optimize else '; optimiser off'})"

    def open(self) -> None:
        from exporter.onnx_export import ort_session

        self.sessions = {tower: ort_session(path, optimize=self.optimize) for tower, path in self.files.items()}

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        session = self.sessions[tower]
        spec = session.get_inputs()[0]
        tensor = batch.tensor
        if spec.type == "tensor(float16)":  # an FP16 graph without FP32 I/O
            tensor = tensor.astype(np.float16)
        return np.asarray(session.run(None, {spec.name: np.ascontiguousarray(tensor)})[0], dtype=np.float32)

    def close(self) -> None:
        self.sessions = {}


class TensorRTRunner(Runner):
    """Serialized TensorRT engines on the GPU, through exporter.engines' own EngineRunner."""

    name = "tensorrt"
    precision = "fp16"

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.engines: dict[str, Any] = {}

    def describe(self) -> str:
        return f"TensorRT ({', '.join(p.name for p in self.files.values())})"

    def open(self) -> None:
        from exporter.engines import EngineRunner, require_runtime

        runtime = require_runtime()
        for tower, path in self.files.items():
            runner = EngineRunner(runtime, path)
            self.engines[tower] = runner
            # Every call must fit the profile (its shapes: min, opt, max).
            profile_max = runner.engine.get_tensor_profile_shape(runner.inputs[0], 0)[2][0]
            self.max_batch = min(self.max_batch, int(profile_max))

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        return self.engines[tower](batch.tensor)

    def close(self) -> None:
        self.engines = {}


@dataclass
class TritonModels:
    """Names of the repository's models (from manifest.repository; `clip` prefix by default)."""

    image: str = "clip_image"
    text: str = "clip_text"
    preprocess: str = "clip_image_preprocess"
    tokenize: str = "clip_text_tokenize"

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> TritonModels:
        section = section or {}
        prefix = section.get("prefix") or section.get("name_prefix") or "clip"
        models: dict[str, Any] = section["models"] if isinstance(section.get("models"), dict) else {}
        return cls(
            image=str(models.get("image") or f"{prefix}_image"),
            text=str(models.get("text") or f"{prefix}_text"),
            preprocess=str(models.get("image_preprocess") or models.get("preprocess") or f"{prefix}_image_preprocess"),
            tokenize=str(models.get("text_tokenize") or models.get("tokenize") or f"{prefix}_text_tokenize"),
        )


class TritonRunner(Runner):
    """A live Triton over gRPC, through the ensembles, from raw bytes and strings."""

    name = "triton"

    def __init__(self, url: str, models: TritonModels, precision: str, runtime: str | None) -> None:
        self.url = url
        self.models = models
        self.precision = precision
        self.runtime = runtime
        self.client: Any = None
        self._io: dict[str, tuple[str, str, int]] = {}

    def describe(self) -> str:
        runtime = self.runtime or "unknown runtime"
        return f"Triton gRPC {self.url} ({self.models.image}, {self.models.text}; {runtime}, {self.precision})"

    def open(self) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(self.url)
        if not self.client.is_server_ready():
            raise ClipTritonError(f"the Triton server at {self.url} is not ready")

    def model_io(self, model: str) -> tuple[str, str, int]:
        """(input name, output name, max_batch_size) as the server reports them."""
        if model not in self._io:
            if not self.client.is_model_ready(model):
                raise ClipTritonError(f"model {model!r} is not ready on {self.url}")
            meta = self.client.get_model_metadata(model)
            config = self.client.get_model_config(model).config
            self._io[model] = (meta.inputs[0].name, meta.outputs[0].name, int(config.max_batch_size))
        return self._io[model]

    def infer_raw(self, model: str, raw: list[Any]) -> np.ndarray:
        """Send BYTES items (image bytes or UTF-8 strings) to `model`; its first output, stacked."""
        import tritonclient.grpc as grpcclient

        in_name, out_name, max_batch = self.model_io(model)
        items = [r.encode("utf-8") if isinstance(r, str) else bytes(r) for r in raw]
        step = max_batch if max_batch > 0 else 1
        parts = []
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            data = np.array(chunk, dtype=np.object_).reshape(len(chunk), 1)
            if max_batch == 0:
                data = data.reshape(1)
            tensor = grpcclient.InferInput(in_name, list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            result = self.client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(out_name)])
            out = result.as_numpy(out_name)
            parts.append(out if max_batch > 0 else out[None])
        return np.concatenate(parts, axis=0)

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        model = self.models.image if tower == "image" else self.models.text
        return self.infer_raw(model, batch.raw).astype(np.float32)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


# ---------------------------------------------------------------------------------------------
# Samples and the reference preprocessing / tokenisation (open_clip's own)
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleSet:
    image_names: list[str]
    images: TowerBatch  # pixels from open_clip's transform; raw = encoded bytes
    captions: list[str]
    prompts: list[str]  # zero-shot prompts, label-major
    texts: TowerBatch  # captions + prompts; ids from open_clip's tokenizer; raw = strings
    labels: list[str]
    templates: int

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def reference_transform(manifest: Manifest) -> Any:
    """open_clip's eval transform, built from the manifest's PreprocessCfg."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre = manifest.preprocess
    try:
        cfg = PreprocessCfg(
            size=tuple(pre.size),
            mode=pre.mode,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
            interpolation=pre.interpolation,
            resize_mode=pre.resize_mode,
            fill_color=pre.fill_color,
        )
        return image_transform_v2(cfg, is_train=False)
    except AssertionError:
        raise ClipTritonError(f"open_clip cannot build the manifest's preprocessing config: {pre}") from None


def reference_pixels(transform: Any, images: list[Any]) -> np.ndarray:
    from PIL import Image

    rows = []
    for sample in images:
        with Image.open(io.BytesIO(sample.data)) as image:
            rows.append(transform(image).numpy())
    return np.stack(rows).astype(np.float32)


def build_samples(
    manifest: Manifest,
    loaded: Any,
    export_dir: Path,
    count: int,
    images_dir: Path | None = None,
    texts_file: Path | None = None,
) -> tuple[SampleSet, bool]:
    """The sample set and whether its token ids are real (False: synthetic, no tokenizer here)."""
    from exporter import samples as builtin

    if count < 0:
        raise ClipTritonError("--samples must be 0 or more")
    images = (builtin.user_images(images_dir) if images_dir else []) + builtin.builtin_images(count)
    captions = (builtin.user_texts(texts_file) if texts_file else []) + builtin.builtin_texts(count)
    if not images:
        raise ClipTritonError("no images to compare: give --samples 1 or more, or --images FOLDER")
    prompts = builtin.zero_shot_prompts()
    texts = captions + prompts
    pixels = reference_pixels(reference_transform(manifest), images)
    tokenizer = loaded.tokenizer
    if tokenizer is not None:
        ids = np.asarray(tokenizer(texts)).astype(manifest.text.input.dtype)
    else:
        cfg = manifest.tokenizer
        rng = np.random.default_rng(0)
        ids = np.full((len(texts), cfg.context_length), cfg.pad_id, dtype=manifest.text.input.dtype)
        for row, text in enumerate(texts):
            length = max(1, min(cfg.context_length, 2 + len(text.split())))
            ids[row, :length] = rng.integers(2, cfg.vocab_size - 2, size=length)
            if cfg.eot_id is not None:
                ids[row, length - 1] = cfg.eot_id
    sample_set = SampleSet(
        image_names=[s.name for s in images],
        images=TowerBatch(pixels, [s.data for s in images]),
        captions=captions,
        prompts=prompts,
        texts=TowerBatch(ids, texts),
        labels=list(builtin.LABELS),
        templates=len(builtin.TEMPLATES),
    )
    return sample_set, tokenizer is not None


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _top1(images: np.ndarray, texts: np.ndarray, samples: SampleSet) -> dict[str, np.ndarray]:
    """Image -> caption and image -> label top-1 (labels: mean of their prompt embeddings)."""
    images, texts = _normalise(images), _normalise(texts)
    out = {}
    captions = texts[: samples.n_captions]
    if len(captions):
        out["captions"] = np.argmax(images @ captions.T, axis=1)
    prompts = texts[samples.n_captions :].reshape(len(samples.labels), samples.templates, -1)
    classes = _normalise(prompts.mean(axis=1))
    out["labels"] = np.argmax(images @ classes.T, axis=1)
    return out


def zero_shot_agreement(
    ref: dict[str, np.ndarray], images: np.ndarray, texts: np.ndarray, samples: SampleSet
) -> dict[str, float]:
    """Fraction of images whose top-1 caption / label is the one PyTorch picks."""
    want = _top1(ref["image"], ref["text"], samples)
    got = _top1(images, texts, samples)
    return {key: float(np.mean(got[key] == want[key])) for key in want}


def tower_figures(ref: np.ndarray, other: np.ndarray, names: list[str]) -> dict[str, Any]:
    figures = compare_embeddings(ref, other)
    cos = cosine_rows(ref, other)
    if len(cos):
        figures["worst_sample"] = names[int(np.argmin(cos))]
    return figures


# ---------------------------------------------------------------------------------------------
# Stage discovery
# ---------------------------------------------------------------------------------------------


def _tensorrt_missing() -> str | None:
    """Why engines cannot run here (no TensorRT, stubs only, no GPU), or None."""
    from exporter.engines import require_runtime

    try:
        require_runtime()
    except MissingDependencyError as exc:
        return str(exc)
    return None


def _section_files(section: dict[str, Any] | None, defaults: dict[str, str]) -> dict[str, str]:
    """tower -> file name, from a manifest section's `files`/`<tower>` entries when it records them."""
    names = dict(defaults)
    if isinstance(section, dict):
        for tower in TOWERS:
            entry = section.get(tower)
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                names[tower] = entry["file"]
            elif isinstance(entry, str) and entry.endswith((".onnx", ".plan")):
                names[tower] = entry
    return names


def triton_precision(section: dict[str, Any] | None) -> tuple[str, str | None]:
    """The Triton stage's threshold class: fp16 for fp16 or tensorrt repositories, else fp32."""
    section = section or {}
    runtime = section.get("runtime")
    precision = str(section.get("precision") or "fp32")
    return ("fp16" if runtime == "tensorrt" or precision == "fp16" else "fp32"), runtime


def triton_runner(url: str, section: dict[str, Any] | None) -> TritonRunner:
    """A runner for the repository a manifest `repository` section describes, served at `url`."""
    precision, runtime = triton_precision(section)
    return TritonRunner(url, TritonModels.from_section(section), precision, runtime)


def repository_section(manifest: Manifest, repository: Path | None) -> dict[str, Any] | None:
    """The repository record: the served repository's own manifest first, else the export's."""
    if repository is not None:
        from exporter.repository import repository_manifest

        try:
            own = repository_manifest(Path(repository))
        except (ValueError, KeyError, TypeError) as exc:
            raise ClipTritonError(f"{repository}/manifest.json is not a clip-triton manifest: {exc}") from None
        if own is not None and own.repository:
            return own.repository
    return manifest.repository


def plan_runners(
    export_dir: Path, manifest: Manifest, url: str | None, section: dict[str, Any] | None = None
) -> tuple[list[Runner], list[dict[str, Any]]]:
    """Every stage that can run here, and a skip record (with its reason) for every other one."""
    runners: list[Runner] = []
    skipped: list[dict[str, Any]] = []
    fp32 = {t: export_dir / manifest.tower(t).file for t in TOWERS}
    missing = [p.name for p in fp32.values() if not p.is_file()]
    if missing:
        raise ClipTritonError(f"{export_dir} lacks {', '.join(missing)}; re-run `clip-triton export`")
    runners.append(OrtRunner("onnx-fp32", "fp32", fp32))

    fp16_names = _section_files(manifest.fp16, {"image": IMAGE_FP16_ONNX, "text": TEXT_FP16_ONNX})
    fp16 = {t: export_dir / n for t, n in fp16_names.items()}
    if all(p.is_file() for p in fp16.values()):
        runners.append(OrtRunner("onnx-fp16", "fp16", fp16, optimize=False))
    else:
        skipped.append({"stage": "onnx-fp16", "status": SKIP, "reason": "no FP16 graphs (run `clip-triton fp16`)"})

    plan_names = _section_files(manifest.engines, {"image": IMAGE_PLAN, "text": TEXT_PLAN})
    plans = {t: export_dir / n for t, n in plan_names.items()}
    if not all(p.is_file() for p in plans.values()):
        skipped.append({"stage": "tensorrt", "status": SKIP, "reason": "no engines (run `clip-triton engines`)"})
    elif (why := _tensorrt_missing()) is not None:
        skipped.append({"stage": "tensorrt", "status": SKIP, "reason": why})
    else:
        runners.append(TensorRTRunner(plans))

    if url is not None:
        runners.append(triton_runner(url, section if section is not None else manifest.repository))
    return runners, skipped


# ---------------------------------------------------------------------------------------------
# The comparator
# ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def compare_runner(
    runner: Runner,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    text_ids_real: bool = True,
) -> dict[str, Any]:
    """Embed the samples with `runner` and judge it against the reference embeddings."""
    threshold = thresholds[runner.precision]
    result: dict[str, Any] = {
        "stage": runner.name,
        "runner": runner.describe(),
        "precision": runner.precision,
        "threshold": threshold,
    }
    start = time.perf_counter()
    try:
        with progress.step(f"{runner.name}: loading"):
            runner.open()
        embeds = {}
        for tower in TOWERS:
            batch = samples.images if tower == "image" else samples.texts
            with progress.step(f"{runner.name}: {tower} tower, {len(batch)} samples"):
                embeds[tower] = runner.embed_all(tower, batch)
            if embeds[tower].shape != ref[tower].shape:
                raise ClipTritonError(
                    f"{tower} embeddings have shape {embeds[tower].shape}, expected {ref[tower].shape}"
                )
    except Exception as exc:  # noqa: BLE001 - one broken stage is reported, the others still run
        result.update(status=ERROR, reason=_one_line(exc), seconds=round(time.perf_counter() - start, 2))
        progress.warn(f"{runner.name}: {result['reason']}")
        return result
    finally:
        runner.close()
    names = {"image": samples.image_names, "text": samples.texts.raw}
    towers: dict[str, Any] = {}
    failures = []
    for tower in TOWERS:
        figures = tower_figures(ref[tower], embeds[tower], names[tower])
        # Per tower: the other tower stays PyTorch's, so a drop is this tower's own doing.
        other = {"image": (embeds["image"], ref["text"]), "text": (ref["image"], embeds["text"])}[tower]
        figures["zero_shot"] = zero_shot_agreement(ref, *other, samples)
        figures["status"] = PASS if figures["min_cosine"] >= threshold else FAIL
        if figures["status"] == FAIL:
            failures.append(
                f"{runner.name} {tower} tower: min cosine {figures['min_cosine']:.6f} < {threshold} "
                f"(worst sample: {figures.get('worst_sample', '?')!r:.60})"
            )
        towers[tower] = figures
    result.update(
        status=FAIL if failures else PASS,
        towers=towers,
        zero_shot=zero_shot_agreement(ref, embeds["image"], embeds["text"], samples),
        failures=failures,
        seconds=round(time.perf_counter() - start, 2),
    )
    if not text_ids_real:
        result["note"] = "text compared on synthetic token ids (no tokenizer available here)"
    return result


def check_triton_preprocessing(
    runner: TritonRunner, samples: SampleSet, progress: Progress
) -> list[dict[str, Any]]:
    """Server-side preprocess and tokenize models vs open_clip: equality, not closeness."""
    results: list[dict[str, Any]] = []
    try:
        runner.open()
        with progress.step(f"triton: {runner.models.preprocess} vs open_clip's transform"):
            pixels = runner.infer_raw(runner.models.preprocess, samples.images.raw).astype(np.float32)
        want = samples.images.tensor
        if pixels.shape != want.shape:
            results.append(
                {"stage": "triton-preprocess", "status": FAIL, "tower": "image",
                 "failures": [f"triton-preprocess: pixel tensors have shape {pixels.shape}, expected {want.shape}"]}
            )
        else:
            diff = np.abs(pixels.astype(np.float64) - want).reshape(len(want), -1).max(axis=1)
            bad = [samples.image_names[i] for i in np.flatnonzero(~(diff < PIXEL_TOLERANCE))]
            worst = int(np.argmax(diff))
            results.append({
                "stage": "triton-preprocess",
                "tower": "image",
                "status": FAIL if bad else PASS,
                "threshold": PIXEL_TOLERANCE,
                "max_abs_diff": float(diff.max()),
                "worst_sample": samples.image_names[worst],
                "mismatched": bad,
                "failures": [f"triton-preprocess image: pixels differ from open_clip in {len(bad)}/{len(want)} "
                             f"images (max abs diff {diff.max():.3g} >= {PIXEL_TOLERANCE}; e.g. {bad[0]})"]
                if bad else [],
            })
    except Exception as exc:  # noqa: BLE001
        results.append({"stage": "triton-preprocess", "tower": "image", "status": ERROR, "reason": _one_line(exc)})
    try:
        with progress.step(f"triton: {runner.models.tokenize} vs open_clip's tokenizer"):
            ids = runner.infer_raw(runner.models.tokenize, samples.texts.raw)
        want = samples.texts.tensor
        if ids.shape != want.shape:
            results.append(
                {"stage": "triton-tokenize", "status": FAIL, "tower": "text",
                 "failures": [f"triton-tokenize: ids have shape {ids.shape}, expected {want.shape}"]}
            )
        else:
            rows = np.flatnonzero((ids.astype(np.int64) != want.astype(np.int64)).any(axis=1))
            bad = [samples.texts.raw[i] for i in rows]
            results.append({
                "stage": "triton-tokenize",
                "tower": "text",
                "status": FAIL if bad else PASS,
                "dtype": str(ids.dtype),
                "mismatched": bad,
                "failures": [f"triton-tokenize text: ids differ from open_clip in {len(bad)}/{len(want)} captions "
                             f"(e.g. {bad[0]!r:.60})"] if bad else [],
            })
    except Exception as exc:  # noqa: BLE001
        results.append({"stage": "triton-tokenize", "tower": "text", "status": ERROR, "reason": _one_line(exc)})
    finally:
        runner.close()
    for result in results:
        if result["status"] == ERROR:
            progress.warn(f"{result['stage']}: {result['reason']}")
    return results


def _stage_failures(stage: dict[str, Any]) -> list[str]:
    if stage["status"] == ERROR:
        return [f"{stage['stage']}: {stage['reason']}"]
    return list(stage.get("failures", [])) if stage["status"] == FAIL else []


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
    report: Path | None = None,
    markdown: Path | None = None,
    progress: Progress | None = None,
    echo: Any = None,
) -> dict[str, Any]:
    """Compare every available stage with the PyTorch reference; write the reports and the
    manifest's `parity` section; raise ParityError naming each failing stage and tower."""
    progress = progress or Progress("parity", quiet=True)
    export_dir = Path(export_dir)
    if repository is not None and url is not None:
        raise ClipTritonError("give either --repository REPO (a local server is started) or --url, not both")
    for name, value in (("--min-cosine-fp32", min_cosine_fp32), ("--min-cosine-fp16", min_cosine_fp16)):
        if not 0.0 < value <= 1.0:
            raise ClipTritonError(f"{name} must be in (0, 1], got {value}")
    if repository is not None and not Path(repository).is_dir():
        raise ClipTritonError(f"--repository {repository} is not a folder")
    manifest = load_manifest(export_dir)
    report = Path(report) if report is not None else export_dir / "parity.json"
    markdown = Path(markdown) if markdown is not None else report.with_suffix(".md")
    for dest in (report, markdown):
        check_writable_parent(dest)
    thresholds = {"fp32": float(min_cosine_fp32), "fp16": float(min_cosine_fp16)}
    started = time.perf_counter()

    section = repository_section(manifest, repository)
    runners, skipped = plan_runners(export_dir, manifest, url, section)
    from exporter.loading import load_reference

    with progress.step(f"rebuilding the PyTorch reference ({manifest.model_name})"):
        loaded = load_reference(manifest, progress=progress, export_dir=export_dir)
    with progress.step("samples: open_clip preprocessing and tokenisation"):
        sample_set, ids_real = build_samples(manifest, loaded, export_dir, samples, images, texts)
    progress.info(
        f"{len(sample_set.image_names)} images, {sample_set.n_captions} captions, "
        f"{len(sample_set.prompts)} zero-shot prompts"
    )
    reference = TorchRunner(loaded)
    reference.open()
    ref = {}
    for tower in TOWERS:
        batch = sample_set.images if tower == "image" else sample_set.texts
        with progress.step(f"pytorch: {tower} tower, {len(batch)} samples"):
            ref[tower] = reference.embed_all(tower, batch)
    reference.close()

    stages: list[dict[str, Any]] = []
    for runner in runners:
        stages.append(compare_runner(runner, ref, sample_set, thresholds, progress, ids_real))
    stages.extend(skipped)
    if url is None and repository is None:
        stages.append({"stage": "triton", "status": SKIP, "reason": "no --repository or --url given"})
    elif url is not None:
        stages[:0] = _triton_checks(url, section, sample_set, progress, ids_real)
    else:
        assert repository is not None  # the first branch took "neither"
        stages.extend(_local_triton(Path(repository), section, ref, sample_set, thresholds, progress, ids_real))
    stages.sort(key=lambda s: _STAGE_ORDER.get(s["stage"], 99))

    failures = [line for stage in stages for line in _stage_failures(stage)]
    result = {
        "passed": not failures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export": str(export_dir.resolve()),
        "model": manifest.model_name,
        "pretrained": manifest.pretrained,
        "random_weights": manifest.random_weights,
        "thresholds": {**thresholds, "pixels_max_abs_diff": PIXEL_TOLERANCE},
        "samples": {
            "images": sample_set.image_names,
            "captions": sample_set.captions,
            "prompts": len(sample_set.prompts),
            "labels": sample_set.labels,
        },
        "stages": stages,
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_reports(result, report, markdown)
    _record_in_manifest(export_dir, result, report)
    if echo is not None:
        echo(format_table(result))
    if failures:
        raise ParityError("parity failed: " + "; ".join(failures) + f" (report: {report})")
    return result


_STAGE_ORDER = {
    "onnx-fp32": 0, "onnx-fp16": 1, "tensorrt": 2, "triton-preprocess": 3, "triton-tokenize": 4, "triton": 5,
}


def _triton_checks(
    url: str, section: dict[str, Any] | None, samples: SampleSet, progress: Progress, ids_real: bool
) -> list[dict[str, Any]]:
    """Preprocess/tokenize equality checks for the Triton at `url` (its embedding stage is a runner)."""
    checks = check_triton_preprocessing(triton_runner(url, section), samples, progress)
    if not ids_real:
        checks = [c for c in checks if c["stage"] != "triton-tokenize"]
        checks.append({"stage": "triton-tokenize", "status": SKIP, "reason": "no reference tokenizer here"})
    return checks


def _local_triton(
    repository: Path,
    section: dict[str, Any] | None,
    ref: dict[str, np.ndarray],
    samples: SampleSet,
    thresholds: dict[str, float],
    progress: Progress,
    ids_real: bool,
) -> list[dict[str, Any]]:
    """Start the embedded tritonserver for `repository`, run the Triton checks, stop it."""
    if (section or {}).get("runtime") == "tensorrt":
        # The embedded server (nvidia-pytriton's) has the python backend only: no plans.
        why = (
            "the embedded tritonserver cannot load TensorRT plans; serve this repository with NVIDIA's "
            "Triton container on the GPU and pass --url HOST:PORT"
        )
        names = ("triton-preprocess", "triton-tokenize", "triton")
        return [{"stage": name, "status": SKIP, "reason": why} for name in names]
    from exporter.server import TritonServer

    try:
        with progress.step(f"starting a local tritonserver for {repository}"):
            server = TritonServer(repository)
            server.start()
    except Exception as exc:  # noqa: BLE001 - the stage fails with the server's reason, others stand
        reason = f"could not start tritonserver: {_one_line(exc)}"
        progress.warn(reason)
        return [{"stage": "triton", "status": ERROR, "reason": reason}]
    try:
        url = server.grpc_url
        checks = _triton_checks(url, section, samples, progress, ids_real)
        runner = triton_runner(url, section)
        return [*checks, compare_runner(runner, ref, samples, thresholds, progress, ids_real)]
    finally:
        with progress.step("stopping tritonserver"):
            server.stop()


# ---------------------------------------------------------------------------------------------
# Reports
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
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(dest)


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


def _record_in_manifest(export_dir: Path, result: dict[str, Any], report: Path) -> None:
    manifest = load_manifest(export_dir)  # re-read: another stage may have added its section meanwhile
    manifest.parity = summary(result, report)
    manifest.save(export_dir)


def print_table(result: dict[str, Any]) -> None:
    print(format_table(result), file=sys.stdout)
