"""ONNX Runtime inside Triton's python backend (the `python` runtime, CPU).

Also installed by the embedded server as a python-based backend named `onnxruntime`
(`<backend-directory>/onnxruntime/model.py`), so an unchanged `backend: "onnxruntime"` model runs
where the real onnxruntime backend library is absent. Finds `<version>/model.onnx` (a file, or
a folder holding model.onnx and its external data) and batches all requests into one run.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


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
        threads = int(_param(config, "intra_op_threads", 0))
        if threads:
            options.intra_op_num_threads = threads
        if _param(config, "optimize", "true").lower() == "false" or ".fp16" in os.path.realpath(path):
            # ONNX Runtime's CPU optimiser crashes on FP16 ViT graphs (see ARCHITECTURE.md).
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        arrays, sizes, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            if tensor is None:
                err = pb_utils.TritonError(f"missing input {self.input!r}")
                responses[i] = pb_utils.InferenceResponse(error=err)
                continue
            arrays.append(tensor.as_numpy())
            sizes.append(i)
        if arrays:
            try:
                # Dynamic batching hands several requests at once: one session run for all of them.
                batch = np.concatenate(arrays, axis=0)
                outs = self.session.run(self.outputs, {self.input: batch})
            except Exception as exc:  # noqa: BLE001
                err = pb_utils.TritonError(f"ONNX Runtime failed: {type(exc).__name__}: {exc}")
                for i in sizes:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            start = 0
            for i, array in zip(sizes, arrays, strict=True):
                stop = start + len(array)
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(o[start:stop]))
                    for n, o in zip(self.outputs, outs, strict=True)
                ]
                responses[i] = pb_utils.InferenceResponse(tensors)
                start = stop
        return responses
