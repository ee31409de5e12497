"""Tokenizers for the exporter, from the very code the Triton tokenize model runs.

The implementation lives once, in `model_repository/common/clip_tokenizer.py` (torch-free, copied
into every repository); this module loads it so export-time ids and served ids cannot drift.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from exporter.common import ClipTritonError
from exporter.manifest import TokenizerConfig

SOURCES = Path(__file__).resolve().parent.parent / "model_repository"
COMMON = SOURCES / "common"
_MODULE = "clip_triton_model_common.clip_tokenizer"


def tokenizer_module() -> ModuleType:
    """model_repository/common/clip_tokenizer.py, imported once by path (it is not a package)."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    path = COMMON / "clip_tokenizer.py"
    if not path.is_file():
        raise ClipTritonError(f"{path} is missing: install clip-triton from its source tree")
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)
    return module


class FileTokenizer:
    """open_clip's HFTokenizer semantics over a local tokenizer.json: list[str] -> int64 [N, L]."""

    def __init__(self, path: Path, cfg: TokenizerConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        try:
            self._impl = tokenizer_module().HfFileTokenizer(
                str(self.path), cfg.context_length, cfg.clean, cfg.strip_sep_token, cfg.pad_id
            )
        except ImportError as exc:
            raise ClipTritonError(f"reading {self.path} needs the `tokenizers` package ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
            raise ClipTritonError(f"{self.path} is not a usable tokenizer.json: {exc}") from None

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        return self._impl(texts)


def clip_tokenizer(context_length: int = 77, clean: str = "lower") -> Any:
    """open_clip's SimpleTokenizer (CLIP BPE), torch-free."""
    return tokenizer_module().ClipBpeTokenizer(context_length=context_length, clean=clean)


def tokenizer_for(cfg: TokenizerConfig, directory: Path | None = None) -> Any:
    """The servable tokenizer a manifest describes; `directory` holds its tokenizer.json if any."""
    hf_file = None
    if cfg.kind == "hf":
        if not cfg.hf_file or directory is None or not (Path(directory) / cfg.hf_file).is_file():
            raise ClipTritonError(
                "this model's Hugging Face tokenizer is not in the export folder; "
                "re-export with --tokenizer-file tokenizer.json to serve text"
            )
        hf_file = str(Path(directory) / cfg.hf_file)
    try:
        return tokenizer_module().make_tokenizer(
            cfg.kind, cfg.context_length, cfg.clean, hf_file, cfg.strip_sep_token, cfg.pad_id
        )
    except ValueError as exc:
        raise ClipTritonError(str(exc)) from None
