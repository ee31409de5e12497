"""The embedded server's stand-in for Triton's OpenVINO backend (the `openvino` runtime, CPU).

Installed by the embedded server as a python-based backend named `openvino`
(`<backend-directory>/openvino/model.py`, exporter/base/server.py), so an unchanged
`backend: "openvino"` repository, written for NVIDIA's container, runs where the real backend library is
absent. It reads the backend's own config parameters with its meaning (openvino_backend src/openvino.cc):
  PERFORMANCE_HINT (LATENCY / THROUGHPUT / CUMULATIVE_THROUGHPUT), NUM_STREAMS (AUTO / NUMA / n),
  INFERENCE_NUM_THREADS, HINT_BF16 (YES: bf16 inference precision; unset: the CPU plugin's default,
  which is bf16 on CPUs with AVX512_BF16 or AMX, f32 elsewhere; the backend has no way to ask for f32)
and compiles `<version>/<default_model_filename>` (model.onnx: a file, or a folder holding model.onnx and
its external data) with OpenVINO's Python API on the CPU.

Differences from the real backend (docs/runtimes.md, "OpenVINO"): the graph keeps its dynamic batch
dimension, so ENABLE_BATCH_PADDING has nothing to pad; `valid_range` (which the real backend ignores) is
enforced as the python runtime's encoder does. Request checks, per-request reruns of a failed batch and the
non-finite output check are the python runtime's (onnx_encoder.py, installed beside this file).
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import triton_python_backend_utils as pb_utils  # noqa: E402
from onnx_encoder import TritonPythonModel as _OnnxEncoder  # noqa: E402
from onnx_encoder import _error, _param  # noqa: E402


def _ov_config(config):
    """The OpenVINO compile properties Triton's OpenVINO backend would set from this model config."""
    out = {}
    hint = (_param(config, "PERFORMANCE_HINT") or "").upper()
    if hint:
        if hint not in ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"):
            raise ValueError(f"PERFORMANCE_HINT must be LATENCY/THROUGHPUT/CUMULATIVE_THROUGHPUT, got {hint}")
        out["PERFORMANCE_HINT"] = hint
    streams = (_param(config, "NUM_STREAMS") or "").upper()
    if streams:
        if streams not in ("AUTO", "NUMA") and not streams.isdigit():
            raise ValueError(f"NUM_STREAMS must be AUTO/NUMA/<int>, got {streams}")
        out["NUM_STREAMS"] = streams
    threads = _param(config, "INFERENCE_NUM_THREADS")
    if threads:
        if not threads.isdigit():
            raise ValueError(f"INFERENCE_NUM_THREADS must be a non-negative number, got {threads}")
        out["INFERENCE_NUM_THREADS"] = int(threads)
    bf16 = _param(config, "HINT_BF16")
    if bf16:
        if bf16.upper() != "YES":
            raise ValueError(f"HINT_BF16 must be YES, got {bf16}")
        out["INFERENCE_PRECISION_HINT"] = "bf16"
    return out


class TritonPythonModel(_OnnxEncoder):
    def initialize(self, args):
        import openvino as ov

        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        name = config.get("default_model_filename") or "model.xml"
        path = os.path.join(version_dir, name)
        if os.path.isdir(path):  # external-data layout: a folder named model.onnx
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{args['model_name']}: no model at {path}")
        try:
            properties = _ov_config(config)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from None
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(path), "CPU", properties)
        self.request = self.compiled.create_infer_request()
        self.input = self.compiled.inputs[0].get_any_name()
        self.input_dtype = self.compiled.inputs[0].get_element_type().to_dtype()
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        bounds = _param(config, "valid_range")
        self.valid_range = tuple(float(b) for b in bounds.split(",")) if bounds else None
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def _run(self, batch):
        self.request.infer({0: np.ascontiguousarray(batch.astype(self.input_dtype, copy=False))})
        outs = [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.outputs))]
        for name, out in zip(self.outputs, outs, strict=True):
            if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
                raise FloatingPointError(f"output {name} has non-finite values")
        return outs

    def _failed(self, exc):
        return pb_utils.InferenceResponse(error=_error(f"OpenVINO failed: {type(exc).__name__}: {exc}"))
