"""Triton python model: encoded image bytes (TYPE_STRING [1]) -> FP32 [3, H, W], as open_clip preprocesses.

Configuration comes from the model config's parameters (written from the manifest by
`clip-triton repository`): `preprocess` (JSON of the manifest's preprocess section),
`output_name`, `threads`, and the per-item limits `max_bytes`, `max_pixels`, `max_aspect_ratio`,
`max_resized_pixels`, and the per-request time budget `max_request_seconds` (docs/limits.md).
numpy + PIL only: no torch in the server.

Throughput: the items of every request in a dynamic batch are decoded and resized on a thread
pool (PIL releases the GIL while decoding and resampling), so one instance uses several cores
(docs/serving.md). `threads` 0 means the cores this process may run on, divided among the instances.

A bad image is the client's fault: its request alone fails, with INVALID_ARGUMENT. Anything else
that goes wrong is INTERNAL, so a client never reports a server fault as "your image is bad".
A request whose items are still being processed `max_request_seconds` after its first item started
fails (INTERNAL, the message says so): its remaining items are skipped, not decoded, so it cannot
hold the instance's threads much longer than that (items already in progress finish).
"""

# Copied standalone into every repository, so it cannot import clip_triton: the names it reads (config parameters)
# are spelled here. Their owner is clients/contract.py; tests/test_contract.py checks that they agree.
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bundled_deps import use_bundled_deps  # noqa: E402

use_bundled_deps(HERE)  # Pillow, when the repository carries its wheels (docs/deploy.md)
from clip_preprocess import ImageInputError, ImageLimits, Preprocessor  # noqa: E402
from request_budget import over_budget, read_budget  # noqa: E402


def _parameters(config):
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _thread_count(requested, instances):
    """`threads` > 0 as given; 0: this process's cores shared among the model's instances."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, instances))


class _Skipped:
    """An item not processed: its request had run past max_request_seconds (the time it stopped at)."""

    def __init__(self, elapsed):
        self.elapsed = elapsed


class _RequestFailed(Exception):
    """One request's failure (a value, never raised): the error to send and its code (None: INTERNAL)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.preprocess = Preprocessor.from_config(json.loads(params["preprocess"]))
        self.input_name = config["input"][0]["name"]
        self.output_name = params.get("output_name") or config["output"][0]["name"]
        self.limits = ImageLimits.from_parameters(params)
        self.max_request_seconds = read_budget(params.get("max_request_seconds"))
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        self.threads = _thread_count(int(params.get("threads") or 0), instances)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clip-preprocess") if self.threads > 1 else None
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def _items(self, request):
        """The request's encoded images, or the _RequestFailed to answer it with."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            return _RequestFailed(f"missing input {self.input_name!r}", self.invalid_arg)
        return [data if isinstance(data, bytes) else bytes(data) for data in tensor.as_numpy().reshape(-1)]

    def _one_item(self, job):
        """Pixels, the exception for this item (answered later, in its own request's response), or _Skipped.

        `job`: (its request's clock, the encoded bytes). The clock starts when the request's first item
        starts; an item starting after its request's budget is spent is skipped. The pool takes items in
        order, so a request's items start together and the next request's clock starts when they are done.
        """
        clock, data = job
        now = time.monotonic()
        start = clock.setdefault("start", now)  # atomic: the first of the request's items to start sets it
        if self.max_request_seconds and now - start > self.max_request_seconds:
            return _Skipped(now - start)
        try:
            return self.preprocess.from_bytes(data, self.limits)
        except Exception as exc:  # noqa: BLE001 - sorted out per request in execute()
            # Keep the error, never its traceback: its frames hold the payload (up to max_bytes, or a
            # 300 MB hostile one), and an error kept with its frames kept every such payload alive.
            return exc.with_traceback(None)

    def _request_pixels(self, results):
        """One request's pixels [N, 3, H, W], or the _RequestFailed naming its first bad item."""
        out = np.empty((len(results), 3, *self.preprocess.size), dtype=np.float32)
        for i, result in enumerate(results):
            if isinstance(result, _Skipped):
                done = sum(not isinstance(r, _Skipped) for r in results)
                return _RequestFailed(
                    over_budget(
                        self.input_name, result.elapsed, self.max_request_seconds, done, len(results), "preprocessed"
                    )
                )
            if isinstance(result, ImageInputError):
                where = f"item {i}: " if len(results) > 1 else ""
                return _RequestFailed(f"{self.input_name}: {where}{result}", self.invalid_arg)
            if isinstance(result, Exception):
                return _RequestFailed(f"{self.input_name}: preprocessing failed: {type(result).__name__}: {result}")
            out[i] = result
        return out

    def _error(self, failure):
        # A fresh error object per response: the backend frees it with the response.
        message = str(failure)
        return pb_utils.TritonError(message) if failure.code is None else pb_utils.TritonError(message, failure.code)

    def _read(self, request):
        try:
            return self._items(request)
        except Exception as exc:  # noqa: BLE001 - a server-side fault, still only this request's
            return _RequestFailed(f"{self.input_name}: reading the request failed: {exc}")

    def execute(self, requests):
        # Every item of every request in this batch goes to the pool at once; responses are then
        # assembled request by request, so a bad image fails its own request, never the batch.
        # Failures are passed as values, not raised: no traceback outlives this call holding payloads.
        # Each request has its own time budget (max_request_seconds), on a clock its first item starts.
        per_request = [self._read(request) for request in requests]
        flat = []
        for items in per_request:
            if isinstance(items, list):
                clock = {}  # this request's: "start" is set by its first item to start
                flat.extend((clock, data) for data in items)
        results = list(self.pool.map(self._one_item, flat)) if self.pool else [self._one_item(d) for d in flat]
        responses, start = [], 0
        for items in per_request:
            if isinstance(items, list):
                items, start = self._request_pixels(results[start : start + len(items)]), start + len(items)
            if isinstance(items, _RequestFailed):
                responses.append(pb_utils.InferenceResponse(error=self._error(items)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, items)]))
        return responses

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
