"""Load an open_clip model, its preprocessing config and its tokenizer.

Three sources, exactly one per call: a pretrained tag (open_clip's own download), a local
checkpoint file, or explicit random weights (seeded, so a later stage can rebuild the very
same model from the manifest).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import ClipTritonError, Progress, check_number, release_memory
from clip_triton.exporter.base.manifest import (
    INTERPOLATIONS,
    RESIZE_MODES,
    Manifest,
    PreprocessConfig,
    TokenizerConfig,
    sha256_file,
)
from clip_triton.exporter.sources.base import LoadedModel, ModelSource, register

DEFAULT_SEED = 0
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def _import_open_clip() -> Any:
    # Heavy (torch, timm): imported only when a stage needs a model.
    import open_clip

    return open_clip


def check_model_name(name: str) -> None:
    open_clip = _import_open_clip()
    models = open_clip.list_models()
    if name in models:
        return
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ClipTritonError(f"unknown open_clip model {name!r}{hint} (see open_clip.list_models())")


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """'0.5,0.5,0.5' or '0.5' -> three floats (per channel)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ClipTritonError(f"{what} must be numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ClipTritonError(f"{what} needs 1 or 3 values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ClipTritonError(f"{what} values must be finite numbers, got {text!r}")
    if what.endswith("std") and any(v <= 0 for v in values):
        raise ClipTritonError(f"{what} values must be positive, got {text!r}")
    return values


def preprocess_overrides(
    mean: str | None = None,
    std: str | None = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
) -> dict[str, Any]:
    """CLI options (mirroring open_clip's `--image-*` arguments) -> a PreprocessCfg overlay."""
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ClipTritonError(f"--image-interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ClipTritonError(f"--image-resize-mode must be one of {', '.join(RESIZE_MODES)}")
    overlay = {
        "mean": parse_floats(mean, "--image-mean"),
        "std": parse_floats(std, "--image-std"),
        "interpolation": interpolation,
        "resize_mode": resize_mode,
    }
    return {k: v for k, v in overlay.items() if v is not None}


PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")


def tag_preprocess(name: str, tag: str) -> dict[str, Any]:
    """The preprocessing a pretrained tag declares (open_clip's pretrained cfg), without its weights."""
    check_model_name(name)
    _check_tag(name, tag)
    cfg = _import_open_clip().get_pretrained_cfg(name, tag)
    return {k: cfg[k] for k in PREPROCESS_KEYS if cfg.get(k) is not None}


def _tags_preprocess_hint(name: str, current: PreprocessConfig) -> str | None:
    """A tag of this architecture whose preprocessing differs from what a tag-less model carries."""
    for tag in _import_open_clip().list_pretrained_tags_by_model(name):
        wanted = tag_preprocess(name, tag)
        if any(_same_form(wanted[k]) != _same_form(getattr(current, k)) for k in wanted if k != "size"):
            return tag
    return None


def _same_form(value: Any) -> Any:
    return [round(float(v), 6) for v in value] if isinstance(value, (list, tuple)) else value


def _preprocess_config(model: Any, overrides: dict[str, Any]) -> PreprocessConfig:
    open_clip = _import_open_clip()
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    cfg.update(overrides)
    size = cfg["size"]
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    return PreprocessConfig(
        size=size,
        mode=str(cfg.get("mode", "RGB")),
        mean=[float(v) for v in cfg["mean"]],
        std=[float(v) for v in cfg["std"]],
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
        fill_color=int(cfg.get("fill_color", 0)),
    )


_HUB_STATE: dict[str, str | None] = {}


def hub_offline_reason(progress: Progress | None = None, timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be used (None when it can), decided once per process.

    Honours HF_HUB_OFFLINE; otherwise one TCP connect to the hub's endpoint. When it fails, the hub
    libraries are switched to offline mode (cache only) so nothing spends ~45 s per stage retrying,
    and the reason is said in one line.
    """
    if "reason" in _HUB_STATE:
        return _HUB_STATE["reason"]
    reason: str | None = None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        import socket
        from urllib.parse import urlparse

        try:
            from huggingface_hub import constants as hub_constants

            endpoint = urlparse(hub_constants.ENDPOINT)
            host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except ImportError:
            reason = None  # no hub library: nothing will try to reach it
        except OSError as exc:
            reason = f"the model hub is unreachable ({type(exc).__name__}: {exc})"
        if reason is not None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                from huggingface_hub import constants as hub_constants

                hub_constants.HF_HUB_OFFLINE = True  # read at import: set the live value too
            except ImportError:
                pass
            if progress is not None:
                progress.warn(f"{reason}: working offline (hub files only from the local cache)")
    _HUB_STATE["reason"] = reason
    return reason


def _tokenizer(
    name: str, model: Any, tokenizer_file: Path | None, progress: Progress
) -> tuple[TokenizerConfig, Any | None]:
    """The model's open_clip tokenizer and its description (kind, context length, specials)."""
    open_clip = _import_open_clip()
    text_cfg = open_clip.get_model_config(name).get("text_cfg", {})
    context_length = int(getattr(model, "context_length", 0) or text_cfg.get("context_length", 77))
    vocab_size = int(getattr(model, "vocab_size", 0) or text_cfg.get("vocab_size", 49408))
    hf_name = text_cfg.get("hf_tokenizer_name") or None
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if hf_name is None and "siglip" not in name.lower():
        tok = open_clip.get_tokenizer(name)
        cfg = TokenizerConfig(
            kind="clip",
            context_length=context_length,
            vocab_size=vocab_size,
            clean=kwargs.get("clean", "lower"),
            pad_id=0,
            sot_id=int(tok.sot_token_id),
            eot_id=int(tok.eot_token_id),
        )
        return cfg, tok
    cfg = TokenizerConfig(
        kind="hf",
        context_length=context_length,
        vocab_size=vocab_size,
        hf_name=hf_name,
        clean=kwargs.get("clean", "whitespace"),
        strip_sep_token=bool(kwargs.get("strip_sep_token", False)),
        # The model's own ids (MetaCLIP2/mT5: pad 0, eos 1): an "eos"-pooled tower looks for eos_id,
        # so synthetic ids without a tokenizer must contain it to exercise the real pooling path.
        pad_id=int(text_cfg.get("pad_id", 0)),
        eot_id=int(text_cfg["eos_id"]) if text_cfg.get("pool_type") == "eos" and "eos_id" in text_cfg else None,
    )
    if tokenizer_file is not None:
        from clip_triton.exporter.base.tokenization import FileTokenizer

        tok = FileTokenizer(Path(tokenizer_file), cfg)
        cfg.hf_file = Path(tokenizer_file).name
        return cfg, tok
    offline = hub_offline_reason(progress)
    try:
        tok = open_clip.get_tokenizer(name)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure means: not available here
        why = f"{offline}, not in the local cache" if offline else type(exc).__name__
        progress.warn(
            f"the {hf_name or 'SigLIP'} tokenizer could not be loaded ({why}); "
            "export uses synthetic token ids; pass --tokenizer-file tokenizer.json to serve text"
        )
        return cfg, None
    return cfg, tok


def _check_tag(name: str, tag: str) -> None:
    open_clip = _import_open_clip()
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none"
        raise ClipTritonError(f"{name} has no pretrained tag {tag!r} (known tags: {known})")


def _load_checkpoint(model: Any, name: str, path: Path) -> None:
    open_clip = _import_open_clip()
    if not path.is_file():
        raise ClipTritonError(f"checkpoint {path} does not exist")
    # The state dict open_clip finally loads (after its key conversions and position-embedding
    # resizing), kept so a shape mismatch can be named key by key instead of by torch's 100-line message.
    offered: dict[str, Any] = {}
    load_state_dict = model.load_state_dict

    def capture(state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        offered.update(state_dict)
        return load_state_dict(state_dict, *args, **kwargs)

    model.load_state_dict = capture
    try:
        incompatible = open_clip.load_checkpoint(model, str(path), strict=False)
    except Exception as exc:  # noqa: BLE001 - unpickling, shape mismatch, corrupt file
        # Nothing offered yet: open_clip refused before loading (e.g. "pos_embed width changed"); compare
        # the file's own tensors then.
        shapes = _shape_mismatches(model, offered or _raw_state_dict(path))
        if shapes:
            raise ClipTritonError(f"checkpoint {path} does not match {name}: {shapes}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipTritonError(f"checkpoint {path} does not fit {name}: {first}") from None
    finally:
        del model.load_state_dict  # the instance attribute: the class's method again
    missing = list(getattr(incompatible, "missing_keys", []) or [])
    unexpected = list(getattr(incompatible, "unexpected_keys", []) or [])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise ClipTritonError(f"checkpoint {path} does not match {name}: {'; '.join(parts)}")


def _raw_state_dict(path: Path) -> dict[str, Any]:
    try:
        from open_clip.factory import load_state_dict  # what open_clip.load_checkpoint reads a file with

        state = load_state_dict(str(path))
    except Exception:  # noqa: BLE001 - not a state dict at all: the original error stands
        return {}
    return state if isinstance(state, dict) else {}


def _few(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _shape_mismatches(model: Any, offered: dict[str, Any]) -> str:
    """'N tensors differ in shape (checkpoint vs model): key [a, b] vs [c, d], ...' ('' when none do),
    with the missing and unexpected keys after it: one line, whatever the checkpoint."""
    own = model.state_dict()
    differ = [
        f"{key} {list(value.shape)} vs {list(own[key].shape)}"
        for key, value in offered.items()
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)
    ]
    if not differ:
        return ""
    count = f"{len(differ)} tensors differ" if len(differ) > 1 else "1 tensor differs"
    parts = [f"{count} in shape (checkpoint vs model): {_few(differ)}"]
    missing = [key for key in own if key not in offered]
    unexpected = [key for key in offered if key not in own]
    if missing:
        parts.append(f"missing keys: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_few(unexpected)}")
    return "; ".join(parts)


def load_model(
    name: str,
    *,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
    random_weights: bool = False,
    seed: int = DEFAULT_SEED,
    preprocess: dict[str, Any] | None = None,
    tokenizer_file: Path | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    progress = progress or Progress("load", quiet=True)
    check_number("--seed", seed, 0, MAX_SEED)
    sources = [s for s in (pretrained, checkpoint, random_weights or None) if s is not None]
    if len(sources) != 1:
        raise ClipTritonError("give exactly one of --pretrained TAG, --checkpoint FILE, --random-weights")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise ClipTritonError(f"tokenizer file {tokenizer_file} does not exist")
    check_model_name(name)
    open_clip = _import_open_clip()
    import torch

    # The legacy exporter cannot trace the fused MultiheadAttention fast path; the math is equal.
    torch.backends.mha.set_fastpath_enabled(False)
    checkpoint_record = None
    used_seed: int | None = None
    if pretrained is not None:
        _check_tag(name, pretrained)
        offline = hub_offline_reason(progress)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
            raise ClipTritonError(
                f"could not fetch pretrained weights {name}/{pretrained} "
                f"({offline or type(exc).__name__}): download them where there is network and "
                "pass --checkpoint FILE"
            ) from None
    else:
        if random_weights:
            progress.warn(
                f"{name} uses RANDOM weights (seed {seed}): embeddings are meaningless; "
                "use --pretrained or --checkpoint for a real model"
            )
            used_seed = seed
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            _load_checkpoint(model, name, checkpoint)
            checkpoint_record = {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)}
    model = model.float().eval()
    if "mobileclip" in name.lower():
        # MobileCLIP's reparameterisable blocks must be fused before export (timm's helper).
        from timm.utils import reparameterize_model

        model = reparameterize_model(model)
    preprocess_cfg = _preprocess_config(model, preprocess or {})
    if pretrained is None and not preprocess:
        # A checkpoint or random model only carries open_clip's defaults; SigLIP was trained otherwise.
        tag = _tags_preprocess_hint(name, preprocess_cfg)
        if tag is not None:
            progress.warn(
                f"{name}'s pretrained tag {tag!r} preprocesses differently from the defaults used here; "
                f"pass --preprocess-from {tag} (or --image-*) if your weights were trained that way"
            )
    tok_cfg, tokenizer = _tokenizer(name, model, tokenizer_file, progress)
    logit_bias = getattr(model, "logit_bias", None)
    with torch.no_grad():
        embed_dim = _embed_dim(model, name)
    return LoadedModel(
        model=model,
        name=name,
        pretrained=pretrained,
        checkpoint=checkpoint_record,
        seed=used_seed,
        preprocess=preprocess_cfg,
        tokenizer_cfg=tok_cfg,
        tokenizer=tokenizer,
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(logit_bias.item()) if logit_bias is not None else None,
    )


def _embed_dim(model: Any, name: str) -> int:
    open_clip = _import_open_clip()
    return int(open_clip.get_model_config(name)["embed_dim"])


def _load_reference(
    manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None
) -> LoadedModel:
    """Rebuild the exact PyTorch model a manifest was exported from (tag, checkpoint or seed).

    With `export_dir`, a Hugging Face tokenizer file the export copied there is loaded too.
    """
    checkpoint = None
    if manifest.checkpoint is not None:
        checkpoint = Path(manifest.checkpoint["path"])
        if not checkpoint.is_file():
            raise ClipTritonError(f"the manifest's checkpoint {checkpoint} is gone; parity needs it")
        if sha256_file(checkpoint) != manifest.checkpoint["sha256"]:
            raise ClipTritonError(f"checkpoint {checkpoint} changed since export (sha256 differs)")
    loaded = load_model(
        manifest.model_name,
        pretrained=manifest.pretrained,
        checkpoint=checkpoint,
        random_weights=manifest.random_weights,
        seed=manifest.seed if manifest.seed is not None else DEFAULT_SEED,
        preprocess=asdict(manifest.preprocess),
        tokenizer_file=_exported_tokenizer_file(manifest, export_dir),
        progress=progress or Progress("reference", quiet=True),
    )
    return loaded


def _exported_tokenizer_file(manifest: Manifest, export_dir: Path | None) -> Path | None:
    name = manifest.tokenizer.hf_file
    if export_dir is None or not name or not (Path(export_dir) / name).is_file():
        return None
    return Path(export_dir) / name


# ---------------------------------------------------------------- memory (docs/engines.md, "Memory")




def _tower_parameter_bytes(loaded: LoadedModel) -> dict[str, int]:
    """FP32 bytes of each tower's parameters (image = `model.visual`, text = everything else)."""
    model = loaded.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    visual = getattr(model, "visual", None)
    image = sum(p.numel() * p.element_size() for p in visual.parameters()) if visual is not None else 0
    return {"image": image, "text": total - image}


def _release_tower(loaded: LoadedModel, tower: str) -> None:
    """Drop one tower's weights from `loaded.model`, so later steps hold only the other tower.

    The image tower is `model.visual` in every open_clip model; the text tower is everything else
    (CLIP's transformer/token_embedding/ln_final/positional_embedding/text_projection, or
    CustomTextCLIP's `model.text`). The model can no longer encode that tower afterwards.
    """
    import torch

    model = loaded.model
    if model is None:
        return
    if tower == "image":
        model.visual = None
    else:
        for name, _child in list(model.named_children()):
            if name != "visual":
                setattr(model, name, None)
        for name, param in list(model.named_parameters(recurse=False)):
            if name not in ("logit_scale", "logit_bias") and isinstance(param, torch.nn.Parameter):
                setattr(model, name, None)
    release_memory()


def _tower_modules(loaded: LoadedModel) -> dict[str, Any]:
    """The two exportable wrappers of an open_clip model: inputs -> L2-normalised embeddings."""
    import torch as torch_module

    torch: Any = torch_module  # a module object: mypy cannot see torch.nn.Module through it
    functional = torch.nn.functional

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Any) -> Any:
            return functional.normalize(self.model.encode_image(pixel_values), dim=-1)

    class TextEncoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any) -> Any:
            return functional.normalize(self.model.encode_text(input_ids), dim=-1)

    return {"image": ImageEncoder(loaded.model).eval(), "text": TextEncoder(loaded.model).eval()}


class OpenClipSource(ModelSource):
    """open_clip models: a model name plus a pretrained tag, a local checkpoint or seeded random weights."""

    name = "open_clip"

    def load_reference(
        self, manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None
    ) -> LoadedModel:
        return _load_reference(manifest, progress, export_dir)

    def tower_modules(self, loaded: LoadedModel) -> dict[str, Any]:
        return _tower_modules(loaded)

    def tower_parameter_bytes(self, loaded: LoadedModel) -> dict[str, int]:
        return _tower_parameter_bytes(loaded)

    def release_tower(self, loaded: LoadedModel, tower: str) -> None:
        _release_tower(loaded, tower)


SOURCE = register(OpenClipSource())
