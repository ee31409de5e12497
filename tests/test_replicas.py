"""Clients over several Triton replicas (spreading, failover, model mix refused) and the streaming
folder embed, against real embedded tritonservers serving one repository (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clip_triton.clients import AsyncClipClient, ClipClient, ModelMismatchError, ServerUnavailableError
from clip_triton.clients.search import iter_image_files
from clip_triton.clients.stream import INDEX_NAME, iter_shards
from clip_triton.exporter.base.server import TritonServer, free_port
from helpers import linked_copy, tiny_images, write_tiny_images

server = pytest.mark.server
CLI = [str(Path(sys.executable).with_name("clip-triton"))]
SHA_PARAM = r'(key: "image_encoder_sha256"\s*value \{\s*string_value: ")'


def _dead_url() -> str:
    return f"127.0.0.1:{free_port()}"


def _image_requests(srv: TritonServer) -> int:
    status, text = srv._http("GET", "/v2/models/clip_image/stats")
    assert status == 200, text
    return int(json.loads(text)["model_stats"][0]["inference_count"])


@pytest.fixture(scope="module")
def repo(served_shapes) -> Path:
    return served_shapes[1]


@pytest.fixture(scope="module")
def url(served_shapes) -> str:
    return served_shapes[0].grpc_url


# ------------------------------------------------------------------------------------------------ failover


@server
def test_a_replica_killed_mid_run_changes_no_embedding(url: str, repo: Path) -> None:
    items = tiny_images(200, seed=11)
    with ClipClient(url, batch_size=8) as single:
        expected = single.embed_images(items)
    replicas = [TritonServer(repo), TritonServer(repo)]
    try:
        for replica in replicas:
            replica.start(timeout=300)
            with ClipClient(replica.grpc_url) as warm:  # a fresh server's first request is ~10x slower than the
                warm.embed_images(items[:1])  # next: warm, the replicas keep pace with the first server
        victim, survivor = replicas
        urls = [url, victim.grpc_url, survivor.grpc_url]
        victim_before, survivor_before = _image_requests(victim), _image_requests(survivor)
        killed_at: list[int] = []
        served_by_victim: list[int] = []

        def seen(done: int, total: int) -> None:
            # The kill comes from the run's own progress callback, at the quarter mark: the client sends no
            # further batch until it returns, so the run cannot finish first, however fast the model is.
            if done >= total // 4 and not killed_at:
                killed_at.append(done)
                served_by_victim.append(_image_requests(victim))
                assert victim.process is not None
                os.killpg(victim.process.pid, signal.SIGKILL)  # the server and its python stubs, no goodbye

        start = time.monotonic()
        with ClipClient(urls, batch_size=8, concurrency=2, retries=2, backoff=0.1) as client:
            got = client.embed_images(items, progress=seen)
            pool = {e.url: e for e in client._pool.endpoints}
        assert killed_at and killed_at[0] < len(items), "the replica must die mid-run"
        assert got.shape == expected.shape
        for i in range(len(items)):  # item by item: nothing lost, duplicated or shifted by the failover
            np.testing.assert_allclose(got[i], expected[i], atol=1e-6, err_msg=f"item {i}")
        assert served_by_victim[0] > victim_before, "the killed replica had taken part"
        assert not pool[victim.grpc_url].live and "unavailable" in pool[victim.grpc_url].error
        assert pool[survivor.grpc_url].live and _image_requests(survivor) > survivor_before, "work was spread"
        assert time.monotonic() - start < 120
    finally:
        for replica in replicas:
            replica.stop()


@server
def test_every_endpoint_down_fails_fast_naming_them(url: str) -> None:
    dead = [_dead_url(), _dead_url()]
    start = time.monotonic()
    with ClipClient(dead, retries=1, backoff=0.05) as client:
        with pytest.raises(ServerUnavailableError) as err:
            client.embed_texts(["hi"])
    message = str(err.value)
    assert all(d in message for d in dead) and "2 attempt(s) each" in message and "\n" not in message

    async def run() -> None:
        async with AsyncClipClient(",".join(dead), retries=1, backoff=0.05) as aclient:
            await aclient.embed_texts(["hi"])

    with pytest.raises(ServerUnavailableError, match="all unavailable"):
        asyncio.run(run())
    env = {**os.environ, "CLIP_TRITON_URL": ",".join(dead)}
    cli = subprocess.run([*CLI, "embed", "--text", "hi", "--retries", "0"], capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and cli.stderr.startswith("error: servers ") and dead[1] in cli.stderr, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 30, "giving up must not hang"

    # One endpoint down at connect: set aside, the live one does the work, in sync and asyncio alike.
    with ClipClient([dead[0], url], retries=1, backoff=0.05) as client:
        vec = client.embed_texts(["a cat", "a dog"])
        assert vec.shape[0] == 2 and not client._pool.endpoints[0].live

    async def run_one() -> np.ndarray:
        async with AsyncClipClient(f"{dead[0]}, {url}", retries=1, backoff=0.05) as aclient:
            return await aclient.embed_texts(["a cat", "a dog"])

    np.testing.assert_allclose(asyncio.run(run_one()), vec, atol=1e-6)


@pytest.fixture(scope="module")
def other_model(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose repository declares other encoder checksums: what a replica of another model shows
    the client. (The same weights underneath keep it cheap: the refusal rests on exactly these parameters.)"""
    base = tmp_path_factory.mktemp("other_model")
    copy = linked_copy(repo, base / "repo")
    for config in copy.glob("*/config.pbtxt"):
        text = config.read_text()
        if "image_encoder_sha256" in text:
            config.unlink()  # a hard link to the original: replace the file, never edit it
            config.write_text(re.sub(SHA_PARAM, r"\g<1>0ther", text))
    srv = TritonServer(copy, log_path=base / "tritonserver.log")
    srv.start(timeout=300)
    try:
        yield srv
    finally:
        srv.stop()


@server
def test_replicas_of_different_models_are_refused(url: str, other_model: TritonServer, tmp_path: Path) -> None:
    urls = [url, other_model.grpc_url]
    with ClipClient(urls) as client:
        with pytest.raises(ModelMismatchError) as err:
            client.embed_texts(["hi"])
    message = str(err.value)
    assert message.startswith("replicas serve different models") and other_model.grpc_url in message
    assert "\n" not in message

    async def run() -> None:
        async with AsyncClipClient(urls) as aclient:
            await aclient.model_info()

    with pytest.raises(ModelMismatchError):
        asyncio.run(run())
    cli = subprocess.run([*CLI, "embed", "--url", ",".join(urls), "--text", "hi"], capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.startswith("error: replicas serve different models"), cli.stderr

    # A streaming output records its model: resuming it against another one is refused.
    folder, out = tmp_path / "few", tmp_path / "vecs"
    write_tiny_images(folder, 3)
    first = subprocess.run([*CLI, "embed", str(folder), "--out", str(out), "--url", url, "-q"], capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*CLI, "embed", str(folder), "--out", str(out), "--url", other_model.grpc_url],
                           capture_output=True, text=True)
    assert again.returncode == 2 and f"{out} holds embeddings of" in again.stderr, again.stderr


# ------------------------------------------------------------------------------------------------ streaming


# `python -c KILLED_AFTER N embed ...`: the `clip-triton embed` console entry, which SIGKILLs its own process
# group from the folder embed's progress callback once N images are done: mid-run at a set point, however
# fast the server answers (the callback runs between requests, so the run cannot finish first).
KILLED_AFTER = """
import os, signal, sys
import clip_triton.clients.stream as stream
from clip_triton.exporter.cli import main

after = int(sys.argv.pop(1))
embed_folder = stream.embed_folder

def killed_after(*args, progress, **kwargs):
    def seen(done, total, reused):
        progress(done, total, reused)
        if done >= after:
            os.killpg(0, signal.SIGKILL)  # the run and all it started, no goodbye

    return embed_folder(*args, progress=seen, **kwargs)

stream.embed_folder = killed_after
sys.argv[0] = "clip-triton"
sys.exit(main())
"""


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}


@server
@pytest.mark.parametrize(
    ("count", "shard"),
    [(600, 40), pytest.param(3000, 200, marks=pytest.mark.slow, id="3000-images")],  # ~400 images/s here
)
def test_streaming_embed_resumes_after_a_kill(url: str, tmp_path: Path, count: int, shard: int) -> None:
    folder, out = tmp_path / "photos", tmp_path / "vecs"
    shards = -(-count // shard)
    write_tiny_images(folder, count, seed=3, per_folder=250)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped")
    args = [*CLI, "embed", str(folder), "--out", str(out), "--url", url, "--shard-size", str(shard), "--json"]

    # Killed half-way through the fourth shard, three finished and listed.
    killed = [sys.executable, "-c", KILLED_AFTER, str(3 * shard + shard // 2), *args[1:]]
    run = subprocess.run(killed, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert run.returncode == -signal.SIGKILL, f"ended before it could be interrupted: {run}"
    index = json.loads((out / INDEX_NAME).read_text())
    assert not index["complete"] and index["shards"]
    done_before = {s["name"] for s in index["shards"]}
    assert len(done_before) == 3, done_before
    kept = {k: v for k, v in _shard_stats(out).items() if k.split(".")[0] in done_before}

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=60 + count)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["count"], summary["shards"]) == (count, shards)
    assert summary["reused_shards"] >= len(done_before)
    assert summary["embedded"] == count - shard * summary["reused_shards"]
    assert "images/s" in resumed.stderr and "ETA" in resumed.stderr
    assert {k: v for k, v in _shard_stats(out).items() if k in kept} == kept, "finished shards were redone"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    names, rows = [], []
    for paths, vectors in iter_shards(out):
        assert len(paths) == vectors.shape[0] <= shard
        names += paths
        rows.append(vectors)
    walk = [p.relative_to(folder).as_posix() for p in iter_image_files(folder)]
    assert names == walk and len(set(names)) == count, "every image exactly once, in walk order"
    vectors = np.concatenate(rows)
    sample = list(range(0, count, count // 16))
    with ClipClient(url, batch_size=8) as client:
        direct = client.embed_images([folder / names[i] for i in sample])
    np.testing.assert_allclose(vectors[sample], direct, atol=1e-6)

    again = subprocess.run([*args, "--quiet"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert (json.loads(again.stdout)["embedded"], json.loads(again.stdout)["reused_shards"]) == (0, shards)
