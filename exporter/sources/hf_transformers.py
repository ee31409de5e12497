"""Hugging Face Transformers checkpoints: `CLIPModel` and `SiglipModel` (SigLIP, fixed-resolution SigLIP 2).

`--hf-model PATH_OR_REPO_ID`: a `save_pretrained` folder (fully offline) or a hub id (downloaded into the
Hugging Face cache like open_clip's `--pretrained`; one-line error when offline and not cached). The
architecture, weights, image processor and tokenizer all come from the checkpoint; the manifest records
the folder and its digest, or the hub id at its resolved commit, so parity rebuilds the same reference.

What is served is checked against the checkpoint's own parts (docs/runtimes.md, "Hugging Face
Transformers checkpoints"):
- pixels: the image processor's PIL backend (`backend="pil"`) as the reference, served through
  clients/clip_preprocess.py's "transformers" convention;
- ids: the tokenizer's own `tokenizer.json` (a SentencePiece-only SigLIP tokenizer is converted), served
  by model_repository/common/clip_tokenizer.py; ids are compared with the tokenizer at load time;
- embeddings: `get_image_features` / `get_text_features`, L2-normalised, ids only (no attention mask:
  CLIP's causal mask makes it moot, SigLIP was trained on padded ids without one).
SigLIP 2 NaFlex checkpoints (model_type "siglip2": variable resolution, patch inputs) are refused.
"""

from __future__ import annotations

import atexit
import hashlib
import random
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError, Progress
from clip_triton.exporter.base.manifest import Manifest, PreprocessConfig, TokenizerConfig, sha256_file
from clip_triton.exporter.sources.base import (
    LoadedModel,
    ModelSource,
    hub_offline_reason,
    normalized_towers,
    register,
)

NAME = "transformers"
# model_type -> the class that loads it (AutoModel resolves it; this is what we accept).
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes the served path supports
# Files a checkpoint folder's digest covers: what decides the model, its preprocessing and its ids.
_DIGEST_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ClipTritonError(f"--hf-model needs the `transformers` package ({exc})") from None
    transformers.logging.set_verbosity_error()  # our own one-line messages instead of its warnings
    transformers.logging.disable_progress_bar()  # our Progress shows the step; --quiet silences it
    return transformers


# ---------------------------------------------------------------- where the checkpoint is


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of the files that define a checkpoint (config, weights,
    tokenizer, processor), so a changed file anywhere is a different model."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _DIGEST_SUFFIXES and not path.name.startswith("."):
            digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _hub_folder(repo_id: str, revision: str | None, progress: Progress) -> tuple[Path, str]:
    """A hub checkpoint's local snapshot folder and its commit (the Hugging Face cache, like --pretrained)."""
    from huggingface_hub import snapshot_download

    offline = hub_offline_reason(progress)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=bool(offline)))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        why = f"{offline}, and it is not in the local cache" if offline else f"{type(exc).__name__}"
        raise ClipTritonError(
            f"could not fetch {repo_id} from the Hugging Face hub ({why}): download it where there is network "
            "(huggingface-cli download) or pass a save_pretrained folder"
        ) from None
    return folder, folder.name  # snapshots/<commit>


def resolve(spec: str, progress: Progress) -> tuple[Path, str | None, dict[str, str] | None]:
    """--hf-model -> (folder, pretrained "repo@commit" or None, checkpoint {"path", "sha256"} or None)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ClipTritonError(f"--hf-model {spec}: not a save_pretrained folder (no config.json in it)")
        folder = path.resolve()
        return folder, None, {"path": str(folder), "sha256": folder_digest(folder)}
    repo, _, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise ClipTritonError(f"--hf-model {spec!r} is neither a folder nor a Hugging Face repo id (org/name)")
    folder, commit = _hub_folder(repo, revision or None, progress)
    return folder, f"{repo}@{commit}", None


# ---------------------------------------------------------------- preprocessing


def _side(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ClipTritonError(f"the image processor's {what} must be a positive integer, got {value!r}")
    return value


def _three(value: Any, what: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ClipTritonError(f"the image processor's {what} must have 3 values, got {value!r}")
    return values


def preprocess_config(processor: Any, image_size: int) -> PreprocessConfig:
    """A Transformers image processor as our PreprocessConfig, or a one-line error naming the setting the
    served pipeline does not reproduce."""
    kind = type(processor).__name__
    def get(key: str, default: Any = None) -> Any:
        return getattr(processor, key, default)

    if get("do_pad") or not get("do_resize", True):
        raise ClipTritonError(f"{kind}: only resizing processors are served (do_resize true, do_pad false)")
    if not get("do_convert_rgb", True):
        raise ClipTritonError(f"{kind}: do_convert_rgb false is not served (images are always converted to RGB)")
    if get("do_rescale", True) is not True or abs(float(get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ClipTritonError(f"{kind}: only rescale by 1/255 is served, got {get('rescale_factor')!r}")
    resample = int(get("resample", 3))
    if resample not in _RESAMPLE:
        raise ClipTritonError(f"{kind}: resample {resample} is not served (only nearest, bilinear, bicubic)")
    size, crop = dict(get("size") or {}), dict(get("crop_size") or {})
    if size.get("shortest_edge") and not size.get("longest_edge"):
        short = _side(size["shortest_edge"], "size.shortest_edge")
        side = [_side(crop.get("height"), "crop_size.height"), _side(crop.get("width"), "crop_size.width")]
        if not get("do_center_crop") or side != [short, short]:
            raise ClipTritonError(
                f"{kind}: a shortest-edge resize is served only with a centre crop of the same square size "
                f"(size {size}, crop_size {crop}, do_center_crop {get('do_center_crop')})"
            )
        hw, mode = side, "shortest"
    elif size.get("height") and size.get("width") and not get("do_center_crop"):
        hw, mode = [_side(size["height"], "size.height"), _side(size["width"], "size.width")], "squash"
    else:
        raise ClipTritonError(f"{kind}: resize {size} with crop {crop} is not a layout the served pipeline reproduces")
    if hw != [image_size, image_size]:
        raise ClipTritonError(f"{kind} makes {hw[0]}x{hw[1]} images, but the vision model takes {image_size}px")
    normalize = get("do_normalize", True)
    return PreprocessConfig(
        size=hw,
        mean=_three(get("image_mean"), "image_mean") if normalize else [0.0, 0.0, 0.0],
        std=_three(get("image_std"), "image_std") if normalize else [1.0, 1.0, 1.0],
        interpolation=_RESAMPLE[resample],
        resize_mode=mode,
        convention="transformers",
    )


class ProcessorPixels:
    """The checkpoint's image processor (PIL backend): PIL image -> FP32 [3, H, W], parity's reference."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> np.ndarray:
        return np.asarray(self.processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)


# ---------------------------------------------------------------- tokenizer

_TOKENIZER_DIRS: list[str] = []


def _scratch() -> Path:
    """A folder for this process's converted tokenizer files (export copies the file it serves)."""
    if not _TOKENIZER_DIRS:
        _TOKENIZER_DIRS.append(tempfile.mkdtemp(prefix="clip-triton-hf-"))
        atexit.register(shutil.rmtree, _TOKENIZER_DIRS[0], True)
    return Path(_TOKENIZER_DIRS[0])


def _tokenizer_json(tokenizer: Any, folder: Path) -> tuple[Path, str]:
    """The tokenizer as a tokenizer.json the served tokenize model reads, and the text clean it needs:
    a tokenizers-backed tokenizer is written as it is ("none": its normalizer does everything);
    SiglipTokenizer (SentencePiece only) is converted, with its canonicalize_text done as a clean."""
    out = _scratch() / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    out.mkdir(exist_ok=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        (out / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
        return out / "tokenizer.json", "none"
    if type(tokenizer).__name__ == "SiglipTokenizer":
        from transformers.convert_slow_tokenizer import T5Converter

        # SiglipTokenizer is T5's SentencePiece layout ($A </s>) without T5's extra ids.
        object.__setattr__(tokenizer, "_extra_ids", 0)
        (out / "tokenizer.json").write_text(T5Converter(tokenizer).converted().to_str(), encoding="utf-8")
        return out / "tokenizer.json", "siglip"
    raise ClipTritonError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json form the server can run")


def probe_texts(count: int = 200, seed: int = 0) -> list[str]:
    """Texts that exercise cleaning, truncation and padding: captions, punctuation, unicode, whitespace,
    very long ones, and random printable strings."""
    rnd = random.Random(seed)
    fixed = [
        "a photo of a cat", "A Photo Of A DOG!", "", " ", "  many   spaces\tand\ttabs\n", "x",
        "café, naïve résumé", "日本語のテキスト", "emoji 🙂 and ℌ ﬁ ① math", "it's a dog's life.",
        "under_score and hyphen-ated, dotted.words", "&amp; &lt;html&gt;", "word " * 100, "a" * 500,
    ]
    alphabet = string.printable + "éüßçñ日本語🙂ﬁ"
    return fixed + ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80))) for _ in range(count)]


class ReferenceTokenizer:
    """The checkpoint's own tokenizer as parity's reference: texts -> int64 [N, L], padded to L."""

    def __init__(self, tokenizer: Any, context_length: int, served_file: Path) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.path = served_file  # export copies this file next to the manifest (the tokenize model's)

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length)
        return np.asarray(ids["input_ids"], dtype=np.int64)


def check_served_ids(reference: ReferenceTokenizer, cfg: TokenizerConfig) -> None:
    """The served tokenizer gives the checkpoint tokenizer's ids on every probe text, or a one-line error."""
    from clip_triton.exporter.base.tokenization import FileTokenizer

    served = FileTokenizer(reference.path, cfg)
    texts = probe_texts()
    want, got = reference(texts), served(texts)
    rows = np.flatnonzero((want != got).any(axis=1))
    if rows.size:
        text = texts[int(rows[0])]
        raise ClipTritonError(
            f"the served tokenizer differs from {type(reference.tokenizer).__name__} on {rows.size} of {len(texts)} "
            f"probe texts (first: {text[:40]!r})"
        )


def _tokenizer(folder: Path, config: Any) -> tuple[TokenizerConfig, ReferenceTokenizer]:
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - missing files, sentencepiece absent, a bad tokenizer.json
        raise ClipTritonError(f"{folder}: its tokenizer cannot be loaded ({_first_line(exc)})") from None
    text = config.text_config
    context_length = int(text.max_position_embeddings)
    served_file, clean = _tokenizer_json(tokenizer, folder)
    pad_id = tokenizer.pad_token_id
    cfg = TokenizerConfig(
        kind="hf",
        context_length=context_length,
        vocab_size=int(text.vocab_size),
        hf_name=str(getattr(tokenizer, "name_or_path", "") or folder.name),
        hf_file="tokenizer.json",
        clean=clean,
        pad_id=int(pad_id) if pad_id is not None else 0,
        eot_id=int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None,
        padding_side=str(getattr(tokenizer, "padding_side", "right")),
    )
    reference = ReferenceTokenizer(tokenizer, context_length, served_file)
    check_served_ids(reference, cfg)
    return cfg, reference


# ---------------------------------------------------------------- the model


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else text or type(exc).__name__


def _few(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _model(folder: Path, config: Any, progress: Progress) -> Any:
    transformers = _import_transformers()
    import torch

    try:
        model, info = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True, ignore_mismatched_sizes=True,  # mismatches are reported below, by name
        )
    except Exception as exc:  # noqa: BLE001 - corrupt weights, shape mismatches, missing files
        raise ClipTritonError(f"{folder}: transformers cannot load it ({_first_line(exc)})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"mismatched shapes: {_few(mismatched)}"] if mismatched else []
        )
        raise ClipTritonError(f"{folder} does not fit its own config ({'; '.join(parts)})")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        progress.warn(
            f"{folder.name}: {len(unexpected)} checkpoint keys unused by {type(model).__name__} ({_few(unexpected)})"
        )
    return model.float().eval()


def _config(folder: Path) -> Any:
    transformers = _import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or unknown config.json
        raise ClipTritonError(f"{folder}/config.json cannot be read by transformers ({_first_line(exc)})") from None
    kind = getattr(config, "model_type", None)
    if kind == "siglip2":
        raise ClipTritonError(
            "SigLIP 2 NaFlex checkpoints (model_type siglip2) take variable-resolution patches, not fixed images; "
            "use a fixed-resolution SigLIP 2 checkpoint (google/siglip2-*-patch16-224/256/384/512, model_type siglip)"
        )
    if kind not in ARCHITECTURES:
        known = ", ".join(f"{v} ({k})" for k, v in ARCHITECTURES.items())
        raise ClipTritonError(f"{folder}: model_type {kind!r} is not a supported dual encoder; supported: {known}")
    return config


def load_model(spec: str, progress: Progress | None = None, *, expect: Manifest | None = None) -> LoadedModel:
    """The checkpoint `spec` names (a folder or a hub id, optionally "@revision"), with its preprocessing
    and tokenizer; `expect`: the manifest it must match (a changed folder is refused)."""
    progress = progress or Progress("load", quiet=True)
    folder, pretrained, checkpoint = resolve(spec, progress)
    if expect is not None and expect.checkpoint is not None and checkpoint is not None:
        if checkpoint["sha256"] != expect.checkpoint["sha256"]:
            raise ClipTritonError(f"checkpoint folder {folder} changed since export (its digest differs)")
    config = _config(folder)
    transformers = _import_transformers()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil")
    except Exception as exc:  # noqa: BLE001 - no preprocessor config, an unknown processor class
        raise ClipTritonError(f"{folder}: its image processor cannot be loaded ({_first_line(exc)})") from None
    preprocess = preprocess_config(processor, int(config.vision_config.image_size))
    tok_cfg, tokenizer = _tokenizer(folder, config)
    model = _model(folder, config, progress)
    embed_dim = int(config.projection_dim) if config.model_type == "clip" else int(config.vision_config.hidden_size)
    bias = getattr(model, "logit_bias", None)
    name = pretrained.partition("@")[0].rsplit("/", 1)[-1] if pretrained else folder.name
    return LoadedModel(
        model=model,
        name=name,
        pretrained=pretrained,
        checkpoint=checkpoint,
        seed=None,
        preprocess=preprocess,
        tokenizer_cfg=tok_cfg,
        tokenizer=tokenizer,
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
        source=NAME,
        image_reference=ProcessorPixels(processor),
    )


def same_checkpoint(manifest: Manifest, spec: str) -> str | None:
    """Why an existing export is not from checkpoint `spec` (None when it is): `build`'s resume check."""
    if manifest.source != NAME:
        return f"it was exported from an {manifest.source} model"
    path = Path(spec).expanduser()
    if path.exists():
        recorded = (manifest.checkpoint or {}).get("path")
        if recorded != str(path.resolve()) or not path.is_dir():
            return f"it was exported from {recorded or manifest.pretrained}"
        if (manifest.checkpoint or {}).get("sha256") != folder_digest(path.resolve()):
            return "the checkpoint folder changed since"
        return None
    repo, _, revision = spec.partition("@")
    found_repo, _, found_commit = (manifest.pretrained or "").partition("@")
    if repo != found_repo or (revision and revision != found_commit):
        return f"it was exported from {manifest.pretrained or (manifest.checkpoint or {}).get('path')}"
    return None


# ---------------------------------------------------------------- towers


def _features(output: Any) -> Any:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if hasattr(output, "dim") else output.pooler_output


def _tower_modules(loaded: LoadedModel) -> dict[str, Any]:
    # Served ids are INT32; position and pooling indexing want int64.
    return normalized_towers(
        loaded.model,
        lambda m, pixels: _features(m.get_image_features(pixel_values=pixels)),
        lambda m, ids: _features(m.get_text_features(input_ids=ids.long())),
    )


_IMAGE_PARTS = ("vision_model", "visual_projection")
_TEXT_PARTS = ("text_model", "text_projection")


def _parts_bytes(model: Any, parts: tuple[str, ...]) -> int:
    modules = [getattr(model, p, None) for p in parts]
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


class TransformersSource(ModelSource):
    """Hugging Face Transformers CLIPModel / SiglipModel checkpoints (--hf-model)."""

    name = NAME

    def load_reference(
        self, manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None
    ) -> LoadedModel:
        spec = manifest.checkpoint["path"] if manifest.checkpoint else manifest.pretrained
        if not spec:
            raise ClipTritonError("the manifest records neither the checkpoint folder nor the hub id it came from")
        if manifest.checkpoint and not Path(spec).is_dir():
            raise ClipTritonError(f"the manifest's checkpoint folder {spec} is gone; parity needs it")
        return load_model(spec, progress, expect=manifest)

    def tower_modules(self, loaded: LoadedModel) -> dict[str, Any]:
        return _tower_modules(loaded)

    def tower_parameter_bytes(self, loaded: LoadedModel) -> dict[str, int]:
        return {"image": _parts_bytes(loaded.model, _IMAGE_PARTS), "text": _parts_bytes(loaded.model, _TEXT_PARTS)}

    def release_tower(self, loaded: LoadedModel, tower: str) -> None:
        from clip_triton.exporter.base.common import release_memory

        if loaded.model is None:
            return
        for part in _IMAGE_PARTS if tower == "image" else _TEXT_PARTS:
            if getattr(loaded.model, part, None) is not None:
                setattr(loaded.model, part, None)
        release_memory()


SOURCE = register(TransformersSource())
