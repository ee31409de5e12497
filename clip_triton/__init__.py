"""clip-triton: OpenCLIP -> ONNX -> FP16 -> TensorRT -> Triton model repository, with parity checks.

One import namespace over the repository's two top-level folders (pyproject's package-dir):
`clip_triton.exporter` (the CLI and its stages) and `clip_triton.clients` (the gRPC clients, which
stand alone). The client's public names are re-exported here, loaded on first use (PEP 562), so

    from clip_triton import ClipClient

imports neither torch nor the exporter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clip_triton.clients import *  # noqa: F403


def __getattr__(name: str) -> Any:
    clients = importlib.import_module("clip_triton.clients")
    if name not in clients.__all__:
        raise AttributeError(f"module 'clip_triton' has no attribute {name!r}")
    value = getattr(clients, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module("clip_triton.clients").__all__])
