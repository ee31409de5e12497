"""The `python` runtime: ONNX Runtime on CPU inside Triton's python backend.

Serving only (its runner would be the onnxruntime runtime's CPU runner): the encoder is
`model_repository/onnx_encoder/model.py`, which checks every request before the batch runs
(docs/limits.md). It runs on the embedded tritonserver and in NVIDIA's container alike.
"""

from __future__ import annotations

from typing import Any

from clip_triton.clients.contract import PARAM_OPTIMIZE
from clip_triton.exporter.runtimes.base import Runtime, Serving, register


class PythonServing(Serving):
    fmt = "onnx"
    model_file = "model.onnx"
    devices = ("cpu",)
    python_source = "onnx_encoder/model.py"
    pip = ("onnxruntime",)

    def configure(self, config: Any, precision: str) -> None:
        config.backend = "python"
        # FP16 graphs run with ONNX Runtime's optimiser off (docs/engines.md); INT8 Q/DQ graphs need it on.
        config.parameters[PARAM_OPTIMIZE].string_value = "false" if precision == "fp16" else "true"


class PythonRuntime(Runtime):
    name = "python"
    label = "ONNX Runtime in the python backend (CPU)"
    serving = PythonServing()


RUNTIME = register(PythonRuntime())
