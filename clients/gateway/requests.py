"""What the gateway accepts: the guards that run before parsing (body size, encoding, JSON depth, number
size) and the checks of an OpenAI embeddings or a classification request, each failure a `Problem` that
becomes OpenAI's error shape with its status (docs/gateway.md, "Limits").

Nothing here touches the network: images arrive as `data:image/<fmt>;base64,...` URLs only. A remote
`http(s)://` URL is refused, never fetched (a server-side fetch is an SSRF hole).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """Per-request limits, checked in this order: body bytes (before reading it all), JSON depth and number
    length (before parsing), items, then per-item bytes and characters."""

    max_body_bytes: int = 64 * MiB
    max_json_depth: int = 8  # an embeddings body nests 2 deep ({"input": [...]})
    max_number_digits: int = 32
    max_items: int = 256
    max_image_bytes: int = 16 * MiB  # decoded; the served model's own max_bytes applies too (the lower wins)
    max_text_chars: int = 100_000  # the served tokenizer's max_chars applies too (the lower wins)
    max_labels: int = 1000  # /v1/classify
    max_templates: int = 64


class Problem(Exception):
    """A request the gateway refuses: HTTP status, OpenAI error type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}


# ------------------------------------------------------------------------------------------ the body

def check_headers(content_type: str | None, content_encoding: str | None, content_length: str | None,
                  limits: Limits) -> None:
    """Before the body is read: only identity-encoded JSON, and a declared length within the limit.
    Compressed bodies are refused outright (415): nothing is ever inflated, so no gzip bomb can expand."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Problem(415, f"Content-Encoding {encoding!r} is not accepted; send the JSON body uncompressed")
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise Problem(415, f"Content-Type must be application/json, got {media!r}")
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise Problem(400, f"Content-Length {content_length[:40]!r} is not a number")
        if int(content_length) > limits.max_body_bytes:
            raise Problem(413, f"request body of {int(content_length)} bytes is over the limit of "
                               f"{limits.max_body_bytes} bytes")


def too_large(limits: Limits) -> Problem:
    return Problem(413, f"request body is over the limit of {limits.max_body_bytes} bytes")


# Strings (with their escapes) or a bracket: a bracket inside a string is not nesting.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
# A JSON number with more digits than any real request needs (integer overflow probes, 1e999999).
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def check_depth(body: bytes, limit: int) -> None:
    """Refuse nesting deeper than `limit` before json.loads sees it (deep JSON costs the parser recursion)."""
    if body.count(b"[") + body.count(b"{") <= limit:  # the common case: no scan needed
        return
    depth = 0
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise Problem(400, f"JSON nested deeper than {limit} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def parse_json(body: bytes, limits: Limits) -> Any:
    """The body as JSON, after the depth guard; numbers longer than max_number_digits, NaN and Infinity are
    refused (400), as is anything that is not UTF-8 JSON."""
    if not body.strip():
        raise Problem(400, "request body is empty; send a JSON object")
    check_depth(body, limits.max_json_depth)

    def number(text: str) -> int | float:
        if len(text) > limits.max_number_digits:
            raise Problem(400, f"number {text[:20]}... has more than {limits.max_number_digits} characters")
        value = float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            raise Problem(400, f"number {text} is out of range")
        return value

    def constant(name: str) -> Any:
        raise Problem(400, f"{name} is not valid JSON")

    try:
        return json.loads(body, parse_int=number, parse_float=number, parse_constant=constant)
    except Problem:
        raise
    except UnicodeDecodeError:
        raise Problem(400, "request body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise Problem(400, f"request body is not valid JSON: {str(exc)[:120]}") from None


# ---------------------------------------------------------------------------------------- the items

_DATA_URL = re.compile(r"data:image/([A-Za-z0-9.+-]{1,32});base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    """One input: its position in the request, "text" or "image", and the text or the image's bytes."""

    index: int
    kind: str
    value: str | bytes


def _label(index: int, param: str) -> str:
    return f"{param}[{index}]"


def parse_item(index: int, raw: Any, limits: Limits, param: str = "input") -> Item:
    where = _label(index, param)
    if isinstance(raw, bool) or isinstance(raw, int | float) or (
        isinstance(raw, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    ):
        raise Problem(400, f"{where}: token-id inputs are not accepted; send the text (the served tokenizer "
                           "makes the ids)", param=param)
    if not isinstance(raw, str):
        raise Problem(400, f"{where}: expected a string (a text, or an image as a data:image/<fmt>;base64 URL), "
                           f"got {type(raw).__name__}", param=param)
    if raw.startswith("data:"):
        return Item(index, "image", decode_data_url(where, raw, limits, param))
    lowered = raw[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise Problem(400, f"{where}: remote image URLs are not fetched (the gateway makes no outbound "
                           "requests); send the image as a data:image/<fmt>;base64 URL", param=param)
    if not raw:
        raise Problem(400, f"{where}: empty string", param=param)
    if len(raw) > limits.max_text_chars:
        raise Problem(400, f"{where}: text of {len(raw)} characters is over the limit of {limits.max_text_chars}",
                      param=param)
    return Item(index, "text", raw)


def decode_data_url(where: str, raw: str, limits: Limits, param: str = "input") -> bytes:
    match = _DATA_URL.match(raw)
    if match is None:
        raise Problem(400, f"{where}: a data URL must be data:image/<format>;base64,<data>", param=param)
    payload = raw[match.end():]
    # Measured before decoding: base64 holds 3 bytes per 4 characters.
    if len(payload) // 4 * 3 > limits.max_image_bytes:
        raise Problem(400, f"{where}: image of about {len(payload) // 4 * 3} bytes is over the limit of "
                           f"{limits.max_image_bytes} bytes", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, f"{where}: the data URL's payload is not valid base64", param=param) from None
    if not data:
        raise Problem(400, f"{where}: the data URL holds no image bytes", param=param)
    return data


def parse_items(raw: Any, limits: Limits, param: str = "input") -> list[Item]:
    if isinstance(raw, str):
        raw = [raw]
    if raw is None:
        raise Problem(400, f"{param} is required", param=param)
    if not isinstance(raw, list):
        raise Problem(400, f"{param} must be a string or a list of strings", param=param)
    if not raw:
        raise Problem(400, f"{param} must not be empty", param=param)
    if len(raw) > limits.max_items:
        raise Problem(400, f"{param} has {len(raw)} items; at most {limits.max_items} per request", param=param)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):  # one tokenised input: [1, 2, 3]
        raise Problem(400, f"{param}: token-id inputs are not accepted; send the text", param=param)
    return [parse_item(i, x, limits, param) for i, x in enumerate(raw)]


# ---------------------------------------------------------------------------------------- requests

ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    items: list[Item]
    encoding_format: str


@dataclass(frozen=True)
class ClassifyRequest:
    model: str
    images: list[Item]
    labels: list[str]
    templates: list[str] | None


def _object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise Problem(400, "request body must be a JSON object")
    return doc


def check_model(doc: dict[str, Any], served: str) -> str:
    model = doc.get("model")
    if model is None:
        raise Problem(400, "model is required (GET /v1/models lists it)", param="model")
    if not isinstance(model, str):
        raise Problem(400, "model must be a string", param="model")
    if model != served:
        raise Problem(404, f"The model `{model[:200]}` does not exist (this gateway serves `{served}`)",
                      param="model", code="model_not_found")
    return model


def parse_embeddings(doc: Any, served: str, dim: int, limits: Limits) -> EmbeddingsRequest:
    doc = _object(doc)
    model = check_model(doc, served)
    encoding = doc.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODING_FORMATS:
        raise Problem(400, f"encoding_format must be 'float' or 'base64', got {str(encoding)[:40]!r}",
                      param="encoding_format")
    dimensions = doc.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int):
            raise Problem(400, "dimensions must be an integer", param="dimensions")
        if dimensions != dim:
            raise Problem(400, f"dimensions={dimensions} is not offered: {served} embeddings have {dim} "
                               "dimensions and cannot be shortened (CLIP is not trained as a Matryoshka model)",
                          param="dimensions")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise Problem(400, "user must be a string", param="user")
    return EmbeddingsRequest(model, parse_items(doc.get("input"), limits), encoding)


def _strings(doc: dict[str, Any], key: str, most: int, required: bool) -> list[str] | None:
    raw = doc.get(key)
    if raw is None and not required:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x.strip() for x in raw):
        raise Problem(400, f"{key} must be a non-empty list of non-empty strings", param=key)
    if len(raw) > most:
        raise Problem(400, f"{key} has {len(raw)} entries; at most {most}", param=key)
    return raw


def parse_classify(doc: Any, served: str, limits: Limits) -> ClassifyRequest:
    doc = _object(doc)
    model = check_model(doc, served)
    images = parse_items(doc.get("images"), limits, "images")
    for item in images:
        if item.kind != "image":
            raise Problem(400, f"images[{item.index}]: expected a data:image/<fmt>;base64 URL", param="images")
    labels = _strings(doc, "labels", limits.max_labels, True)
    templates = _strings(doc, "templates", limits.max_templates, False)
    if templates is not None:
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise Problem(400, f"templates must each hold one '{{}}' (where the label goes): {bad[0][:80]!r}",
                          param="templates")
    assert labels is not None
    return ClassifyRequest(model, images, labels, templates)
