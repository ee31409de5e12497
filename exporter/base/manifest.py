"""The manifest: the one record every stage after `export` reads and extends.

No stage re-derives what the manifest records (preprocessing, tokenizer, tensor names and
dtypes); later stages add their own section (`fp16`, `engines`, `repository`, `parity`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import INT32_MAX, ClipTritonError, staged_file

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SCHEMA_VERSIONS = (1,)  # the manifest layouts this version reads (check_manifest)
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# Whose image conventions the served preprocessing follows (clients/clip_preprocess.py): open_clip's
# (resize and crop in the image's mode, then RGB; centre crop offsets rounded) or Transformers' image
# processors (RGB first, transparency over white; centre crop offsets floored).
CONVENTIONS = ("open_clip", "transformers")
# What each tower's graph takes and gives (docs/engines.md, "Token ids": int32, not int64).
TOWER_INPUT_DTYPES = {"image": "float32", "text": "int32"}
EMBEDDING_DTYPE = "float32"
BUILTIN_WEIGHTS = "builtin"  # `pretrained` of a model whose weights ship in exporter/sources/builtin/
MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what every open_clip model config has

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
IMAGE_FP16_ONNX = "image_encoder.fp16.onnx"
TEXT_FP16_ONNX = "text_encoder.fp16.onnx"
IMAGE_INT8_ONNX = "image_encoder.int8.onnx"
TEXT_INT8_ONNX = "text_encoder.int8.onnx"
IMAGE_PLAN = "image_encoder.plan"
IMAGE_INT8_PLAN = "image_encoder.int8.plan"
TEXT_INT8_PLAN = "text_encoder.int8.plan"
TEXT_PLAN = "text_encoder.plan"

TOWERS = ("image", "text")

# The one artifact table: which file each stage writes, per format and precision, and tower.
# A manifest section may record other names (`Manifest.artifacts` reads them first).
ARTIFACTS: dict[tuple[str, str], dict[str, str]] = {
    ("onnx", "fp32"): {"image": IMAGE_ONNX, "text": TEXT_ONNX},  # export
    ("onnx", "fp16"): {"image": IMAGE_FP16_ONNX, "text": TEXT_FP16_ONNX},  # fp16
    ("onnx", "int8"): {"image": IMAGE_INT8_ONNX, "text": TEXT_INT8_ONNX},  # quantize (Q/DQ, docs/int8.md)
    ("plan", "fp16"): {"image": IMAGE_PLAN, "text": TEXT_PLAN},  # engines (precision set by the FP16 graph)
    ("plan", "int8"): {"image": IMAGE_INT8_PLAN, "text": TEXT_INT8_PLAN},  # engines --precision int8 (Q/DQ graph)
}
STAGE_OF_ARTIFACT = {
    ("onnx", "fp32"): "export",
    ("onnx", "fp16"): "fp16",
    ("onnx", "int8"): "quantize",
    ("plan", "fp16"): "engines",
    ("plan", "int8"): "engines",
}


@dataclass
class PreprocessConfig:
    """open_clip's `PreprocessCfg`, as data (see open_clip/transform.py)."""

    size: list[int]  # [H, W]
    mode: str = "RGB"
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    convention: str = "open_clip"  # or "transformers" (CONVENTIONS)


@dataclass
class TokenizerConfig:
    """How to turn strings into the ids the text encoder was exported with.

    kind: "clip" (open_clip's SimpleTokenizer, bundled BPE vocab), "hf" (a Hugging Face
    `tokenizers` file), or another open_clip tokenizer class name (recorded, not servable).
    """

    kind: str
    context_length: int
    vocab_size: int
    hf_name: str | None = None
    hf_file: str | None = None  # tokenizer.json copied next to the manifest, when available
    clean: str = "lower"  # open_clip's text cleaning for HF tokenizers ("canonicalize" for SigLIP)
    strip_sep_token: bool = False
    pad_id: int = 0
    sot_id: int | None = None
    eot_id: int | None = None
    padding_side: str = "right"  # "left" for tokenizers that pad before the text (some Transformers ones)


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int32", ...
    shape: list[int]  # -1 marks the dynamic batch axis


@dataclass
class TowerSpec:
    file: str
    input: TensorSpec
    output: TensorSpec


@dataclass
class Manifest:
    model_name: str
    pretrained: str | None
    checkpoint: dict[str, Any] | None  # {"path": ..., "sha256": ...}
    random_weights: bool
    seed: int | None  # torch seed of a random-weights model, so parity can rebuild it
    embed_dim: int
    logit_scale: float
    logit_bias: float | None
    image_size: list[int]
    preprocess: PreprocessConfig
    tokenizer: TokenizerConfig
    image: TowerSpec
    text: TowerSpec
    opset: int
    max_batch: int
    exporter: str  # "dynamo" or "torchscript"
    versions: dict[str, str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_parity: dict[str, Any] = field(default_factory=dict)
    fp16: dict[str, Any] | None = None
    engines: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None  # the quantize stage's record (docs/int8.md); optional since it came later
    repository: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    # A custom architecture's open_clip model config (--model-config), so later stages rebuild it without
    # the file; None for open_clip's own and builtin architectures.
    model_config: dict[str, Any] | None = None
    builtin_sha256: str | None = None  # sha256 of the shipped weights when pretrained is "builtin"
    source: str = "open_clip"  # the model source that rebuilds the reference (exporter/sources/)
    schema_version: int = SCHEMA_VERSION

    def tower(self, name: str) -> TowerSpec:
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
        return self.image if name == "image" else self.text

    def artifacts(self, fmt: str, precision: str) -> dict[str, str]:
        """tower -> file name of an artifact (ARTIFACTS), as this manifest's sections record it."""
        key = (fmt, precision)
        if key not in ARTIFACTS:
            raise ValueError(f"no {precision} {fmt} artifact exists; known: {sorted(ARTIFACTS)}")
        names = dict(ARTIFACTS[key])
        if key == ("onnx", "fp32"):
            return {tower: self.tower(tower).file for tower in TOWERS}
        if key == ("onnx", "int8") or key == ("plan", "int8"):
            return names  # written by one version only: the table's names
        section = self.fp16 if fmt == "onnx" else self.engines
        if isinstance(section, dict):  # written by an older version: names may live per tower
            for tower in TOWERS:
                entry = section.get(tower)
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    names[tower] = entry["file"]
                elif isinstance(entry, str) and entry.endswith((".onnx", ".plan")):
                    names[tower] = entry
        return names

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse and check a manifest (check_manifest): ValueError names the first problem."""
        if not isinstance(data, dict):
            raise ValueError(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)  # first: a newer layout has other keys
        if type(version) is not int or version not in SCHEMA_VERSIONS:
            raise ValueError(
                f"schema_version {version!r} is not one this clip-triton reads "
                f"({', '.join(map(str, SCHEMA_VERSIONS))}): written by another version? re-export with this one"
            )
        data = _fields_of(cls, data, "manifest")
        data["preprocess"] = PreprocessConfig(**_fields_of(PreprocessConfig, data["preprocess"], "preprocess"))
        data["tokenizer"] = TokenizerConfig(**_fields_of(TokenizerConfig, data["tokenizer"], "tokenizer"))
        for tower in TOWERS:
            spec = _fields_of(TowerSpec, data[tower], tower)
            for end in ("input", "output"):
                spec[end] = TensorSpec(**_fields_of(TensorSpec, spec[end], f"{tower}.{end}"))
            data[tower] = TowerSpec(**spec)
        manifest = cls(**data)
        check_manifest(manifest)
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        with staged_file(path) as tmp:  # atomic: a reader never sees half a manifest
            tmp.write_text(self.to_json())
        return path


def weights_record(m: Manifest) -> dict[str, Any]:
    """Which weights a manifest's model carries, as data (for reports): the model name and exactly one of
    its pretrained tag (with the shipped weights' sha256 for builtin), checkpoint (path + sha256) or
    random seed; a custom architecture's config is flagged."""
    record: dict[str, Any] = {"model": m.model_name}
    if m.pretrained:
        record["pretrained"] = m.pretrained
        if m.builtin_sha256:
            record["builtin_sha256"] = m.builtin_sha256
    elif m.checkpoint:
        record["checkpoint"] = {"path": m.checkpoint.get("path"), "sha256": m.checkpoint.get("sha256")}
    else:
        record["random_weights"] = True
        record["seed"] = m.seed
    if m.model_config is not None:
        record["model_config"] = True
    return record


def describe_weights(m: Manifest, full: bool = False) -> str:
    """The weights in words (Markdown): `pretrained tag `T``, `checkpoint sha256 `…``, or RANDOM weights with
    their seed. `full`: the model name first, and the checkpoint's path and whole checksums (a report
    naming what it tested); otherwise checksums are shortened (a README line)."""
    def sha(value: Any) -> str:
        text = str(value or "?")
        return text if full else f"{text[:16]}…"

    if m.pretrained:
        words = f"pretrained tag `{m.pretrained}`"
        if full and m.builtin_sha256:
            words += f" (weights sha256 `{sha(m.builtin_sha256)}`)"
    elif m.checkpoint:
        words = f"checkpoint sha256 `{sha(m.checkpoint.get('sha256'))}`"
        if full:
            words = f"checkpoint `{m.checkpoint.get('path')}` (sha256 `{sha(m.checkpoint.get('sha256'))}`)"
    else:
        words = f"RANDOM weights (seed {m.seed}): embeddings are meaningless"
    if not full:
        return words
    custom = " (custom architecture config)" if m.model_config is not None else ""
    return f"`{m.model_name}`{custom}, {words}"


def _fields_of(cls: Any, data: Any, where: str) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `cls`: an object with no unknown and no missing keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {json.dumps(data)[:60]}")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = sorted(set(data) - known), sorted(required - set(data))
    if unknown:
        raise ValueError(f"{where} has unknown keys: {unknown}")
    if missing:
        raise ValueError(f"{where} lacks keys: {missing}")
    return dict(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(where: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{where} must be an integer {span}, got {json.dumps(value)}")


def _text(where: str, value: Any, optional: bool = False) -> None:
    if not ((optional and value is None) or (isinstance(value, str) and value)):
        raise ValueError(f"{where} must be a non-empty string{' or null' if optional else ''}, got {json.dumps(value)}")


def _numbers(where: str, value: Any, count: int) -> None:
    if not (isinstance(value, list) and len(value) == count and all(_is_number(v) for v in value)):
        raise ValueError(f"{where} must be {count} finite numbers, got {json.dumps(value)}")


def _tensor(where: str, spec: TensorSpec, dtype: str, shape: list[int]) -> None:
    _text(f"{where}.name", spec.name)
    if spec.dtype != dtype:
        raise ValueError(f"{where}.dtype must be {dtype}, got {json.dumps(spec.dtype)}")
    if not (isinstance(spec.shape, list) and all(_is_int(d) for d in spec.shape)) or spec.shape != shape:
        raise ValueError(f"{where}.shape must be {shape} (batch, then the manifest's sizes), got {spec.shape!r}")


def check_manifest(m: Manifest) -> None:
    """The values every later stage relies on, or ValueError naming the first one out of range.

    Shapes are checked against each other here (image_size, context_length, embed_dim); against the
    graphs themselves by exporter/base/export_inputs.py before any stage writes anything."""
    _text("model_name", m.model_name)
    _text("source", m.source)
    _text("pretrained", m.pretrained, optional=True)
    if m.checkpoint is not None and not (
        isinstance(m.checkpoint, dict) and all(isinstance(m.checkpoint.get(k), str) for k in ("path", "sha256"))
    ):
        raise ValueError("checkpoint must be null or an object with a path and a sha256")
    if not isinstance(m.random_weights, bool) or not (m.seed is None or _is_int(m.seed)):
        raise ValueError("random_weights must be true or false and seed an integer or null")
    sources = [s for s in (m.pretrained, m.checkpoint, m.random_weights or None) if s is not None]
    if len(sources) != 1:
        raise ValueError("exactly one of pretrained, checkpoint and random_weights must be set")
    _model_config(m)
    _int("embed_dim", m.embed_dim, 1)
    if not _is_number(m.logit_scale) or not (m.logit_bias is None or _is_number(m.logit_bias)):
        raise ValueError("logit_scale (and logit_bias, when set) must be finite numbers")
    pre = m.preprocess
    if not (isinstance(pre.size, list) and len(pre.size) == 2):
        raise ValueError(f"preprocess.size must be [height, width], got {json.dumps(pre.size)}")
    for i, side in enumerate(pre.size):
        _int(f"preprocess.size[{i}]", side, 1, 65535)
    if m.image_size != pre.size:
        raise ValueError(f"image_size {json.dumps(m.image_size)} differs from preprocess.size {pre.size}")
    _numbers("preprocess.mean", pre.mean, 3)
    _numbers("preprocess.std", pre.std, 3)
    if any(v <= 0 for v in pre.std):
        raise ValueError(f"preprocess.std must be positive, got {pre.std}")
    for key, value, allowed in (
        ("mode", pre.mode, ("RGB",)),
        ("interpolation", pre.interpolation, INTERPOLATIONS),
        ("resize_mode", pre.resize_mode, RESIZE_MODES),
        ("convention", pre.convention, CONVENTIONS),
    ):
        if value not in allowed:
            raise ValueError(f"preprocess.{key} must be one of {', '.join(allowed)}, got {json.dumps(value)}")
    _int("preprocess.fill_color", pre.fill_color, 0, 255)
    tok = m.tokenizer
    _text("tokenizer.kind", tok.kind)
    _int("tokenizer.context_length", tok.context_length, 1, 1 << 20)
    _int("tokenizer.vocab_size", tok.vocab_size, 1, INT32_MAX)
    _int("tokenizer.pad_id", tok.pad_id, 0, tok.vocab_size - 1)
    for key in ("sot_id", "eot_id"):
        if getattr(tok, key) is not None:
            _int(f"tokenizer.{key}", getattr(tok, key), 0, tok.vocab_size - 1)
    for key in ("hf_name", "hf_file"):
        _text(f"tokenizer.{key}", getattr(tok, key), optional=True)
    _text("tokenizer.clean", tok.clean)
    if not isinstance(tok.strip_sep_token, bool):
        raise ValueError("tokenizer.strip_sep_token must be true or false")
    if tok.padding_side not in ("right", "left"):
        raise ValueError(f"tokenizer.padding_side must be right or left, got {json.dumps(tok.padding_side)}")
    inputs = {"image": [-1, 3, *pre.size], "text": [-1, tok.context_length]}
    for tower in TOWERS:
        spec = m.tower(tower)
        _text(f"{tower}.file", spec.file)
        _tensor(f"{tower}.input", spec.input, TOWER_INPUT_DTYPES[tower], inputs[tower])
        _tensor(f"{tower}.output", spec.output, EMBEDDING_DTYPE, [-1, m.embed_dim])
    if m.image.file == m.text.file:
        raise ValueError(f"image.file and text.file both name {m.image.file}: each tower has its own graph")
    _int("opset", m.opset, 1, 1000)
    _int("max_batch", m.max_batch, 1, INT32_MAX)
    _text("exporter", m.exporter)
    for key in ("versions", "files", "export_parity"):
        if not isinstance(getattr(m, key), dict):
            raise ValueError(f"{key} must be an object")
    for key in ("fp16", "engines", "int8", "repository", "parity"):
        if getattr(m, key) is not None and not isinstance(getattr(m, key), dict):
            raise ValueError(f"{key} must be an object or null")
    profile = (m.engines or {}).get("profile")
    if profile is not None:
        if not isinstance(profile, dict):
            raise ValueError("engines.profile must be an object")
        for key in ("min", "opt", "max"):
            _int(f"engines.profile.{key}", profile.get(key), 1, INT32_MAX)
        if not profile["min"] <= profile["opt"] <= profile["max"]:
            raise ValueError(f"engines.profile needs min <= opt <= max, got {json.dumps(profile)}")


def _model_config(m: Manifest) -> None:
    """model_config: null or an open_clip model config of this embed_dim (a custom architecture has no
    pretrained tag); builtin_sha256: the weights' sha256 exactly when pretrained is "builtin"."""
    config = m.model_config
    if config is not None:
        if not (
            isinstance(config, dict)
            and all(k in config for k in MODEL_CONFIG_KEYS)
            and all(isinstance(config[k], dict) for k in ("vision_cfg", "text_cfg"))
        ):
            raise ValueError("model_config must be null or an open_clip model config (embed_dim, vision_cfg, text_cfg)")
        if config["embed_dim"] != m.embed_dim:
            found = json.dumps(config["embed_dim"])
            raise ValueError(f"model_config.embed_dim {found} differs from embed_dim {m.embed_dim}")
        if m.pretrained is not None:
            raise ValueError("a model_config architecture has no pretrained weights: pretrained must be null")
    sha = m.builtin_sha256
    if m.pretrained == BUILTIN_WEIGHTS:
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"builtin_sha256 must be the builtin weights' sha256 (64 hex), got {json.dumps(sha)}")
    elif sha is not None:
        raise ValueError('builtin_sha256 must be null unless pretrained is "builtin"')


class ManifestError(ClipTritonError):
    """The export folder has no usable manifest (a user error: one line, exit 2)."""


def load_manifest(directory: Path) -> Manifest:
    if not Path(directory).is_dir():
        raise ManifestError(f"export folder {directory} does not exist; run `clip-triton export` first")
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}; run `clip-triton export` first")
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is not a valid clip-triton manifest: {exc}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Checksum and size of an artifact (a folder's files are hashed in name order)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        size = 0
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.name.encode())
            digest.update(sha256_file(item).encode())
            size += item.stat().st_size
        return {"sha256": digest.hexdigest(), "bytes": size}
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(directory: Path, records: dict[str, Any]) -> str | None:
    """The first recorded file that is missing or whose size or checksum differs; None if all match."""
    if not records:
        return "no files recorded"
    for name, record in sorted(records.items()):
        path = Path(directory) / name
        if not path.exists():
            return f"{name} is missing"
        actual = file_record(path)
        if actual["bytes"] != record.get("bytes") or actual["sha256"] != record.get("sha256"):
            return f"{name} differs from its recorded checksum"
    return None


def repository_manifest(repo: Path) -> Manifest | None:
    path = Path(repo) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:  # the same checks as an export's (load_manifest)
        raise ManifestError(f"{path} is not a valid clip-triton manifest: {exc}") from None
