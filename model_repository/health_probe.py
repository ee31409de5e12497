#!/usr/bin/env python3
"""End-to-end health of a clip-triton repository: one tiny inference through each ensemble.

Triton's own /v2/health/ready stays 200 while a dead python stub fails every request (docs/limits.md,
"Dead python stubs"), so the generated Kubernetes probes run this instead (docs/deploy.md). It sends a
short text to `<prefix>_text`, an 8x8 PNG to `<prefix>_image` and a black crop to `<prefix>_image_pixels`
over Triton's HTTP front on loopback (never exposed outside the pod), and checks each answer is a finite,
L2-normalised embedding. Exit 0: healthy; 1: unhealthy, with one line on stderr saying why.

Python standard library only: it runs with the container's own python3, beside tritonserver.
"""

from __future__ import annotations

# Copied standalone into every repository, so it cannot import clip_triton: the model, tensor and type
# names it sends are spelled here. Their owner is clients/contract.py; tests/test_contract.py checks that
# they agree.
import argparse
import json
import math
import struct
import sys
import urllib.error
import urllib.request
import zlib


def _png(width: int = 8, height: int = 8) -> bytes:
    """A valid RGB PNG of a grey gradient, built by hand (no Pillow in this process)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(
        b"\x00" + bytes((16 * x + 8 * y) % 256 for x in range(width) for _ in range(3)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Unhealthy(Exception):
    pass


def _call(base: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float) -> bytes:
    request = urllib.request.Request(base + path, data=body, method="POST" if body is not None else "GET")
    for key, value in headers.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise Unhealthy(f"{path}: HTTP {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise Unhealthy(f"{path}: {type(exc).__name__}: {exc}") from None


def _infer(base: str, model: str, name: str, datatype: str, shape: list[int], raw: bytes, timeout: float) -> None:
    """One request with a binary input (Triton's binary tensor extension); checks the embedding."""
    header = json.dumps(
        {
            "inputs": [
                {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": False}}],
        }
    ).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    answer = json.loads(_call(base, f"/v2/models/{model}/infer", header + raw, headers, timeout))
    outputs = {o.get("name"): o for o in answer.get("outputs", [])}
    values = outputs.get("embedding", {}).get("data") or []
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise Unhealthy(f"{model}: no finite embedding in the answer")
    norm = math.sqrt(sum(v * v for v in values))
    if abs(norm - 1.0) > 1e-2:
        raise Unhealthy(f"{model}: embedding norm {norm:.4f}, not 1")


def _pixels_shape(base: str, model: str, timeout: float) -> list[int]:
    config = json.loads(_call(base, f"/v2/models/{model}/config", None, {}, timeout))
    dims = [int(d) for d in config["input"][0]["dims"]]
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise Unhealthy(f"{model}: unexpected input dims {dims}")
    return dims


def probe(url: str, prefix: str, timeout: float, ready_only: bool = False) -> None:
    base = url if url.startswith("http") else f"http://{url}"
    _call(base, "/v2/health/ready", None, {}, timeout)
    if ready_only:
        return
    text = b"a photo"
    _infer(base, f"{prefix}_text", "text", "BYTES", [1, 1], struct.pack("<I", len(text)) + text, timeout)
    png = _png()
    _infer(base, f"{prefix}_image", "image", "BYTES", [1, 1], struct.pack("<I", len(png)) + png, timeout)
    h, w, c = _pixels_shape(base, f"{prefix}_image_pixels", timeout)
    _infer(base, f"{prefix}_image_pixels", "pixels", "UINT8", [1, h, w, c], bytes(h * w * c), timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP front (loopback in the pod)")
    parser.add_argument("--prefix", default="clip", help="the repository's model name prefix")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--ready-only", action="store_true", help="only /v2/health/ready (the startup probe)")
    args = parser.parse_args(argv)
    try:
        probe(args.url, args.prefix, args.timeout, args.ready_only)
    except Unhealthy as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
