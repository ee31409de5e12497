"""The model-source seam: what every source (open_clip today) hands the stages, and its registry.

A source turns a user's model flags into a `LoadedModel` (a PyTorch model in FP32 eval mode, its
preprocessing and tokenizer configs) and rebuilds that same model from a manifest, which records
the source's name. Stages never look inside the model: they ask the source for the two tower
modules (inputs -> L2-normalised embeddings) and for the memory operations. How to add a source:
docs/runtimes.md ("How to add a model source").
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import ClipTritonError, Progress, release_memory
from clip_triton.exporter.base.manifest import Manifest, PreprocessConfig, TokenizerConfig


@dataclass
class LoadedModel:
    model: Any  # the source's PyTorch model, eval mode, FP32, CPU (None once released)
    name: str
    pretrained: str | None
    checkpoint: dict[str, Any] | None
    seed: int | None
    preprocess: PreprocessConfig
    tokenizer_cfg: TokenizerConfig
    tokenizer: Any | None  # a callable texts -> int ids, or None when it needs the network
    embed_dim: int
    logit_scale: float
    logit_bias: float | None
    source: str = "open_clip"  # the registered ModelSource that built it (recorded in the manifest)
    model_config: dict[str, Any] | None = None  # a custom architecture's config (Manifest.model_config)
    builtin_sha256: str | None = None  # the shipped weights' sha256 (pretrained "builtin")
    # PIL image -> FP32 [3, H, W] by the checkpoint's own image processor (parity's reference pixels);
    # None: open_clip's transform built from `preprocess` (exporter/parity/samples.py).
    image_reference: Any | None = None

    @property
    def random_weights(self) -> bool:
        return self.seed is not None


class ModelSource(ABC):
    """One registry entry. `name` is what manifests record (`Manifest.source`)."""

    name = "source"

    @abstractmethod
    def load_reference(
        self, manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None
    ) -> LoadedModel:
        """Rebuild the exact model a manifest was exported from; a one-line error when it cannot."""

    @abstractmethod
    def tower_modules(self, loaded: LoadedModel) -> dict[str, Any]:
        """{"image": module(pixels) -> embeddings, "text": module(ids) -> embeddings}, L2-normalised."""

    @abstractmethod
    def tower_parameter_bytes(self, loaded: LoadedModel) -> dict[str, int]:
        """FP32 bytes of each tower's parameters (plans the export order)."""

    @abstractmethod
    def release_tower(self, loaded: LoadedModel, tower: str) -> None:
        """Drop one tower's weights; the model can no longer encode that tower afterwards."""


def normalized_towers(model: Any, encode_image: Any, encode_text: Any) -> dict[str, Any]:
    """The two exportable modules every source hands the stages: {"image": pixels -> embeddings, "text": ids ->
    embeddings}, L2-normalised; `encode_*(model, x)` is the source's own call into its model."""
    import torch as torch_module

    torch: Any = torch_module  # a module object: mypy cannot see torch.nn.Module through it

    class Tower(torch.nn.Module):
        def __init__(self, encode: Any) -> None:
            super().__init__()
            self.model = model
            self.encode = encode

        def forward(self, inputs: Any) -> Any:
            return torch.nn.functional.normalize(self.encode(self.model, inputs), dim=-1)

    return {"image": Tower(encode_image).eval(), "text": Tower(encode_text).eval()}


_REGISTRY: dict[str, ModelSource] = {}


def register(source: ModelSource) -> ModelSource:
    if source.name in _REGISTRY:
        raise ValueError(f"model source {source.name!r} is registered twice")
    _REGISTRY[source.name] = source
    return source


def registered() -> list[ModelSource]:
    return list(_REGISTRY.values())


def get(name: str) -> ModelSource:
    if name not in _REGISTRY:
        raise ClipTritonError(f"unknown model source {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def release_model(loaded: LoadedModel) -> None:
    """Drop the PyTorch model once its reference embeddings are computed: ONNX Runtime sessions
    opened afterwards must not stack on the model's FP32 weights."""
    loaded.model = None
    release_memory()


# ---------------------------------------------------------------- the model hub (every source that downloads)

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
