"""The model-source registry: one module per source, each registering itself on import.

Stages reach a model only through these functions, which dispatch on the source a `LoadedModel`
or a manifest names; none imports a source module for its model code. How to add one:
docs/runtimes.md ("How to add a model source").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import Progress
from clip_triton.exporter.base.manifest import Manifest
from clip_triton.exporter.sources import (
    hf_transformers,  # noqa: F401 - registers it
    open_clip,  # noqa: F401 - registers it
)
from clip_triton.exporter.sources.base import LoadedModel, ModelSource, get, register, registered, release_model


def load_reference(manifest: Manifest, progress: Progress | None = None, export_dir: Path | None = None) -> LoadedModel:
    """The PyTorch model a manifest was exported from, rebuilt by the source it records."""
    return get(manifest.source).load_reference(manifest, progress=progress, export_dir=export_dir)


def tower_modules(loaded: LoadedModel) -> dict[str, Any]:
    return get(loaded.source).tower_modules(loaded)


def tower_parameter_bytes(loaded: LoadedModel) -> dict[str, int]:
    return get(loaded.source).tower_parameter_bytes(loaded)


def release_tower(loaded: LoadedModel, tower: str) -> None:
    get(loaded.source).release_tower(loaded, tower)


__all__ = [
    "LoadedModel",
    "ModelSource",
    "get",
    "load_reference",
    "register",
    "registered",
    "release_model",
    "release_tower",
    "tower_modules",
    "tower_parameter_bytes",
]
