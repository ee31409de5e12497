"""The gRPC clients and their CLI commands, against the real embedded tritonserver (no mocks)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clip_triton.clients import (
    AsyncClipClient,
    ClientOptions,
    ClipClient,
    ClipClientError,
    InvalidItemError,
    ItemError,
    ModelNotFoundError,
    ServerUnavailableError,
    _core,
)
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.cli import app

server = pytest.mark.server
CLI = [str(Path(sys.executable).with_name("clip-triton"))]
CORRUPT = b"\x89PNG\r\n\x1a\n this is not really a png"


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _arrays(n: int, seed: int = 0, size: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def served(served_shapes):
    """The ShapesCLIP-RN-T server: every promise here holds for any served model (the facts a test needs,
    such as the embedding size, come from its export's manifest)."""
    srv, repo, export = served_shapes
    return srv.grpc_url, repo, export


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six small RGB images of different sizes and content, as PNG and JPEG files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("client_images")
    paths = []
    for i, array in enumerate(_arrays(6, seed=1, size=40)):
        array[:, :, i % 3] = np.linspace(0, 255, array.shape[1], dtype=np.uint8)  # a different colour cast each
        path = folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def corrupt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client_bad") / "broken.png"
    path.write_bytes(CORRUPT)
    return path


@pytest.fixture()
def client(url: str):
    with ClipClient(url, batch_size=4, concurrency=2, timeout=60) as c:
        yield c


def _dead_url() -> str:
    from clip_triton.exporter.base.server import free_port

    return f"127.0.0.1:{free_port()}"


# ------------------------------------------------------------------------------------------------ library


@server
def test_model_info_is_discovered_from_the_server(url: str, served) -> None:
    manifest = load_manifest(served[2])
    with ClipClient(url) as a, ClipClient(url) as b:
        info = a.model_info
        assert (info.image.model, info.text.model) == ("clip_image", "clip_text")
        assert (info.image.input_name, info.text.input_name, info.image.output_name) == ("image", "text", "embedding")
        assert info.dim == info.text.dim == manifest.embed_dim
        assert info.image.max_batch_size > 0
        assert len(info.identity) == 64 and info.identity == b.model_info.identity
        # The repository records the scale (and SigLIP's bias) as ensemble parameters.
        assert info.logit_scale_from_server
        assert info.logit_scale == pytest.approx(manifest.logit_scale, rel=1e-6)
        assert info.logit_bias == manifest.logit_bias


@server
def test_embed_images_accepts_paths_bytes_pil_and_arrays(client: ClipClient, tmp_path: Path) -> None:
    from PIL import Image

    array = _arrays(1, seed=7, size=48)[0]
    path = tmp_path / "one.png"
    Image.fromarray(array).save(path)
    out = client.embed_images([path, str(path), path.read_bytes(), Image.open(path), array])
    assert out.shape == (5, client.model_info.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # PNG is lossless, so every form decodes to the same pixels on the server: the same embedding.
    np.testing.assert_allclose(out, np.repeat(out[:1], 5, axis=0), atol=1e-5)


@server
def test_batched_and_single_requests_agree_and_keep_order(url: str, images: list[Path]) -> None:
    items = [*images, images[0]]  # 7 items: batches of 4 + 3
    with ClipClient(url, batch_size=4, concurrency=3) as batched, ClipClient(url, batch_size=1) as single:
        a = batched.embed_images(items)
        b = single.embed_images(items)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a[0], a[6], atol=1e-6)
    sims = a[:6] @ a[:6].T
    assert np.all(sims[~np.eye(6, dtype=bool)] < 0.99999), "distinct images must not share an embedding"


@server
def test_embed_texts(client: ClipClient) -> None:
    texts = ["a photo of a cat", "a dog", "a photo of a cat", "x" * 300]  # long text: truncated by the tokenizer
    out = client.embed_texts(texts)
    assert out.shape == (4, client.model_info.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    assert float(out[0] @ out[1]) < 0.99999
    assert client.embed_texts([]).shape == (0, client.model_info.dim)


@server
def test_classify_is_prompt_ensembled_softmax_with_the_model_scale(client: ClipClient, images: list[Path]) -> None:
    labels, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a drawing of a {}."]
    assert client.model_info.logit_scale_from_server
    probs = client.classify(images[:3], labels, templates=templates)
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Recompute from the raw embeddings: mean of normalised template embeddings, re-normalised, softmax.
    img = client.embed_images(images[:3])
    txt = client.embed_texts([t.format(label) for label in labels for t in templates]).reshape(3, 2, -1)
    lab = txt.mean(axis=1)
    lab /= np.linalg.norm(lab, axis=1, keepdims=True)
    logits = client.model_info.logit_scale * (img @ lab.T)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(ClipClientError, match="placeholder"):
        client.classify(images[:1], labels, templates=["no placeholder"])


def test_sigmoid_probabilities_when_the_model_has_a_bias() -> None:
    img = np.array([[1.0, 0.0]], dtype=np.float32)
    lab = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    probs = _core.probabilities(img, lab, logit_scale=10.0, logit_bias=-5.0)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.array([[10.0 - 5.0, -5.0]]))), rtol=1e-6)
    soft = _core.probabilities(img, lab, logit_scale=10.0, logit_bias=None)
    np.testing.assert_allclose(soft, [[1 / (1 + np.exp(-10.0)), 1 / (1 + np.exp(10.0))]], rtol=1e-5)


def test_logit_parameters_and_identity_come_from_the_configs() -> None:
    tower = _core.TowerInfo("m_image", "", "image", "embedding", "FP32", 4, 8)
    text = _core.TowerInfo("m_text", "", "text", "embedding", "FP32", 4, 8)
    params = [{"logit_scale": "10.5"}, {"logit_bias": "-10", "logit_scale": "1"}]  # the image ensemble's win
    siglip = _core.model_info("m", tower, text, params, {})
    assert (siglip.logit_scale, siglip.logit_bias, siglip.logit_scale_from_server) == (10.5, -10.0, True)
    clip = _core.model_info("m", tower, text, [{}, {}], {})
    assert (clip.logit_scale, clip.logit_bias, clip.logit_scale_from_server) == (100.0, None, False)
    assert siglip.identity != clip.identity
    with pytest.raises(ClipClientError, match="not a number"):
        _core.model_info("m", tower, text, [{"logit_scale": "big"}], {})


@server
def test_rank_orders_by_cosine(client: ClipClient, images: list[Path]) -> None:
    ranked = client.rank("a green gradient", images)
    scores = client.embed_images(images) @ client.embed_texts(["a green gradient"])[0]
    assert [r.index for r in ranked] == list(np.argsort(-scores, kind="stable"))
    np.testing.assert_allclose([r.score for r in ranked], np.sort(scores)[::-1], atol=1e-5)
    assert len(client.rank("a green gradient", images, top=2)) == 2


@server
def test_async_client_many_items_concurrently(url: str) -> None:
    items = _arrays(24, seed=3)
    calls: list[tuple[int, int]] = []

    async def run():
        async with AsyncClipClient(url, batch_size=2, concurrency=8) as c:
            out = await c.embed_images(items, progress=lambda d, t: calls.append((d, t)))
            texts = await c.embed_texts(["a cat", "a dog"])
            probs = await c.classify(items[:2], ["cat", "dog"], templates=["a {}"])
            ranked = await c.rank("a cat", items[:5], top=3)
            return out, texts, probs, ranked

    out, texts, probs, ranked = asyncio.run(run())
    with ClipClient(url, batch_size=16) as sync:
        np.testing.assert_allclose(out, sync.embed_images(items), atol=1e-5)
        np.testing.assert_allclose(texts, sync.embed_texts(["a cat", "a dog"]), atol=1e-5)
        np.testing.assert_allclose(probs, sync.classify(items[:2], ["cat", "dog"], templates=["a {}"]), atol=1e-5)
        assert [r.index for r in ranked] == [r.index for r in sync.rank("a cat", items[:5], top=3)]
    # One progress call per finished round of requests: growing, and ending at the total.
    assert len(calls) > 1 and calls[-1] == (24, 24) and all(t == 24 for _, t in calls)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})


@server
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_bad_item_in_a_batch_is_named(url: str, images: list[Path], corrupt_file: Path, flavour: str) -> None:
    by_bytes = [images[0], images[1], CORRUPT, images[3]]
    by_path = [images[0], images[1], images[2], images[3], corrupt_file]

    if flavour == "sync":
        with ClipClient(url, batch_size=4) as c:
            with pytest.raises(ItemError) as bytes_err:
                c.embed_images(by_bytes)
            with pytest.raises(ItemError) as path_err:
                c.embed_images(by_path)
            good = c.embed_images([by_bytes[i] for i in (0, 1, 3)])
    else:

        async def run():
            async with AsyncClipClient(url, batch_size=4) as c:
                with pytest.raises(ItemError) as b_err:
                    await c.embed_images(by_bytes)
                with pytest.raises(ItemError) as p_err:
                    await c.embed_images(by_path)
                return b_err, p_err, await c.embed_images([by_bytes[i] for i in (0, 1, 3)])

        bytes_err, path_err, good = asyncio.run(run())
    assert bytes_err.value.index == 2 and str(bytes_err.value).startswith("item 2 (<")
    assert "cannot decode" in str(bytes_err.value)
    assert path_err.value.index == 4 and path_err.value.label == str(corrupt_file)
    assert str(corrupt_file) in str(path_err.value)
    assert good.shape[0] == 3 and np.all(np.isfinite(good))


@server
def test_invalid_items_fail_client_side(client: ClipClient, images: list[Path], tmp_path: Path) -> None:
    with ClipClient(_dead_url(), retries=0) as dead:
        # Missing files are found before any request (here: before even connecting).
        with pytest.raises(InvalidItemError, match=r"item 1 \(.*missing\.png\): file not found"):
            dead.embed_images([images[0], tmp_path / "missing.png"])
    with pytest.raises(InvalidItemError, match="item 1 .*uint8"):
        client.embed_images([images[0], np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(InvalidItemError, match="item 0 .*unsupported item type"):
        client.embed_images([12345])
    with pytest.raises(InvalidItemError, match="item 1 .*texts must be str"):
        client.embed_texts(["ok", b"bytes"])


@server
def test_unreachable_server_and_wrong_prefix(url: str) -> None:
    start = time.monotonic()
    with ClipClient(_dead_url(), retries=2, backoff=0.05) as c:
        with pytest.raises(ServerUnavailableError, match="unavailable after 3 attempt"):
            c.embed_texts(["hi"])
    with pytest.raises(ServerUnavailableError):
        asyncio.run(_async_embed_text(_dead_url()))
    assert time.monotonic() - start < 15
    with ClipClient(url, prefix="nope") as c:
        with pytest.raises(ModelNotFoundError, match="nope_image"):
            c.embed_texts(["hi"])
    # TLS to a plaintext port fails as an unreachable server, not a hang; bad cert paths fail at once.
    with ClipClient(url, ssl=True, retries=0, timeout=10) as c:
        with pytest.raises(ClipClientError):
            c.embed_texts(["hi"])
    with pytest.raises(ClipClientError, match="root_certificates file not found"):
        ClientOptions(url=url, ssl=True, root_certificates="/nonexistent/ca.pem")


async def _async_embed_text(url: str) -> None:
    async with AsyncClipClient(url, retries=1, backoff=0.05) as c:
        await c.embed_texts(["hi"])


@server
def test_headers_are_sent(url: str) -> None:
    with ClipClient(url, headers={"x-clip-triton-test": "1"}) as c:
        assert c.embed_texts(["hello"]).shape[0] == 1


@server
def test_server_stopping_mid_run_gives_a_clear_error_quickly(served) -> None:
    from clip_triton.exporter.base.server import TritonServer

    _, repo, _ = served
    own = TritonServer(repo)
    own.start(timeout=300)
    items = _arrays(400, seed=5, size=16)
    stopped_at: list[float] = []
    progress: list[int] = []

    def on_progress(done: int, total: int) -> None:
        progress.append(done)
        if not stopped_at:  # the first request is back: the server goes away under the run, whatever its speed
            stopped_at.append(time.monotonic())
            own.stop()

    try:
        with ClipClient(own.grpc_url, batch_size=4, concurrency=2, timeout=20, retries=2, backoff=0.1) as c:
            c.model_info  # noqa: B018 - discover before the run
            with pytest.raises(ServerUnavailableError) as err:
                c.embed_images(items, progress=on_progress)
            failed_at = time.monotonic()
    finally:
        own.stop()
    assert progress and progress[-1] < len(items), "the run must have been cut short"
    assert failed_at - stopped_at[0] < 30, f"error came {failed_at - stopped_at[0]:.1f}s after the stop"
    assert own.grpc_url in str(err.value)


# ------------------------------------------------------------------------------------------------ CLI

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@server
def test_cli_embed_images_and_texts(url: str, served, images: list[Path], tmp_path: Path, client: ClipClient) -> None:
    npy = tmp_path / "out" / "images.npy"
    res = _invoke("embed", "--url", url, *map(str, images[:3]), "--out", str(npy), "--json", "-q")
    assert json.loads(res.stdout)["count"] == 3
    np.testing.assert_allclose(np.load(npy), client.embed_images(images[:3]), atol=1e-5)
    assert not [p for p in npy.parent.iterdir() if p.name.startswith(".")], "no temp files left"

    jsonl = tmp_path / "texts.jsonl"
    _invoke("embed", "--url", url, "--text", "a cat", "--text", "a dog", "--out", str(jsonl))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a cat", "a dog"]
    np.testing.assert_allclose([r["embedding"] for r in rows], client.embed_texts(["a cat", "a dog"]), atol=1e-5)

    table = _invoke("embed", "--url", url, str(images[0])).stdout
    assert str(images[0]) in table and str(load_manifest(served[2]).embed_dim) in table
    data = json.loads(_invoke("embed", "--url", url, "--text", "hi", "--json").stdout)
    assert data["model"] == "clip_text" and len(data["items"][0]["embedding"]) == data["dim"]

    with pytest.raises(ClipClientError, match="either image files or --text"):
        _invoke("embed", "--url", url, str(images[0]), "--text", "hi")
    with pytest.raises(ClipClientError, match=r"\.npy or \.jsonl"):
        _invoke("embed", "--url", url, "--text", "hi", "--out", str(tmp_path / "x.csv"))


@server
def test_cli_classify(url: str, images: list[Path], client: ClipClient) -> None:
    res = _invoke("classify", "--url", url, *map(str, images[:2]), "--labels", "cat, dog,car", "--top", "2", "--json")
    data = json.loads(res.stdout)
    probs = client.classify(images[:2], ["cat", "dog", "car"])
    for row, expected in zip(data, probs, strict=True):
        assert len(row["top"]) == 2
        best = int(np.argmax(expected))
        assert row["top"][0]["label"] == ["cat", "dog", "car"][best]
        assert row["top"][0]["prob"] == pytest.approx(float(expected[best]), abs=1e-5)
    table = _invoke("classify", "--url", url, str(images[0]), "--labels", "cat,dog").stdout
    assert "label" in table and "cat" in table and "dog" in table


@server
def test_cli_search_caches_embeddings(url: str, images: list[Path], tmp_path: Path, client: ClipClient) -> None:
    import shutil

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(images):
        shutil.copy(path, folder / ("sub" if i % 2 else "") / path.name)
    args = ["search", "--url", url, "--images", str(folder), "--query", "a green gradient", "--top", "3", "--json"]

    first = json.loads(_invoke(*args).stdout)
    assert (first["embedded"], first["cached"]) == (6, 0)
    assert (folder / ".clip-triton-cache.npz").is_file()
    second = json.loads(_invoke(*args).stdout)
    assert (second["embedded"], second["cached"]) == (0, 6)
    assert second["results"] == first["results"]

    changed = folder / images[0].name
    changed.write_bytes(_png_bytes(_arrays(1, seed=99, size=30)[0]))
    third = json.loads(_invoke(*args).stdout)
    assert (third["embedded"], third["cached"]) == (1, 5)

    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    scores = client.embed_images(paths) @ client.embed_texts(["a green gradient"])[0]
    expected = [str(paths[i]) for i in np.argsort(-scores, kind="stable")[:3]]
    assert [r["path"] for r in third["results"]] == expected

    table = _invoke("search", "--url", url, "--images", str(folder), "--query", "x", "--no-cache").stdout
    assert "rank" in table and "score" in table


@server
def test_cli_errors_are_one_line_exit_2(url: str, images: list[Path], corrupt_file: Path) -> None:
    env = {**os.environ, "CLIP_TRITON_URL": _dead_url()}
    down = subprocess.run([*CLI, "embed", "--text", "hi", "--retries", "0"], capture_output=True, text=True, env=env)
    assert down.returncode == 2, down.stderr
    assert down.stderr.startswith("error: server") and "unavailable" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and down.stdout == ""

    bad = subprocess.run(
        [*CLI, "embed", "--url", url, str(images[0]), str(corrupt_file), "--out", "never.npy"],
        capture_output=True,
        text=True,
        cwd=corrupt_file.parent,
    )
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: item 1 ({corrupt_file})"), bad.stderr
    assert not (corrupt_file.parent / "never.npy").exists()
