"""gRPC clients for a clip-triton model repository served by Triton.

    from clients import ClipClient
    with ClipClient("127.0.0.1:8001") as client:
        vectors = client.embed_images(["cat.jpg"])            # float32 [1, D], L2-normalised
        probs = client.classify(["cat.jpg"], ["cat", "dog"])  # float32 [1, 2]

`AsyncClipClient` offers the same methods as coroutines. Errors derive from ClipClientError.
Names load on first use (PEP 562), so `import clients.cli` stays light for `clip-triton --help`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_TEMPLATES": "clients._core",
    "ClientOptions": "clients._core",
    "ModelInfo": "clients._core",
    "RankedItem": "clients._core",
    "TowerInfo": "clients._core",
    "AsyncClipClient": "clients.aio",
    "ClipClient": "clients.sync",
    "ClientTimeoutError": "clients.errors",
    "ClipClientError": "clients.errors",
    "InvalidItemError": "clients.errors",
    "InvalidUrlError": "clients.errors",
    "ItemError": "clients.errors",
    "ModelMismatchError": "clients.errors",
    "ModelNotFoundError": "clients.errors",
    "RequestError": "clients.errors",
    "ServerFaultError": "clients.errors",
    "ServerResponseError": "clients.errors",
    "ServerUnavailableError": "clients.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from clients._core import DEFAULT_TEMPLATES, ClientOptions, ModelInfo, RankedItem, TowerInfo  # noqa: F401
    from clients.aio import AsyncClipClient  # noqa: F401
    from clients.errors import (  # noqa: F401
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
    from clients.sync import ClipClient  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
