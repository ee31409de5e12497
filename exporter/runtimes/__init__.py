"""The runtime registry: one module per runtime, each registering itself on import.

Stages loop over `registered()` (parity, the encoder benchmark) or look a runtime up by the name
users type (`serving(name)` for `--runtime`); none compares runtime names by hand.
How to add one: docs/runtimes.md.
"""

from clip_triton.exporter.runtimes import onnxruntime, openvino, python, tensorrt, torch, triton  # noqa: F401 - registers them
from clip_triton.exporter.runtimes.base import (
    BATCH,
    TOLERANCES,
    RunContext,
    Runner,
    Runtime,
    Serving,
    Skipped,
    TowerBatch,
    artifact_paths,
    find,
    get,
    register,
    registered,
    serving,
    serving_names,
)

# What `build --runtime auto` picks: engines when they were built, else the CPU runtime that
# every host (and the embedded server) can run.
AUTO_WITH_ENGINES = tensorrt.RUNTIME.name
AUTO_WITHOUT_ENGINES = python.RUNTIME.name

__all__ = [
    "AUTO_WITHOUT_ENGINES",
    "AUTO_WITH_ENGINES",
    "BATCH",
    "TOLERANCES",
    "RunContext",
    "Runner",
    "Runtime",
    "Serving",
    "Skipped",
    "TowerBatch",
    "artifact_paths",
    "find",
    "get",
    "register",
    "registered",
    "serving",
    "serving_names",
]
