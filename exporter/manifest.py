"""The manifest: the one record every stage after `export` reads and extends.

No stage re-derives what the manifest records (preprocessing, tokenizer, tensor names and
dtypes); later stages add their own section (`fp16`, `engines`, `repository`, `parity`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from exporter.common import ClipTritonError, staged_file

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
IMAGE_FP16_ONNX = "image_encoder.fp16.onnx"
TEXT_FP16_ONNX = "text_encoder.fp16.onnx"
IMAGE_PLAN = "image_encoder.plan"
TEXT_PLAN = "text_encoder.plan"

TOWERS = ("image", "text")

# The one artifact table: which file each stage writes, per format and precision, and tower.
# A manifest section may record other names (`Manifest.artifacts` reads them first).
ARTIFACTS: dict[tuple[str, str], dict[str, str]] = {
    ("onnx", "fp32"): {"image": IMAGE_ONNX, "text": TEXT_ONNX},  # export
    ("onnx", "fp16"): {"image": IMAGE_FP16_ONNX, "text": TEXT_FP16_ONNX},  # fp16
    ("plan", "fp16"): {"image": IMAGE_PLAN, "text": TEXT_PLAN},  # engines (precision set by the FP16 graph)
}
STAGE_OF_ARTIFACT = {("onnx", "fp32"): "export", ("onnx", "fp16"): "fp16", ("plan", "fp16"): "engines"}


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
    repository: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
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
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"manifest has unknown keys: {sorted(unknown)}")
        data["preprocess"] = PreprocessConfig(**data["preprocess"])
        data["tokenizer"] = TokenizerConfig(**data["tokenizer"])
        for tower in TOWERS:
            spec = dict(data[tower])
            spec["input"] = TensorSpec(**spec["input"])
            spec["output"] = TensorSpec(**spec["output"])
            data[tower] = TowerSpec(**spec)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        with staged_file(path) as tmp:  # atomic: a reader never sees half a manifest
            tmp.write_text(self.to_json())
        return path


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
