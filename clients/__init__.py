"""gRPC clients for a clip-triton model repository served by Triton.

    from clip_triton.clients import ClipClient
    with ClipClient("127.0.0.1:8001") as client:
        vectors = client.embed_images(["cat.jpg"])            # float32 [1, D], L2-normalised
        probs = client.classify(["cat.jpg"], ["cat", "dog"])  # float32 [1, 2]

`AsyncClipClient` offers the same methods as coroutines. Errors derive from ClipClientError.
Names load on first use (PEP 562), so `import clip_triton.clients.cli` stays light for `clip-triton --help`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_TEMPLATES": "clip_triton.clients._core",
    "ClientOptions": "clip_triton.clients._core",
    "ModelInfo": "clip_triton.clients._core",
    "RankedItem": "clip_triton.clients._core",
    "TowerInfo": "clip_triton.clients._core",
    "AsyncClipClient": "clip_triton.clients.aio",
    "ClipClient": "clip_triton.clients.sync",
    "ClientTimeoutError": "clip_triton.clients.errors",
    "ClipClientError": "clip_triton.clients.errors",
    "InvalidItemError": "clip_triton.clients.errors",
    "InvalidUrlError": "clip_triton.clients.errors",
    "ItemError": "clip_triton.clients.errors",
    "ModelMismatchError": "clip_triton.clients.errors",
    "ModelNotFoundError": "clip_triton.clients.errors",
    "RequestError": "clip_triton.clients.errors",
    "ServerFaultError": "clip_triton.clients.errors",
    "ServerResponseError": "clip_triton.clients.errors",
    "ServerUnavailableError": "clip_triton.clients.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from clip_triton.clients._core import DEFAULT_TEMPLATES, ClientOptions, ModelInfo, RankedItem, TowerInfo  # noqa: F401
    from clip_triton.clients.aio import AsyncClipClient  # noqa: F401
    from clip_triton.clients.errors import (  # noqa: F401
        ClientTimeoutError,
        ClipClientError,
        InvalidItemError,
        InvalidUrlError,
        ItemError,
        ModelMismatchError,
        ModelNotFoundError,
        RequestError,
        ServerFaultError,
        ServerResponseError,
        ServerUnavailableError,
    )
    from clip_triton.clients.sync import ClipClient  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
