"""Hostile client inputs: damaged `embed FOLDER --out DIR` output on resume, files that are not regular
files (FIFOs, devices, broken symlinks, oversized files), and malformed HOST:PORT urls (issue 21)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
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
    InvalidUrlError,
    _core,
)
from clip_triton.clients.clip_preprocess import DEFAULT_MAX_BYTES
from clip_triton.clients.search import iter_image_files
from clip_triton.clients.stream import INDEX_NAME, iter_shards
from clip_triton.exporter.cli import app
from helpers import run_main, write_tiny_images

server = pytest.mark.server
runner = CliRunner()


def _dead_url() -> str:
    from clip_triton.exporter.base.server import free_port

    return f"127.0.0.1:{free_port()}"


# ------------------------------------------------------------------------------------------------ urls

BAD_URLS = {
    "127.0.0.1:99999": "port 99999 is out of range",
    "127.0.0.1:0": "port 0 is out of range",
    "127.0.0.1:": "not a number",
    ":8001": "has no host",
    "localhost": "must be HOST:PORT",
    "::1:8001": "IPv6 host goes in brackets",
    "[::1]": r"not \[IPV6\]:PORT",
    "[nope]:8001": "not an IPv6 address",
    "my host:8001": "not a host name",
    "grpc://a:8001": "no scheme",
    "a:8001,b:70000": "port 70000 is out of range",
}


@pytest.mark.parametrize("url", sorted(BAD_URLS))
def test_bad_urls_are_refused_everywhere(url: str) -> None:
    match = BAD_URLS[url]
    for make in (
        lambda: ClipClient(url),
        lambda: AsyncClipClient(url),
        lambda: ClientOptions(url=url),
        lambda: ClipClient(url.split(",")),  # the list form
    ):
        with pytest.raises(InvalidUrlError, match=match) as err:
            make()
        assert isinstance(err.value, ValueError) and isinstance(err.value, ClipClientError)


def test_good_urls_are_normalised() -> None:
    assert _core.parse_urls(" a:8001, [::1]:08001,,a:8001 ") == ("a:8001", "[::1]:8001")
    assert _core.parse_urls(["host-1.example:1", "10.0.0.2:65535"]) == ("host-1.example:1", "10.0.0.2:65535")
    assert ClientOptions(url="[fe80::1%eth0]:8001").urls == ("[fe80::1%eth0]:8001",)


def test_cli_bad_url_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    for args in (
        ["embed", "--text", "hi", "--url", "127.0.0.1:99999"],
        ["classify", "x.jpg", "--labels", "a", "--url", "127.0.0.1:99999"],
    ):
        code, out, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and out == "", err
        assert err.strip() == "error: url '127.0.0.1:99999': port 99999 is out of range (1-65535)"
    monkeypatch.setenv("CLIP_TRITON_URL", "127.0.0.1:99999")
    code, _, err = run_main(monkeypatch, capsys, "embed", "--text", "hi")
    assert code == 2 and "port 99999" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture()
def odd_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/zero, a broken symlink and a folder, all named like images."""
    folder = tmp_path / "odd"
    folder.mkdir()
    files = {
        "fifo": folder / "fifo.jpg",
        "zero": folder / "zero.jpg",
        "broken": folder / "broken.png",
        "folder": folder / "folder.png",
    }
    os.mkfifo(files["fifo"])
    files["zero"].symlink_to("/dev/zero")
    files["broken"].symlink_to(folder / "nowhere.png")
    files["folder"].mkdir()
    return files


ODD_REASONS = {
    "fifo": r"not a regular file: .*fifo\.jpg is a FIFO$",
    "zero": r"not a regular file: .*zero\.jpg is a symlink to /dev/zero, a character device$",
    "broken": r"file not found \(a broken symlink to .*nowhere\.png\)$",
    "folder": r"is a folder, not an image file$",
}


@pytest.mark.timeout(60)
def test_non_regular_files_are_named_never_opened(odd_files: dict[str, Path]) -> None:
    start = time.monotonic()
    with ClipClient(_dead_url(), retries=0) as dead:  # refused before connecting
        for kind, path in odd_files.items():
            with pytest.raises(InvalidItemError, match=rf"^item 0 \(.*\): {ODD_REASONS[kind]}"):
                dead.embed_images([path])
            with pytest.raises(InvalidItemError, match=ODD_REASONS[kind]):
                dead.classify([path], ["cat"])  # before the labels' texts are sent
    with pytest.raises(InvalidItemError, match=ODD_REASONS["fifo"]):
        asyncio.run(_async_embed(_dead_url(), odd_files["fifo"]))
    # The reader itself (a file swapped for a FIFO or a device after the check): fstat before any read.
    for kind in ("fifo", "zero"):
        with pytest.raises(InvalidItemError, match=ODD_REASONS[kind]):
            _core.read_image_file(0, odd_files[kind])
    assert time.monotonic() - start < 20, "a FIFO or /dev/zero was waited on or read"


async def _async_embed(url: str, path: Path) -> None:
    async with AsyncClipClient(url, retries=0) as c:
        await c.embed_images([path])


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(3 * 2**30)  # sparse: 3 GiB on paper, nothing on disk; reading it would take seconds
    start = time.monotonic()
    with pytest.raises(InvalidItemError, match=r"image file too large: 3072\.0 MiB, over the limit of 32\.0 MiB"):
        _core.read_image_file(0, big)
    with pytest.raises(InvalidItemError, match="over the limit of 2048.0 MiB"):  # 0 (off): gRPC's limit
        _core.read_image_file(0, big, 0)
    assert time.monotonic() - start < 2
    small = tmp_path / "small.png"
    small.write_bytes(b"x" * 1000)
    assert _core.read_image_file(0, small, 1000) == b"x" * 1000
    with pytest.raises(InvalidItemError, match="1000 bytes, over the limit of 999 bytes"):
        _core.read_image_file(0, small, 999)
    assert _core.DEFAULT_MAX_IMAGE_BYTES == DEFAULT_MAX_BYTES  # the server's default


def test_folder_walk_skips_and_reports_non_regular_files(odd_files: dict[str, Path]) -> None:
    folder = odd_files["fifo"].parent
    (folder / "real.png").write_bytes(b"not decoded here")
    (folder / "link.png").symlink_to(folder / "real.png")  # a symlink to a regular file is an image
    skipped: list[tuple[Path, str]] = []
    found = list(iter_image_files(folder, lambda path, what: skipped.append((path, what))))
    assert [p.name for p in found] == ["link.png", "real.png"]
    assert sorted((p.name, what) for p, what in skipped) == [
        ("broken.png", "a broken symlink"),
        ("fifo.jpg", "a FIFO"),
        ("zero.jpg", "a symlink to /dev/zero, a character device"),
    ]


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def url(served_shapes) -> str:
    """The ShapesCLIP-RN-T server: what is tested here holds for any served model."""
    return served_shapes[0].grpc_url


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five tiny images (shards of 2: 2 + 2 + 1), plus a FIFO and a /dev/zero link named as images."""
    folder = tmp_path_factory.mktemp("inputs") / "photos"
    write_tiny_images(folder, 5, seed=21)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    return folder


def _embed_dir(url: str, folder: Path, out: Path) -> tuple[dict, str]:
    """`clip-triton embed FOLDER --out DIR --shard-size 2 --json -q`: (summary, stderr)."""
    args = ["embed", str(folder), "--out", str(out), "--shard-size", "2", "--url", url, "--json", "-q"]
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}


@pytest.fixture(scope="module")
def clean(url: str, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    summary, stderr = _embed_dir(url, photos, out)
    assert (summary["count"], summary["shards"], summary["embedded"], summary["skipped"]) == (5, 3, 5, 2)
    # The walk skipped the FIFO and the device link without opening them, and said so (even with -q).
    assert stderr.strip() == (
        "[embed] WARNING: skipped 2 image-named entries that are not regular files: "
        "pipe.jpg (a FIFO), zero.png (a symlink to /dev/zero, a character device)"
    )
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["version"] == 2
    assert [s["name"] for s in index["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert all(len(s["npy_sha256"]) == len(s["paths_sha256"]) == 64 for s in index["shards"])
    return out


def _assert_same_as(out: Path, clean: Path) -> None:
    """Complete, readable and equal to the clean run: same paths, same vectors, same index."""
    got, want = list(iter_shards(out)), list(iter_shards(clean))
    assert [p for p, _ in got] == [p for p, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    a, b = json.loads((out / INDEX_NAME).read_text()), json.loads((clean / INDEX_NAME).read_text())
    strip = [{k: v for k, v in s.items() if k != "npy_sha256"} for s in a["shards"]]
    assert strip == [{k: v for k, v in s.items() if k != "npy_sha256"} for s in b["shards"]]
    assert {k: v for k, v in a.items() if k != "shards"} == {k: v for k, v in b.items() if k != "shards"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def _truncate_npy(out: Path) -> None:
    npy = out / "shard-00001.npy"
    npy.write_bytes(npy.read_bytes()[:300])


def _replace_npy(out: Path) -> None:
    shutil.copyfile(out / "shard-00001.npy", out / "shard-00000.npy")  # valid, same shape, other rows


def _delete_paths_line(out: Path) -> None:
    txt = out / "shard-00001.paths.txt"
    txt.write_text(txt.read_text().splitlines()[0] + "\n")


DAMAGE = {
    "truncated npy": (_truncate_npy, {"shard-00001": "npy truncated: 300 of "}),
    "replaced npy": (_replace_npy, {"shard-00000": "npy checksum differs from index.json"}),
    "deleted paths line": (_delete_paths_line, {"shard-00001": "paths.txt has 1 line(s), expected 2"}),
}


@server
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_redoes_exactly_the_damaged_shard(
    url: str, photos: Path, clean: Path, tmp_path: Path, damage: str
) -> None:
    out = shutil.copytree(clean, tmp_path / "out", copy_function=shutil.copy2)
    damage_fn, expected = DAMAGE[damage]
    damage_fn(out)
    ((name, reason),) = expected.items()
    with pytest.raises(ClipClientError, match=rf"{name} is damaged"):
        list(iter_shards(out))  # readers refuse it too
    before = _files(out)
    summary, stderr = _embed_dir(url, photos, out)
    lines = [line for line in stderr.splitlines() if "skipped 2 image-named" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"[embed] WARNING: {name}: damaged ({reason}"), stderr
    assert lines[0].endswith("), embedding again")
    assert (summary["reused_shards"], summary["redone_shards"], summary["embedded"]) == (2, 1, 2)
    after = _files(out)
    kept = [n for n in before if not n.startswith((name, INDEX_NAME))]
    assert {n: after[n] for n in kept} == {n: before[n] for n in kept}, "undamaged shards were rewritten"
    _assert_same_as(out, clean)


@server
def test_resume_drops_unknown_and_extra_index_entries(url: str, photos: Path, clean: Path, tmp_path: Path) -> None:
    out = shutil.copytree(clean, tmp_path / "out")
    index = json.loads((out / INDEX_NAME).read_text())
    first = index["shards"][0]
    index["shards"] += [
        {**first, "name": "shard-00007"},  # past the folder's end
        {**index["shards"][1]},  # shard-00001 twice
        {"name": "../../etc/passwd", "count": 1},  # never a path to delete
        "junk",
    ]
    (out / "shard-00007.npy").write_bytes(b"left by an earlier, larger folder")
    (out / INDEX_NAME).write_text(json.dumps(index))
    summary, stderr = _embed_dir(url, photos, out)
    notices = [line.removeprefix("[embed] WARNING: ") for line in stderr.splitlines()][1:]
    assert notices == [
        "index.json: shard-00001 is listed more than once; dropping it",
        "index.json: dropping entry 5 (name '../../etc/passwd' is not a shard name)",
        "index.json: dropping entry 6 (str, not an object)",
        "shard-00007: past the folder's end (it has 3 shard(s) now), removed",
    ], stderr
    # shard-00001's entry was dropped, so it is embedded again; the other two are kept.
    assert (summary["reused_shards"], summary["embedded"], summary["shards"]) == (2, 2, 3)
    _assert_same_as(out, clean)


@server
def test_resume_of_an_old_index_redoes_its_shards(url: str, photos: Path, clean: Path, tmp_path: Path) -> None:
    out = shutil.copytree(clean, tmp_path / "out")
    index = json.loads((out / INDEX_NAME).read_text())
    index["version"] = 1
    for shard in index["shards"]:
        del shard["npy_sha256"], shard["paths_sha256"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    summary, stderr = _embed_dir(url, photos, out)
    assert "index.json: dropping entry 0 (shard-00000 has no output checksums (written by an older clip-triton))" \
        in stderr
    assert (summary["reused_shards"], summary["embedded"]) == (0, 5)
    _assert_same_as(out, clean)


@server
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda text: text[: len(text) // 2], r"index\.json is damaged: not valid JSON \("),
        (lambda text: json.dumps({**json.loads(text), "shards": {}}), r"damaged: 'shards' is not a list"),
        (lambda text: "[]", r"index\.json is not a clip-triton embeddings index"),
        (
            lambda text: json.dumps({**json.loads(text), "shard_size": "2"}),
            r"index\.json is damaged: 'shard_size' is not a positive integer",
        ),
    ],
    ids=["truncated", "shards-not-a-list", "a-list", "shard-size-a-string"],
)
def test_damaged_index_is_one_line_exit_2(
    url: str, photos: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, corrupt, message: str,
) -> None:
    out = shutil.copytree(clean, tmp_path / "out")
    (out / INDEX_NAME).write_text(corrupt((clean / INDEX_NAME).read_text()))
    before = _files(out)
    args = ["embed", str(photos), "--out", str(out), "--shard-size", "2", "--url", url, "-q"]
    code, stdout, stderr = run_main(monkeypatch, capsys, *args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and stdout == "" and len(errors) == 1, stderr
    assert errors[0].endswith(f"remove {out} (or give a new --out) to start again")
    assert re.search(message, errors[0]), errors[0]
    assert _files(out) == before, "a damaged index must leave the folder as it was"


@server
def test_cli_embed_and_search_report_non_regular_files(
    url: str, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for kind, name in (("FIFO", "pipe.jpg"), ("symlink to /dev/zero, a character device", "zero.png")):
        for command in (["embed"], ["classify", "--labels", "cat,dog"]):
            start = time.monotonic()
            code, stdout, stderr = run_main(monkeypatch, capsys, *command, str(photos / name), "--url", url)
            assert time.monotonic() - start < 30
            assert code == 2 and stdout == "", stderr
            path = photos / name
            assert stderr.strip() == f"error: item 0 ({path}): not a regular file: {path} is a {kind}"
    args = ["search", "--images", str(photos), "--query", "a cat", "--url", url, "--no-cache", "--json", "-q"]
    code, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "[search] WARNING: skipped 2 image-named entries that are not regular files: pipe.jpg (a FIFO)" in stderr
    found = {Path(r["path"]).name for r in json.loads(stdout)["results"]}
    assert found == {p.name for p in photos.iterdir() if p.name.startswith("img")}


@server
def test_oversized_file_is_refused_with_the_served_limit(url: str, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(32 * 2**20 + 1)  # one byte over the repository's default max_bytes (sparse)
    with ClipClient(url) as client:
        assert _core.image_byte_limit(client.model_info) == 32 * 2**20
        with pytest.raises(InvalidItemError, match=r"item 0 .*image file too large: 32\.0 MiB, over the limit"):
            client.embed_images([big])
