"""Triton python model: UTF-8 text (TYPE_STRING [1]) -> token ids [context_length], as open_clip tokenizes.

Parameters (written from the manifest): `tokenizer` (JSON of the manifest's tokenizer section),
`output_name`, `output_dtype` (numpy name; INT32 by default, see the repository README),
`max_chars`, `max_request_seconds` (docs/limits.md). The tokenizer code (clip_tokenizer.py) and its
files sit beside this file.

Bad text (not UTF-8, over max_chars) is the client's fault: INVALID_ARGUMENT; anything else INTERNAL.
A request still tokenizing `max_request_seconds` after it started fails (INTERNAL, the message says
so) and its remaining items are not tokenized: one request cannot hold the instance much longer than
that (the item in progress finishes; one 100,000-character item takes well under a second).
"""

# Copied standalone into every repository, so it cannot import clip_triton: the names it reads (config parameters)
# are spelled here. Their owner is clients/contract.py; tests/test_contract.py checks that they agree.
import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bundled_deps import use_bundled_deps  # noqa: E402

use_bundled_deps(HERE)  # ftfy, regex, tokenizers, when the repository carries their wheels (docs/deploy.md)
from clip_tokenizer import make_tokenizer  # noqa: E402
from request_budget import over_budget, read_budget  # noqa: E402


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class TextInputError(ValueError):
    pass


class RequestOverBudget(Exception):
    """The request ran past max_request_seconds: not the item's fault, so INTERNAL with this message."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        cfg = json.loads(_param(config, "tokenizer"))
        hf_file = os.path.join(HERE, cfg["hf_file"]) if cfg.get("hf_file") else None
        self.tokenizer = make_tokenizer(
            cfg["kind"],
            int(cfg["context_length"]),
            cfg.get("clean", "lower"),
            hf_file,
            bool(cfg.get("strip_sep_token", False)),
            int(cfg.get("pad_id", 0)),
            bpe_path=os.path.join(HERE, "bpe_simple_vocab_16e6.txt.gz"),
            padding_side=cfg.get("padding_side", "right"),
        )
        self.input_name = config["input"][0]["name"]
        self.output_name = _param(config, "output_name", config["output"][0]["name"])
        self.dtype = np.dtype(_param(config, "output_dtype", "int32"))
        self.max_chars = int(_param(config, "max_chars", 100_000))
        self.max_request_seconds = read_budget(_param(config, "max_request_seconds"))
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def _error(self, message, code=None):
        # A fresh error object per response: the backend frees it with the response.
        return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)

    def _texts(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise TextInputError(f"missing input {self.input_name!r}")
        items = tensor.as_numpy().reshape(-1)
        texts = []
        for i, raw in enumerate(items):
            where = f"item {i}: " if len(items) > 1 else ""
            if isinstance(raw, str):
                text = raw
            else:
                try:
                    text = bytes(raw).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise TextInputError(
                        f"{self.input_name}: {where}text is not valid UTF-8 "
                        f"(byte {exc.start}: {bytes(raw)[exc.start : exc.start + 1]!r})"
                    ) from None
            if len(text) > self.max_chars:
                raise TextInputError(
                    f"{self.input_name}: {where}text too long: {len(text)} characters, "
                    f"over the limit of {self.max_chars} (model parameter max_chars)"
                )
            texts.append(text)
        return texts

    def _tokenize(self, texts):
        """Token ids [N, L], item by item, within the request's time budget (RequestOverBudget past it)."""
        budget, start = self.max_request_seconds, time.monotonic()
        rows = []
        for i, text in enumerate(texts):
            elapsed = time.monotonic() - start
            if budget and elapsed > budget:
                raise RequestOverBudget(over_budget(self.input_name, elapsed, budget, i, len(texts), "tokenized"))
            rows.append(self.tokenizer([text]))
        return np.concatenate(rows) if rows else self.tokenizer([])

    def execute(self, requests):
        # Each request is answered on its own: a bad or over-budget one fails alone, the others of the batch
        # are answered. Errors are values (a fresh TritonError per response), never re-raised.
        responses = []
        for request in requests:
            try:
                ids = self._tokenize(self._texts(request)).astype(self.dtype)
            except TextInputError as exc:
                responses.append(pb_utils.InferenceResponse(error=self._error(str(exc), self.invalid_arg)))
                continue
            except RequestOverBudget as exc:
                responses.append(pb_utils.InferenceResponse(error=self._error(str(exc))))
                continue
            except Exception as exc:  # noqa: BLE001 - still only this request's failure
                message = f"{self.input_name}: tokenization failed: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=self._error(message)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, ids)]))
        return responses
