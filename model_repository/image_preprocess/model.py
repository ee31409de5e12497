"""Triton python model: encoded image bytes (TYPE_STRING [1]) -> FP32 [3, H, W], as open_clip preprocesses.

Configuration comes from the model config's parameters (written from the manifest by
`clip-triton repository`): `preprocess` (JSON of the manifest's preprocess section),
`output_name`, and the per-item limits `max_bytes`, `max_pixels`, `max_aspect_ratio`,
`max_resized_pixels` (docs/limits.md). numpy + PIL only: no torch in the server.

A bad image is the client's fault: its request alone fails, with INVALID_ARGUMENT. Anything else
that goes wrong is INTERNAL, so a client never reports a server fault as "your image is bad".
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_preprocess import ImageInputError, ImageLimits, Preprocessor  # noqa: E402


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preprocess = Preprocessor.from_config(json.loads(_param(config, "preprocess")))
        self.input_name = config["input"][0]["name"]
        self.output_name = _param(config, "output_name", config["output"][0]["name"])
        defaults = ImageLimits()
        self.limits = ImageLimits(
            max_bytes=int(_param(config, "max_bytes", defaults.max_bytes)),
            max_pixels=int(_param(config, "max_pixels", defaults.max_pixels)),
            max_aspect_ratio=float(_param(config, "max_aspect_ratio", defaults.max_aspect_ratio)),
            max_resized_pixels=int(_param(config, "max_resized_pixels", defaults.max_resized_pixels)),
        )
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def _one_request(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise ImageInputError(f"missing input {self.input_name!r}")
        items = tensor.as_numpy().reshape(-1)
        out = np.empty((len(items), 3, *self.preprocess.size), dtype=np.float32)
        for i, data in enumerate(items):
            if not isinstance(data, bytes):
                data = bytes(data)
            try:
                out[i] = self.preprocess.from_bytes(data, self.limits)
            except ImageInputError as exc:
                where = f"item {i}: " if len(items) > 1 else ""
                raise ImageInputError(f"{self.input_name}: {where}{exc}") from None
        return out

    def _error(self, message, code=None):
        # A fresh error object per response: the backend frees it with the response.
        return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)

    def execute(self, requests):
        # One response per request: a bad image fails its own request, never the batch.
        responses = []
        for request in requests:
            try:
                pixels = self._one_request(request)
            except ImageInputError as exc:
                responses.append(pb_utils.InferenceResponse(error=self._error(str(exc), self.invalid_arg)))
                continue
            except Exception as exc:  # noqa: BLE001 - a server-side fault, still only this request's
                message = f"{self.input_name}: preprocessing failed: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=self._error(message)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, pixels)]))
        return responses
