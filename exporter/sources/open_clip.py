"""Load an open_clip model, its preprocessing config and its tokenizer.

Weights from exactly one source per call: a pretrained tag (open_clip's own download), the weights
shipped with clip-triton (`--pretrained builtin`, exporter/sources/builtin/), a local checkpoint
file, or explicit random weights (seeded, so a later stage can rebuild the very same model from the
manifest). The architecture is one of open_clip's, a builtin one, or a custom open_clip model config
(`--model-config FILE.json`, named by `--model`; recorded in the manifest).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import ClipTritonError, Progress, check_number, release_memory
from clip_triton.exporter.base.manifest import (
    BUILTIN_WEIGHTS,
    INTERPOLATIONS,
    MODEL_CONFIG_KEYS,
    RESIZE_MODES,
    Manifest,
    PreprocessConfig,
    TokenizerConfig,
    sha256_file,
)
from clip_triton.exporter.sources.base import (
    LoadedModel,
    ModelSource,
    hub_offline_reason,
    normalized_towers,
    register,
)

DEFAULT_SEED = 0
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
# Models shipped with clip-triton: NAME.json (an open_clip model config) and NAME.safetensors (its weights).
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
MAX_MODEL_CONFIG_BYTES = 1 << 20  # a model config is a few hundred bytes; anything near this is not one


def _import_open_clip() -> Any:
    # Heavy (torch, timm): imported only when a stage needs a model.
    import open_clip

    _sync_builtins(open_clip)
    return open_clip


def check_model_name(name: str) -> None:
    """An architecture open_clip knows: its own, a builtin one, or a --model-config one while it loads."""
    open_clip = _import_open_clip()
    models = open_clip.list_models()
    if name in models:
        return
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ClipTritonError(
        f"unknown open_clip model {name!r}{hint} (see open_clip.list_models(); "
        "a custom architecture needs --model-config FILE.json)"
    )


# ---------------------------------------------------------------- model configs (docs/runtimes.md)

_ABSENT = object()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # open_clip looks names up with "/" as "-"


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The keys open_clip's configs use most, with the type each must have (others are left to open_clip).
_KINDS: dict[str, tuple[str, Any]] = {
    "positive integer": ("a positive integer", _positive_int),
    "size": ("a positive integer or [height, width]", lambda v: _positive_int(v) or (
        isinstance(v, list) and len(v) == 2 and all(_positive_int(x) for x in v))),
    "layers": ("a positive integer or a list of them", lambda v: _positive_int(v) or (
        isinstance(v, list) and bool(v) and all(_positive_int(x) for x in v))),
    "positive number": ("a positive number", lambda v: _number(v) and v > 0),
    "number": ("a finite number", _number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "string": ("a string", lambda v: isinstance(v, str)),
}
_CONFIG_TYPES = {
    "embed_dim": "positive integer",
    "quick_gelu": "bool",
    "custom_text": "bool",
    "init_logit_scale": "number",
    "init_logit_bias": "number",
    "vision_cfg.image_size": "size",
    "vision_cfg.patch_size": "size",
    "vision_cfg.width": "positive integer",
    "vision_cfg.layers": "layers",
    "vision_cfg.head_width": "positive integer",
    "vision_cfg.mlp_ratio": "positive number",
    "vision_cfg.timm_model_name": "string",
    "text_cfg.context_length": "positive integer",
    "text_cfg.vocab_size": "positive integer",
    "text_cfg.width": "positive integer",
    "text_cfg.heads": "positive integer",
    "text_cfg.layers": "positive integer",
    "text_cfg.mlp_ratio": "positive number",
    "text_cfg.hf_model_name": "string",
    "text_cfg.hf_tokenizer_name": "string",
}


def check_model_config(config: Any, where: str) -> dict[str, Any]:
    """`config` if it is an open_clip model config (embed_dim, vision_cfg, text_cfg and the common keys of
    the right type), else a one-line ClipTritonError naming `where` and the first problem."""
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(config), "a number")
        raise ClipTritonError(f"{where} must be a JSON object (an open_clip model config), not {kind}")
    missing = [key for key in MODEL_CONFIG_KEYS if key not in config]
    if missing:
        hint = " (an open_clip_config.json? pass its model_cfg object)" if "model_cfg" in config else ""
        raise ClipTritonError(f"{where} lacks {', '.join(missing)}{hint}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(config[key], dict):
            raise ClipTritonError(f"{where}: {key} must be an object, got {json.dumps(config[key])[:60]}")
    for dotted, kind in _CONFIG_TYPES.items():
        *section, key = dotted.split(".")
        holder = config[section[0]] if section else config
        if key in holder and (dotted == "embed_dim" or holder[key] is not None):
            text, valid = _KINDS[kind]
            if not valid(holder[key]):
                raise ClipTritonError(f"{where}: {dotted} must be {text}, got {json.dumps(holder[key])[:60]}")
    return config


def read_model_config(path: Path) -> dict[str, Any]:
    """An open_clip model-config JSON file, checked (check_model_config); one-line errors naming the file."""
    path = Path(path)
    where = f"model config {path}"
    try:
        if not path.exists():
            raise ClipTritonError(f"{where} does not exist")
        if not path.is_file():
            raise ClipTritonError(f"{where} is not a file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_MODEL_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ClipTritonError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_MODEL_CONFIG_BYTES:
        raise ClipTritonError(f"{where} is over {MAX_MODEL_CONFIG_BYTES >> 20} MiB: not an open_clip model config")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ClipTritonError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ClipTritonError(f"{where} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ClipTritonError(f"{where} nests too deeply to be an open_clip model config") from None
    return check_model_config(config, where)


def _custom_config(
    name: str, model_config: Path | dict[str, Any] | None, pretrained: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """(the checked config, what to call it in errors) of a --model-config architecture; (None, None)
    without one. `--model` names it and must not name an architecture open_clip already has."""
    if model_config is None:
        return None, None
    if isinstance(model_config, dict):
        where = "the manifest's model_config"
        config = check_model_config(copy.deepcopy(model_config), where)
    else:
        where = f"model config {model_config}"
        config = read_model_config(Path(model_config))
    if pretrained is not None:
        raise ClipTritonError(
            f"--pretrained {pretrained} cannot load a --model-config architecture: "
            "pass --checkpoint FILE or --random-weights"
        )
    if not _NAME.fullmatch(name):
        raise ClipTritonError(
            f"--model {name!r} cannot name a --model-config architecture: use letters, digits and . _ + - "
            "(up to 100, starting with a letter or digit)"
        )
    if name in _import_open_clip().list_models():
        raise ClipTritonError(
            f"--model {name} already names an open_clip architecture: give the {where} architecture its own name"
        )
    return config, where


@contextlib.contextmanager
def _registered(name: str, config: dict[str, Any] | None) -> Iterator[None]:
    """open_clip knows `name` as `config` inside the block and as before after it (nothing leaks into
    the next load). open_clip's only registry is the private `factory._MODEL_CONFIGS` (its
    add_model_config takes a path and rescans every folder)."""
    if config is None:
        yield
        return
    registry = _import_open_clip().factory._MODEL_CONFIGS
    before = registry.get(name, _ABSENT)
    registry[name] = copy.deepcopy(config)
    try:
        yield
    finally:
        registry = _import_open_clip().factory._MODEL_CONFIGS  # add_model_config rebinds it
        if before is _ABSENT:
            registry.pop(name, None)
        else:
            registry[name] = before


_BUILTINS: dict[str, Any] = {"key": None, "names": []}


def _sync_builtins(open_clip: Any) -> None:
    """Register BUILTIN_DIR's configs with open_clip under their file names, so a builtin model also
    takes --random-weights and --checkpoint. Re-read only when the folder changes; never shadows one of
    open_clip's own names; a broken file is skipped here (`--pretrained builtin` names its problem)."""
    folder = Path(BUILTIN_DIR)
    try:
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        key = (str(folder), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    except OSError:
        files, key = [], (str(folder), ())
    registry = open_clip.factory._MODEL_CONFIGS
    if _BUILTINS["key"] == key and all(name in registry for name in _BUILTINS["names"]):
        return
    for name in _BUILTINS["names"]:
        registry.pop(name, None)
    names = []
    for path in files:
        if path.stem in registry:
            continue
        try:
            registry[path.stem] = read_model_config(path)
        except ClipTritonError:
            continue
        names.append(path.stem)
    _BUILTINS.update(key=key, names=names)


def builtin_models() -> list[str]:
    """The models shipped with weights: NAME.json and NAME.safetensors in BUILTIN_DIR."""
    folder = Path(BUILTIN_DIR)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())


def builtin_weights(name: str) -> Path:
    """The shipped weights of builtin model `name`; a one-line error listing the builtin models otherwise."""
    models = builtin_models()
    if name not in models:
        known = ", ".join(models) if models else "none ship with this installation"
        raise ClipTritonError(f"{name} has no builtin weights (builtin models: {known})")
    read_model_config(Path(BUILTIN_DIR) / f"{name}.json")  # a broken shipped config: its problem, in one line
    return Path(BUILTIN_DIR) / f"{name}.safetensors"


def _load_builtin(model: Any, name: str, path: Path) -> None:
    """The shipped safetensors into `model`, strictly: every key, every shape."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ClipTritonError(f"builtin weights {path} cannot be read: {_first_line(exc)}") from None
    mismatch = _shape_mismatches(model, state) or _key_mismatches(
        [key for key in model.state_dict() if key not in state], [key for key in state if key not in model.state_dict()]
    )
    if mismatch:
        raise ClipTritonError(f"builtin weights {path} do not match {name}: {mismatch}")
    model.load_state_dict(state, strict=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
        raise ClipTritonError(f"checkpoint {path} does not match {name}: {_key_mismatches(missing, unexpected)}")


def _key_mismatches(missing: list[str], unexpected: list[str]) -> str:
    """'missing keys: a, b; unexpected keys: c' ('' when neither)."""
    parts = []
    if missing:
        parts.append(f"missing keys: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_few(unexpected)}")
    return "; ".join(parts)


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
    model_config: Path | dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """The model `name` with weights from exactly one of `pretrained` (a tag, or "builtin": the weights
    shipped in BUILTIN_DIR), `checkpoint` and `random_weights`.

    `model_config` (a JSON file, or the dict a manifest recorded) defines a custom architecture that
    `name` names: open_clip knows it only while this call runs, and the loaded model records it.
    """
    config, where = _custom_config(name, model_config, pretrained)
    with _registered(name, config):
        loaded = _load_model(
            name, pretrained=pretrained, checkpoint=checkpoint, random_weights=random_weights, seed=seed,
            preprocess=preprocess, tokenizer_file=tokenizer_file, custom=where, progress=progress,
        )
    loaded.model_config = config
    return loaded


class _NoRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" line: every model is
    created that way before its weights load (checkpoint, builtin), and random weights get our own warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _create_model(name: str, custom: str | None) -> Any:
    """open_clip's model `name`, randomly initialised; `custom` names the --model-config it comes from."""
    open_clip = _import_open_clip()
    quiet = _NoRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(name, pretrained=None)
    except Exception as exc:  # noqa: BLE001 - whatever a config makes the model classes raise
        if custom is None:
            raise
        raise ClipTritonError(f"{custom}: open_clip cannot build {name} from it ({_first_line(exc)})") from None
    finally:
        root.removeFilter(quiet)


def _load_model(
    name: str,
    *,
    pretrained: str | None,
    checkpoint: Path | None,
    random_weights: bool,
    seed: int,
    preprocess: dict[str, Any] | None,
    tokenizer_file: Path | None,
    custom: str | None,
    progress: Progress | None,
) -> LoadedModel:
    progress = progress or Progress("load", quiet=True)
    check_number("--seed", seed, 0, MAX_SEED)
    sources = [s for s in (pretrained, checkpoint, random_weights or None) if s is not None]
    if len(sources) != 1:
        raise ClipTritonError("give exactly one of --pretrained TAG, --checkpoint FILE, --random-weights")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise ClipTritonError(f"tokenizer file {tokenizer_file} does not exist")
    # Shipped in the package: no hub, no user path; an unknown name lists the builtin models.
    weights = builtin_weights(name) if pretrained == BUILTIN_WEIGHTS else None
    check_model_name(name)
    open_clip = _import_open_clip()
    import torch

    # The legacy exporter cannot trace the fused MultiheadAttention fast path; the math is equal.
    torch.backends.mha.set_fastpath_enabled(False)
    checkpoint_record = None
    used_seed: int | None = None
    builtin_sha256: str | None = None
    if weights is not None:
        torch.manual_seed(seed)
        model = _create_model(name, custom)
        builtin_sha256 = sha256_file(weights)
        _load_builtin(model, name, weights)
    elif pretrained is not None:
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
        model = _create_model(name, custom)
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
        builtin_sha256=builtin_sha256,
    )


def _embed_dim(model: Any, name: str) -> int:
    # A --model-config architecture is registered while load_model runs, so its config is found here too.
    open_clip = _import_open_clip()
    return int(open_clip.get_model_config(name)["embed_dim"])


def _load_reference(
    manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None
) -> LoadedModel:
    """Rebuild the exact PyTorch model a manifest was exported from (tag, builtin weights, checkpoint or
    seed; a custom architecture from the model_config the manifest records).

    With `export_dir`, a Hugging Face tokenizer file the export copied there is loaded too.
    """
    if manifest.pretrained == BUILTIN_WEIGHTS:
        weights = builtin_weights(manifest.model_name)
        if sha256_file(weights) != manifest.builtin_sha256:
            raise ClipTritonError(
                f"the builtin weights {weights} changed since export (sha256 differs); re-export {manifest.model_name}"
            )
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
        model_config=manifest.model_config,
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
    return normalized_towers(loaded.model, lambda m, x: m.encode_image(x), lambda m, ids: m.encode_text(ids))


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
