"""ONNX Runtime inside Triton's python backend (the `python` runtime, CPU).

Also installed by the embedded server as a python-based backend named `onnxruntime`
(`<backend-directory>/onnxruntime/model.py`), so an unchanged `backend: "onnxruntime"` model runs
where the real onnxruntime backend library is absent. Finds `<version>/model.onnx` (a file, or
a folder holding model.onnx and its external data) and batches all requests into one run.

Failure behaviour (docs/limits.md): every request is checked on its own before the batch runs
(integer inputs inside `valid_range`, float inputs finite) and refused with INVALID_ARGUMENT;
a batch that fails inside ONNX Runtime is rerun request by request so only the guilty request
fails; a non-finite output is an INTERNAL error, never a silent NaN embedding. Each response
gets its own error object: the python backend frees an error with its response, so one object
shared by several responses is a use-after-free (garbage messages, then a crashed server).
"""

# Copied standalone into every repository, so it cannot import clip_triton: the names it reads (config parameters)
# are spelled here. Their owner is clients/contract.py; tests/test_contract.py checks that they agree.
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bundled_deps import use_bundled_deps  # noqa: E402

use_bundled_deps(HERE)  # onnxruntime, when the repository carries its wheels (docs/deploy.md)


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


def _error(message, code=None):
    """A fresh TritonError (never shared between responses); INTERNAL unless a code is given."""
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


class _RequestError(ValueError):
    """The request itself is wrong (the client's fault): INVALID_ARGUMENT."""


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        # As a python model, default_model_filename is model.py (Triton's default): not ours.
        name = config.get("default_model_filename") or ""
        if not name.endswith(".onnx"):
            name = "model.onnx"
        path = os.path.join(version_dir, name)
        if os.path.isdir(path):  # external-data layout: a folder named model.onnx
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{args['model_name']}: no ONNX graph at {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Triton's onnxruntime backend reads intra_op_thread_count; intra_op_threads is this file's older name.
        threads = int(_param(config, "intra_op_thread_count", _param(config, "intra_op_threads", 0)))
        if threads:
            options.intra_op_num_threads = threads
        # ONNX Runtime's CPU optimiser crashes on FP16 ViT graphs (docs/engines.md), so FP16
        # repositories turn it off: the `python` runtime with parameter optimize=false, the
        # `onnxruntime` runtime with optimization.graph.level 2 (ORT_DISABLE_ALL in Triton's
        # onnxruntime backend, which this file stands in for on the embedded server).
        level = config.get("optimization", {}).get("graph", {}).get("level")
        if _param(config, "optimize", "true").lower() == "false" or str(level) == "2":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        # "low,high": integer inputs must lie in [low, high) (token ids inside the vocabulary), float
        # inputs in [low, high] (pixels a normalised image can have, with a margin): huge finite
        # pixels overflow float32 inside LayerNorm and would come back as a NaN embedding.
        bounds = _param(config, "valid_range")
        self.valid_range = tuple(float(b) for b in bounds.split(",")) if bounds else None
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def _check(self, array):
        """Refuse what would make the runtime fault or return garbage, before it runs."""
        if array.size == 0:
            raise _RequestError(f"{self.input}: empty tensor {list(array.shape)}")
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)):
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                raise _RequestError(f"{self.input}: {bad} non-finite value(s) (NaN or inf); pixels must be finite")
            if self.valid_range is not None:
                low, high = self.valid_range
                lo, hi = float(array.min()), float(array.max())
                if lo < low or hi > high:
                    raise _RequestError(
                        f"{self.input}: value {lo if lo < low else hi:.4g} outside [{low:g}, {high:g}], "
                        "the range of normalised pixels (mean/std of the model's preprocessing)"
                    )
        elif array.dtype.kind in "iu" and self.valid_range is not None:
            low, high = (int(b) for b in self.valid_range)
            lo, hi = int(array.min()), int(array.max())
            if lo < low or hi >= high:
                worst = lo if lo < low else hi
                raise _RequestError(f"{self.input}: token id {worst} outside the vocabulary [{low}, {high})")

    def _run(self, batch):
        outs = self.session.run(self.outputs, {self.input: batch})
        for name, out in zip(self.outputs, outs, strict=True):
            if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
                # Finite inputs gave a non-finite output: the model's fault (e.g. FP16 overflow).
                raise FloatingPointError(f"output {name} has non-finite values")
        return outs

    def _respond(self, outs, start, stop):
        tensors = [
            pb_utils.Tensor(n, np.ascontiguousarray(o[start:stop])) for n, o in zip(self.outputs, outs, strict=True)
        ]
        return pb_utils.InferenceResponse(tensors)

    def _failed(self, exc):
        return pb_utils.InferenceResponse(error=_error(f"ONNX Runtime failed: {type(exc).__name__}: {exc}"))

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (request index, array)
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            try:
                if tensor is None:
                    raise _RequestError(f"missing input {self.input!r}")
                array = tensor.as_numpy()
                self._check(array)
            except _RequestError as exc:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(exc), self.invalid_arg))
                continue
            good.append((i, array))
        if not good:
            return responses
        try:
            # Dynamic batching hands several requests at once: one session run for all of them.
            outs = self._run(np.concatenate([a for _, a in good], axis=0))
        except Exception:  # noqa: BLE001 - find the guilty request: rerun each alone
            for i, array in good:
                try:
                    responses[i] = self._respond(self._run(array), 0, len(array))
                except Exception as exc:  # noqa: BLE001 - this request's failure only
                    responses[i] = self._failed(exc)
            return responses
        start = 0
        for i, array in good:
            responses[i] = self._respond(outs, start, start + len(array))
            start += len(array)
        return responses
