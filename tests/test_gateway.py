"""`clip-triton gateway` with real parts: the openai SDK (sync and async) and raw HTTP against the gateway
process (started with torch and the exporter blocked from import), against the real embedded tritonserver.
Embeddings must equal the gRPC client's; every refusal has OpenAI's error shape and its status; the
server stays ready and serving the same answers after the hostile ones. docs/gateway.md."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clip_triton.clients import ClipClient
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.base.server import TritonServer, free_port
from helpers import tiny_images

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-0123456789"
MiB = 2**20
# The gateway process may import neither torch nor the exporter: it runs from the client library alone.
LAUNCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['clip_triton.exporter'] = None; "
    "sys.argv[0] = 'clip-triton-gateway'; from clip_triton.clients.gateway.cli import main; main()"
)


class Gateway:
    def __init__(self, url: str, tmp: Path, *extra: str) -> None:
        keys = tmp / "keys.txt"
        keys.write_text(f"# test keys\n{KEY}\n")
        cmd = [sys.executable, "-c", LAUNCH, "--url", url, "--port", "0", "--api-keys", str(keys), *extra]
        self.log = tmp / f"gateway-{time.monotonic_ns()}.log"
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._out, text=True,
                                        start_new_session=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, f"gateway did not start: {line!r} {self.log.read_text()}"
        self.base = f"http://127.0.0.1:{found.group(1)}"
        deadline = time.monotonic() + 60
        while httpx.get(self.base + "/health/live").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None, **kw) -> httpx.Response:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(self.base + path, content=data, headers=h, timeout=60, **kw)

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        self._out.close()


@pytest.fixture(scope="module")
def served(served_shapes):
    """The ShapesCLIP-RN-T server: the gateway's promises hold for any served model."""
    return served_shapes[0]


@pytest.fixture(scope="module")
def gateway(served, tmp_path_factory) -> Iterator[Gateway]:
    gw = Gateway(served.grpc_url, tmp_path_factory.mktemp("gateway"), "--max-body-bytes", str(4 * MiB),
                 "--max-image-bytes", str(1 * MiB), "--max-items", "64")
    try:
        yield gw
    finally:
        gw.stop()


def data_url(image: bytes) -> str:
    kind = "jpeg" if image[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


TEXTS = ["a photo of a cat", "a red square", "two dogs on a beach at night"]
IMAGES = tiny_images(3, seed=5, size=40)


@pytest.fixture(scope="module")
def reference(served, served_shapes) -> dict[str, np.ndarray]:
    with ClipClient(served.grpc_url) as client:
        return {"texts": client.embed_texts(TEXTS), "images": client.embed_images(IMAGES),
                "model": client.model_info.parameters["model_name"],
                "tokens": _expected_tokens(TEXTS, served_shapes[2])}


def _vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def _same_as_single_requests(answers: list, reference: dict, image_shift: int) -> None:
    """Answer i holds [TEXTS[i % 3], IMAGES[(i + image_shift) % 3]]: each equals the gRPC client's alone."""
    for i, answer in enumerate(answers):
        got = _vectors(answer)
        np.testing.assert_allclose(got[0], reference["texts"][i % 3], atol=1e-6)
        np.testing.assert_allclose(got[1], reference["images"][(i + image_shift) % 3], atol=1e-6)


def _expected_tokens(texts: list[str], export: Path) -> int:
    """The texts' tokens, special ones included, by open_clip's own CLIP tokenizer at the served model's
    context length and cleaning (its export's manifest)."""
    from open_clip.tokenizer import SimpleTokenizer

    cfg = load_manifest(export).tokenizer
    assert cfg.kind == "clip", cfg.kind
    ids = SimpleTokenizer(context_length=cfg.context_length, clean=cfg.clean)(texts).numpy()
    return int(sum(np.flatnonzero(row).max() + 1 for row in ids))


# ------------------------------------------------------------------------------------------- the API


def test_openai_sdk_embeds_texts_images_and_mixed_lists_like_grpc(gateway: Gateway, reference) -> None:
    client = gateway.sdk()
    model = reference["model"]
    assert [m.id for m in client.models.list().data] == [model]
    mixed = [TEXTS[0], data_url(IMAGES[0]), TEXTS[1], data_url(IMAGES[1]), data_url(IMAGES[2]), TEXTS[2]]
    expected = np.stack([reference["texts"][0], reference["images"][0], reference["texts"][1],
                         reference["images"][1], reference["images"][2], reference["texts"][2]])
    for fmt in (None, "float", "base64"):  # None: the SDK's default, which asks for base64 and decodes it
        kwargs = {} if fmt is None else {"encoding_format": fmt}
        got = client.embeddings.create(model=model, input=mixed, **kwargs)
        assert [d.index for d in got.data] == list(range(len(mixed)))
        if fmt == "base64":  # the SDK hands base64 strings back as they came when asked explicitly
            vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in got.data])
        else:
            vectors = _vectors(got)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        assert got.model == model
        assert got.usage.prompt_tokens == got.usage.total_tokens == reference["tokens"]
    single = client.embeddings.create(model=model, input=TEXTS[2], user="someone")
    np.testing.assert_allclose(_vectors(single)[0], reference["texts"][2], atol=1e-6)
    raw = gateway.post("/v1/embeddings", {"model": model, "input": [data_url(IMAGES[0])], "encoding_format": "float",
                                          "dimensions": len(reference["texts"][0])}).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding" and raw["usage"]["prompt_tokens"] == 0


def test_async_sdk_under_bounded_concurrent_load_answers_like_single_requests(gateway: Gateway, reference) -> None:
    model = reference["model"]
    inputs = [[TEXTS[i % 3], data_url(IMAGES[(i + 1) % 3])] for i in range(24)]

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=gateway.base + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(client.embeddings.create(model=model, input=x) for x in inputs))
        finally:
            await client.close()

    _same_as_single_requests(asyncio.run(run()), reference, image_shift=1)


def test_classify_endpoint_matches_the_grpc_client(gateway: Gateway, served, reference) -> None:
    labels = ["cat", "red square", "beach"]
    with ClipClient(served.grpc_url) as client:
        expected = client.classify(IMAGES, labels)
    got = gateway.post("/v1/classify", {"model": reference["model"], "images": [data_url(b) for b in IMAGES],
                                        "labels": labels})
    assert got.status_code == 200, got.text
    probs = np.array([d["probabilities"] for d in got.json()["data"]])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert [d["label"] for d in got.json()["data"]] == [labels[i] for i in expected.argmax(1)]


# ------------------------------------------------------------------------------------- refusals

def _gzip_bomb() -> bytes:
    return gzip.compress(b"[" * (8 * MiB), compresslevel=9)


def _deep(n: int) -> bytes:
    return b'{"model": "m", "input": ' + b"[" * n + b"]" * n + b"}"


def _cases(model: str) -> list[tuple[str, int, bytes | dict, dict, str]]:
    """(name, status, body, extra headers, a word the message must hold)."""
    big_image = b"\x89PNG" + os.urandom(2 * MiB)
    return [
        ("deep JSON", 400, _deep(200_000), {}, "nested deeper"),
        ("gzip bomb", 415, _gzip_bomb(), {"Content-Encoding": "gzip"}, "content-encoding"),
        ("body over the limit", 413, {"model": model, "input": ["x" * (5 * MiB)]}, {}, "over the limit"),
        ("huge data URL", 400, {"model": model, "input": ["ok", data_url(big_image)]}, {}, "input[1]"),
        ("integer overflow", 400, b'{"model": "%s", "input": "x", "dimensions": %s}' % (model.encode(), b"9" * 5000),
         {}, "characters"),
        ("float overflow", 400, b'{"model": "%s", "input": "x", "dimensions": 1e999}' % model.encode(), {}, "range"),
        ("NaN", 400, b'{"model": "%s", "input": "x", "dimensions": NaN}' % model.encode(), {}, "NaN"),
        ("not JSON", 400, b"model=x&input=y", {}, "not valid JSON"),
        ("not UTF-8", 400, b'{"model": "\xff\xfe"}', {}, "UTF-8"),
        ("wrong content type", 415, b"{}", {"Content-Type": "text/plain"}, "content-type"),
        ("not an object", 400, b"[1, 2]", {}, "JSON object"),
        ("no model", 400, {"input": "x"}, {}, "model is required"),
        ("unknown model", 404, {"model": "gpt-4", "input": "x"}, {}, "does not exist"),
        ("no input", 400, {"model": model}, {}, "input is required"),
        ("empty input", 400, {"model": model, "input": []}, {}, "must not be empty"),
        ("empty string", 400, {"model": model, "input": ["a", ""]}, {}, "input[1]"),
        ("too many items", 400, {"model": model, "input": ["x"] * 65}, {}, "at most 64"),
        ("token ids", 400, {"model": model, "input": [[49406, 320, 49407]]}, {}, "token-id"),
        ("one token list", 400, {"model": model, "input": [1, 2, 3]}, {}, "token-id"),
        ("remote URL (SSRF)", 400, {"model": model, "input": ["http://169.254.169.254/latest/meta-data"]}, {},
         "not fetched"),
        ("bad base64", 400, {"model": model, "input": ["a", "b", "data:image/png;base64,@@@@"]}, {}, "input[2]"),
        ("not an image", 400, {"model": model, "input": ["a", data_url(b"\x89PNG not really")]}, {}, "input[1]"),
        ("non-image data URL", 400, {"model": model, "input": ["data:text/plain;base64,aGk="]}, {}, "data:image"),
        ("bad encoding_format", 400, {"model": model, "input": "x", "encoding_format": "int8"}, {}, "encoding_format"),
        ("dimensions", 400, {"model": model, "input": "x", "dimensions": 64}, {}, "Matryoshka"),
        ("no key", 401, {"model": model, "input": "x"}, {"Authorization": ""}, "API key"),
        ("wrong key", 401, {"model": model, "input": "x"}, {"Authorization": "Bearer " + "x" * len(KEY)}, "API key"),
    ]


def test_every_refusal_has_its_status_and_the_server_stays_ready(gateway: Gateway, reference) -> None:
    model = reference["model"]
    for name, status, body, headers, word in _cases(model):
        started = time.monotonic()
        got = gateway.post("/v1/embeddings", body, headers)
        assert got.status_code == status, f"{name}: {got.status_code} {got.text[:300]}"
        error = got.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert word.lower() in error["message"].lower(), f"{name}: {error['message']}"
        assert "\n" not in error["message"] and len(error["message"]) < 400, name
        assert time.monotonic() - started < 10, f"{name} took {time.monotonic() - started:.1f}s"
    assert httpx.get(gateway.base + "/health/ready").status_code == 200
    again = gateway.sdk().embeddings.create(model=model, input=[TEXTS[0], data_url(IMAGES[0])])
    np.testing.assert_allclose(_vectors(again), np.stack([reference["texts"][0], reference["images"][0]]), atol=1e-6)
    for path, method, status in (("/v2/repository/index", "POST", 404), ("/v1/embeddings", "GET", 405)):
        got = httpx.request(method, gateway.base + path)
        assert got.status_code == status and "error" in got.json()
    metrics = httpx.get(gateway.base + "/metrics").text
    for status in ("400", "401", "404", "413", "415"):
        assert f'clip_gateway_requests_total{{route="embeddings",status="{status}"}}' in metrics
    assert 'clip_gateway_items_total{kind="image"}' in metrics and "clip_gateway_request_seconds_bucket" in metrics


def test_a_chunked_body_is_cut_at_the_limit(gateway: Gateway) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "input": ["'
        for _ in range(8):
            yield b"x" * MiB
        yield b'"]}'

    got = httpx.post(gateway.base + "/v1/embeddings", content=chunks(), timeout=60,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert got.status_code == 413 and "over the limit" in got.json()["error"]["message"]


# ------------------------------------------------------------------------------- limits and replicas

def test_over_the_in_flight_limit_gets_429_never_a_wrong_answer(served, reference, tmp_path) -> None:
    gw = Gateway(served.grpc_url, tmp_path, "--max-in-flight", "1", "--batch-size", "1", "--concurrency", "1")
    release = threading.Event()
    try:
        body = json.dumps({"model": reference["model"],
                           "input": [data_url(b) for b in tiny_images(24, seed=3, size=64)]}).encode()
        results: list[httpx.Response] = []

        def held() -> Iterator[bytes]:
            # The gateway takes its in-flight slot before it reads the body: this request holds the one
            # slot until the others have had their answers, however fast the model is.
            yield body[:1]
            release.wait(60)
            yield body[1:]

        def send(content: bytes | Iterator[bytes]) -> None:
            results.append(gw.post("/v1/embeddings", content))

        holder = threading.Thread(target=send, args=(held(),))
        holder.start()
        deadline = time.monotonic() + 60
        while "\nclip_gateway_in_flight 1.0" not in httpx.get(gw.base + "/metrics").text:
            assert time.monotonic() < deadline and holder.is_alive(), results
            time.sleep(0.02)
        threads = [threading.Thread(target=send, args=(body,)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        release.set()
        holder.join(120)
        send(body)  # the slot is free again
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429, 429, 429, 429, 429], codes
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        refused = next(r for r in results if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and "in flight" in refused.json()["error"]["message"]
        answers = [np.array([d["embedding"] for d in r.json()["data"]]) for r in results if r.status_code == 200]
        for a in answers[1:]:
            np.testing.assert_allclose(a, answers[0], atol=1e-6)
    finally:
        release.set()
        gw.stop()


def test_triton_down_is_503_and_not_ready(tmp_path) -> None:
    gw = Gateway(f"127.0.0.1:{free_port()}", tmp_path, "--timeout", "5")
    try:
        ready = httpx.get(gw.base + "/health/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert httpx.get(gw.base + "/health/live").status_code == 200
        got = gw.post("/v1/embeddings", {"model": "x", "input": "x"})
        assert got.status_code == 503 and got.json()["error"]["code"] == "upstream_unavailable"
    finally:
        gw.stop()


def test_a_replica_killed_mid_run_loses_no_request(served, reference, tmp_path) -> None:
    second = TritonServer(served.repository)
    second.start(timeout=300)
    gw = Gateway(f"{served.grpc_url},{second.grpc_url}", tmp_path, "--batch-size", "2")
    try:
        model = reference["model"]
        bodies = [[TEXTS[i % 3], data_url(IMAGES[i % 3])] for i in range(40)]
        done: list[int] = []

        async def run() -> list:
            client = openai.AsyncOpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0)
            sem = asyncio.Semaphore(4)

            async def one(i: int):
                async with sem:
                    answer = await client.embeddings.create(model=model, input=bodies[i])
                    done.append(i)
                    if len(done) == 10:  # a quarter in: the second replica dies without a goodbye
                        assert second.process is not None
                        os.killpg(second.process.pid, signal.SIGKILL)
                    return answer

            try:
                return await asyncio.gather(*(one(i) for i in range(len(bodies))))
            finally:
                await client.close()

        _same_as_single_requests(asyncio.run(run()), reference, image_shift=0)
        assert httpx.get(gw.base + "/health/ready").status_code == 200
    finally:
        gw.stop()
        second.stop()


def test_bad_options_are_one_line_errors(tmp_path) -> None:
    cmd = [sys.executable, "-c", LAUNCH]
    for args, word in ((["--url", "http://x:1"], "no scheme"), (["--api-keys", str(tmp_path / "none")], "cannot read"),
                       (["--host", "example.com"], "ip address"), (["--max-items", "0"], ">= 1")):
        got = subprocess.run(cmd + args, capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and word in got.stderr.lower() and len(got.stderr.strip().splitlines()) == 1, (
            args, got.stderr)


def test_listening_socket_disables_nagle() -> None:
    """uvicorn writes a response's head and body separately: with Nagle on, every kept-alive request waited
    ~40 ms for the client's delayed ACK (measured: 44 ms per /health/live, 0.3 ms with TCP_NODELAY)."""
    import socket

    from clip_triton.clients.gateway.cli import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
