"""The exporter: the `clip-triton` CLI and the stages it composes (docs/design.md has the module map)."""

from clip_triton import __version__

__all__ = ["__version__"]
