"""Tokenizers for the exporter, from the very code the Triton tokenize model runs.

The implementation lives once, in `model_repository/common/clip_tokenizer.py` (torch-free, copied
into every repository); this module loads it so export-time ids and served ids cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError, repository_common_module
from clip_triton.exporter.base.manifest import TokenizerConfig


def tokenizer_module() -> ModuleType:
    """model_repository/common/clip_tokenizer.py: the tokenize model's own code."""
    return repository_common_module("clip_tokenizer")


class FileTokenizer:
    """open_clip's HFTokenizer semantics over a local tokenizer.json: list[str] -> int64 [N, L]."""

    def __init__(self, path: Path, cfg: TokenizerConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        try:
            self._impl = tokenizer_module().HfFileTokenizer(
                str(self.path), cfg.context_length, cfg.clean, cfg.strip_sep_token, cfg.pad_id, cfg.padding_side
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
