"""Hostile and unlucky input against the real embedded tritonserver (issue: no request can take it down).

Each case asserts the status code a client sees, that good requests batched beside a bad one are
answered correctly, and that the server stays live, ready and serving the same embeddings.
docs/limits.md describes the behaviour tested here.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_repository import _image_bytes

from clip_triton.exporter.base.manifest import Manifest, load_manifest
from clip_triton.exporter.base.server import SHM_TAG, TritonServer, stub_processes

pytestmark = pytest.mark.server

GOOD_IMAGE = _image_bytes("RGB", (320, 240), "JPEG", 7)
GOOD_TEXT = "a photo of a cat"
MiB = 2**20


def _grpc():
    import tritonclient.grpc as grpcclient

    return grpcclient


def _bytes_input(name: str, items: list[bytes]):
    tensor = _grpc().InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    return tensor


def _array_input(name: str, array: np.ndarray):
    tensor = _grpc().InferInput(name, list(array.shape), "INT32" if array.dtype == np.int32 else "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def _call(client, model: str, tensor, **infer_options) -> tuple[str, np.ndarray | str]:
    """('OK', embedding) or (gRPC status name, message). `infer_options`: client.infer's (compression...)."""
    try:
        return "OK", client.infer(model, [tensor], **infer_options).as_numpy("embedding")
    except Exception as exc:  # noqa: BLE001 - InferenceServerException: the status is what we test
        return str(exc.status()).rsplit(".", 1)[-1], exc.message()


def _good_ids(manifest: Manifest, n: int = 1) -> np.ndarray:
    """`a` (id 320 in the CLIP BPE vocabulary) between the start and end tokens, padded to the context length."""
    tok = manifest.tokenizer
    ids = np.full((n, tok.context_length), tok.pad_id, np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = tok.sot_id, 320, tok.eot_id
    return ids


def _assert_healthy(server: TritonServer, client, reference: dict[str, np.ndarray]) -> None:
    assert server.running(), server.log_tail()
    assert client.is_server_live() and client.is_server_ready()
    status, image = _call(client, "clip_image", _bytes_input("image", [GOOD_IMAGE]))
    assert status == "OK", image
    np.testing.assert_allclose(image, reference["image"], atol=1e-6)
    status, text = _call(client, "clip_text", _bytes_input("text", [GOOD_TEXT.encode()]))
    assert status == "OK", text
    np.testing.assert_allclose(text, reference["text"], atol=1e-6)


@pytest.fixture(scope="module")
def manifest(served_shapes) -> Manifest:
    """The served model's facts (context length, vocabulary, image size, embedding width)."""
    return load_manifest(served_shapes[2])


@pytest.fixture(scope="module")
def hostile(served_shapes, manifest: Manifest):
    server, _, _ = served_shapes
    assert manifest.tokenizer.kind == "clip"  # _good_ids' token 320
    client = _grpc().InferenceServerClient(server.grpc_url)
    reference = {
        "image": _call(client, "clip_image", _bytes_input("image", [GOOD_IMAGE]))[1],
        "text": _call(client, "clip_text", _bytes_input("text", [GOOD_TEXT.encode()]))[1],
        "ids": _call(client, "clip_text_encoder", _array_input("input_ids", _good_ids(manifest)))[1],
    }
    assert all(isinstance(v, np.ndarray) for v in reference.values())
    return server, client, reference


def _concurrently(client, model: str, tensors: list) -> list[tuple[str, object]]:
    """Send every request at once (async gRPC) so dynamic batching puts them in one batch."""
    results: list = [None] * len(tensors)
    done = threading.Semaphore(0)

    def callback(k: int):
        def record(result, error) -> None:
            if error is None:
                results[k] = ("OK", result.as_numpy("embedding"))
            else:
                results[k] = (str(error.status()).rsplit(".", 1)[-1], error.message())
            done.release()

        return record

    for k, tensor in enumerate(tensors):
        client.async_infer(model, [tensor], callback(k))
    for _ in tensors:
        assert done.acquire(timeout=60), "a request got no answer"
    return results


def test_out_of_vocabulary_ids_fail_alone_with_invalid_argument(hostile, manifest: Manifest) -> None:
    server, client, reference = hostile
    refused = f"1000000000 outside the vocabulary [0, {manifest.tokenizer.vocab_size})"
    bad = np.full((1, manifest.tokenizer.context_length), 10**9, np.int32)
    negative = _good_ids(manifest)
    negative[0, 5] = -3
    for _attempt in range(3):
        one, two = _good_ids(manifest), _good_ids(manifest, 2)
        tensors = [_array_input("input_ids", a) for a in (one, bad, one, negative, two)]
        results = _concurrently(client, "clip_text_encoder", tensors)
        assert results[1][0] == "INVALID_ARGUMENT" and refused in results[1][1]
        assert results[3][0] == "INVALID_ARGUMENT" and "-3" in results[3][1]
        for k in (0, 2, 4):
            assert results[k][0] == "OK", results[k]
            np.testing.assert_allclose(results[k][1], np.repeat(reference["ids"], len(results[k][1]), 0), atol=1e-6)
    _assert_healthy(server, client, reference)


def test_non_finite_pixels_are_refused_never_a_nan_embedding(hostile, manifest: Manifest) -> None:
    server, client, reference = hostile
    rng = np.random.default_rng(0)
    good = rng.standard_normal((1, 3, *manifest.image_size)).astype(np.float32)
    tensors = []
    for poison in (np.nan, np.inf, -np.inf):
        bad = good.copy()
        bad[0, 1, 5, 5] = poison
        tensors += [_array_input("pixel_values", good), _array_input("pixel_values", bad)]
    results = _concurrently(client, "clip_image_encoder", tensors)
    first = results[0][1]
    for k in range(0, len(tensors), 2):
        assert results[k][0] == "OK" and np.all(np.isfinite(results[k][1]))
        np.testing.assert_allclose(results[k][1], first, atol=1e-6)
        assert results[k + 1][0] == "INVALID_ARGUMENT" and "non-finite" in results[k + 1][1]
    _assert_healthy(server, client, reference)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_thin_image_is_refused_from_its_header_in_well_under_a_second(hostile, manifest: Manifest) -> None:
    server, client, reference = hostile
    thin = _png(1, 60000)
    assert len(thin) < 400
    start = time.perf_counter()
    status, message = _call(client, "clip_image", _bytes_input("image", [thin]))
    seconds = time.perf_counter() - start
    assert status == "INVALID_ARGUMENT" and "aspect ratio" in message and "max_aspect_ratio" in message
    assert seconds < 1.0, f"took {seconds:.2f}s"
    # Within the aspect limit but still a long resize: 90:1 resizes to S x 90S for the model's S-px side
    # (224 x 20160 = 4.5 MP for a 224-px model), under the 16 MP resize limit: served.
    wide = _png(200, 18000)
    status, message = _call(client, "clip_image", _bytes_input("image", [wide]))
    assert status == "OK", f"{min(manifest.image_size)} px side: {message}"
    _assert_healthy(server, client, reference)


def test_user_errors_are_invalid_argument(hostile) -> None:
    server, client, reference = hostile
    cases = {
        ("clip_image", "image"): [b"\x89PNG\r\n\x1a\n garbage", b"", GOOD_IMAGE[: len(GOOD_IMAGE) // 3]],
        ("clip_text", "text"): [b"\xff\xfe caf\xe9", ("word " * 30000).encode()],
    }
    for (model, name), items in cases.items():
        for item in items:
            status, message = _call(client, model, _bytes_input(name, [item]))
            assert status == "INVALID_ARGUMENT", (item[:20], status, message)
    _assert_healthy(server, client, reference)


def _tree_rss_mib(pid: int) -> int:
    """RSS of tritonserver and its stubs (MiB)."""
    total = 0
    for p in [pid, *stub_processes(pid)]:
        with open(f"/proc/{p}/status") as handle:
            total += next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) // 1024
    return total


def test_oversized_payloads_are_refused_and_memory_returns(hostile, record_property) -> None:
    server, client, reference = hostile
    payload = np.random.default_rng(1).integers(0, 256, 300 * MiB, dtype=np.uint8).tobytes()
    status, message = _call(client, "clip_image", _bytes_input("image", [payload]))
    assert status == "INVALID_ARGUMENT" and "max_bytes" in message
    after_one = _tree_rss_mib(server.process.pid)
    for _ in range(9):
        assert _call(client, "clip_image", _bytes_input("image", [payload]))[0] == "INVALID_ARGUMENT"
    after_ten = _tree_rss_mib(server.process.pid)
    record_property("rss_mib_after_1_and_10_refused_300MB", (after_one, after_ten))
    print(f"tritonserver + stubs RSS after 1 refused 300 MB request: {after_one} MiB, after 10: {after_ten} MiB")
    # Before the fix each request kept ~185 MB in Triton's gRPC object pool: +1.7 GB over the nine
    # later requests. Allocator noise after the fix was +0..190 MiB (shared memory is counted in the
    # server and the stub alike), so the bound is two payloads: it holds memory that returns and
    # still fails a per-request leak.
    assert after_ten - after_one < 2 * 300, (after_one, after_ten)
    _assert_healthy(server, client, reference)


def test_seeded_fuzz_pass(hostile, manifest: Manifest) -> None:
    """A few hundred mutated images and strings, and random tensors straight to each encoder."""
    server, client, reference = hostile
    vocab, context, dim = manifest.tokenizer.vocab_size, manifest.tokenizer.context_length, manifest.embed_dim
    rng = np.random.default_rng(2026)
    seeds = [
        _image_bytes(mode, size, fmt, k)
        for k, (mode, size, fmt) in enumerate(
            [("RGB", (64, 48), "JPEG"), ("RGBA", (40, 30), "PNG"), ("P", (50, 20), "GIF"), ("L", (33, 65), "WEBP"),
             ("RGB", (16, 16), "BMP")]
        )
    ]
    counts = {"OK": 0, "INVALID_ARGUMENT": 0}

    def check(model: str, tensor) -> None:
        status, value = _call(client, model, tensor)
        assert status in counts, (model, status, value)
        counts[status] += 1
        if status == "OK":
            assert isinstance(value, np.ndarray) and value.shape[-1] == dim and np.all(np.isfinite(value))
            np.testing.assert_allclose(np.linalg.norm(value, axis=-1), 1.0, atol=1e-3)

    for k in range(200):
        data = bytearray(seeds[k % len(seeds)])
        kind = k % 4
        if kind == 0:  # flip bytes anywhere (header included)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # splice random bytes in
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:  # pure noise
            data = bytearray(rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes())
        check("clip_image", _bytes_input("image", [bytes(data)]))
    alphabet = ["a", " ", "é", "東", "\x00", "\ud7ff", "😀", "\u202e", "<|endoftext|>", "\n"]
    for k in range(150):
        if k % 3 == 0:
            raw = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        else:
            raw = "".join(rng.choice(alphabet, int(rng.integers(0, 300)))).encode("utf-8", "surrogatepass")
        check("clip_text", _bytes_input("text", [raw]))
    for k in range(40):
        ids = rng.integers(-5, vocab + 5 if k % 2 else vocab, (int(rng.integers(1, 4)), context)).astype(np.int32)
        check("clip_text_encoder", _array_input("input_ids", ids))
        pixels = rng.standard_normal((int(rng.integers(1, 3)), 3, *manifest.image_size)).astype(np.float32)
        pixels *= float(10.0 ** rng.integers(-3, 30))
        if k % 3 == 0:
            pixels.reshape(-1)[rng.integers(0, pixels.size)] = np.nan
        check("clip_image_encoder", _array_input("pixel_values", pixels))
    assert counts["OK"] > 50 and counts["INVALID_ARGUMENT"] > 50, counts
    _assert_healthy(server, client, reference)


# -- dead stubs, a killed server, leftovers -------------------------------------------------------


@pytest.fixture()
def own_server(served_shapes, tmp_path: Path):
    """A server of our own (these tests kill its processes); not supervised until a test says so."""
    _, repo, _ = served_shapes
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log").start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


def _stub_of(server: TritonServer, model: str) -> int:
    return next(pid for pid, name in stub_processes(server.process.pid).items() if name == model)


def test_dead_stub_is_a_server_fault_then_reloaded(own_server: TritonServer) -> None:
    from clip_triton.clients import ClipClient, ItemError, ServerFaultError

    server = own_server
    with ClipClient(server.grpc_url, retries=0) as client:
        before = client.embed_images([GOOD_IMAGE])
        os.kill(_stub_of(server, "clip_image_preprocess"), signal.SIGKILL)
        time.sleep(0.5)
        # Triton 2.51 answers INTERNAL ("Stub process ... is not healthy") and still says READY:
        # the client must not blame the image.
        with pytest.raises(ServerFaultError) as err:
            client.embed_images([GOOD_IMAGE])
        assert not isinstance(err.value, ItemError) and "not a problem with the item" in str(err.value)
        # One supervisor tick: unload (readiness false meanwhile), load, serving again.
        assert server.check_stubs() == ["clip_image_preprocess"]
        np.testing.assert_allclose(client.embed_images([GOOD_IMAGE]), before, atol=1e-6)

        # The supervisor thread does the same on its own, within a bounded time.
        server.supervise_interval = 0.5
        server._start_supervisor()
        os.kill(_stub_of(server, "clip_text_tokenize"), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(r["model"] == "clip_text_tokenize" for r in server.restarts):
                try:
                    client.embed_texts([GOOD_TEXT])
                    break
                except Exception:  # noqa: BLE001 - still reloading
                    pass
            time.sleep(0.25)
        else:
            pytest.fail(f"clip_text_tokenize was not reloaded within 60s: {server.restarts}")
        assert all(r["status"] == 200 for r in server.restarts), server.restarts
        assert all(r["seconds"] < 30 for r in server.restarts), server.restarts

    # The stub that died holding a request never lets Triton finish unloading (it waits out its 30 s exit
    # timeout); once the drain is done the stop gives it UNLOAD_GRACE, not the whole grace (was 15 s here).
    from clip_triton.exporter.base.server import UNLOAD_GRACE

    pid, start = server.process.pid, time.monotonic()
    server.stop()
    assert time.monotonic() - start < UNLOAD_GRACE + 5, "the stop waited out the grace"
    assert not stub_processes(pid) and not any(Path("/dev/shm").glob(f"{server._shm_prefix}*"))


def test_killed_server_leaves_no_stubs_or_shared_memory(own_server: TritonServer) -> None:
    server = own_server
    pid = server.process.pid
    stubs = list(stub_processes(pid))
    prefix = server._shm_prefix
    assert stubs and list(Path("/dev/shm").glob(f"{prefix}*"))
    os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in stubs):
        time.sleep(0.1)
    alive = [p for p in stubs if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]
    assert not alive, f"stubs left behind: {alive}"
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))


def test_stale_shared_memory_of_a_dead_launcher_is_removed_at_start(served_shapes, tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Path("/dev/shm") / f"{SHM_TAG}{int(dead.stdout)}xdeadbeef_region"
    stale.write_bytes(b"\0" * 4096)
    mine = Path("/dev/shm") / f"{SHM_TAG}{os.getpid()}xfeedface_region"  # a live launcher's: kept
    mine.write_bytes(b"\0")
    try:
        _, repo, _ = served_shapes
        with TritonServer(repo, log_path=tmp_path / "log", models=["clip_text_tokenize"]):
            assert not stale.exists()
            assert mine.exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
