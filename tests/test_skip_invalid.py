"""Bulk jobs finish (issue 27): `embed FOLDER --out DIR` and `search` with `--skip-invalid` leave out the
files that fail as their own fault (unreadable, vanished, not an image, truncated, over the size limit,
refused by the server inside a batch), list each with its reason, and keep resume aligned; the default
stays strict, and a server that is down still fails the run. On the real embedded tritonserver."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip_triton.clients import ClipClient
from clip_triton.clients.search import REJECTED_NAME as SEARCH_REJECTED
from clip_triton.clients.search import embed_valid
from clip_triton.clients.stream import INDEX_NAME, REJECTED_NAME, embed_folder, iter_shards
from helpers import run_main, write_tiny_images

server = pytest.mark.server
GOOD = ["img00000.png", "img00001.png", "img00002.jpg", "img00003.png", "img00004.png"]
# Bad files, named to fall between good ones in the walk (shards of 3 mix them; zz/ is a shard of its own),
# with what their reason must say. Walk order, shards of 3: [img0 truncated img1] [img2 notes img3]
# [img4 huge zz/bad] [zz/empty].
BAD = {
    "img00001-truncated.jpg": r"rejected by clip_image: .*(truncated|corrupt|premature)",
    "img00003-notes.jpg": r"rejected by clip_image: .*cannot decode image",
    "zz-huge.png": r"image file too large: 32\.0 MiB, over the limit of 32\.0 MiB",
    "zz/bad.png": r"rejected by clip_image: .*cannot decode",
    "zz/empty.jpg": r"rejected by clip_image: .*empty image",
}
LOCKED = "img00004-locked.png"


def _jpeg(size: int, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _store(root: Path, *, locked: bool = False) -> Path:
    """A photo store: the five GOOD images and the BAD files (and LOCKED, chmod 000, when asked)."""
    folder = root / "photos"
    write_tiny_images(folder, len(GOOD), seed=27)
    assert sorted(p.name for p in folder.iterdir()) == sorted(GOOD)
    data = _jpeg(64, seed=1)
    (folder / "img00001-truncated.jpg").write_bytes(data[: len(data) * 3 // 5])  # an upload cut short
    (folder / "img00003-notes.jpg").write_text("shopping list: milk, eggs\n")
    with open(folder / "zz-huge.png", "wb") as handle:
        handle.truncate(32 * 2**20 + 1)  # one byte over the served max_bytes (sparse: never read)
    (folder / "zz").mkdir()
    (folder / "zz" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "zz" / "empty.jpg").write_bytes(b"")
    if locked:
        path = folder / LOCKED
        path.write_bytes((folder / GOOD[0]).read_bytes())
        path.chmod(0)
    return folder


def _good_only(root: Path, store: Path) -> Path:
    folder = root / "good"
    folder.mkdir()
    for name in GOOD:
        shutil.copy2(store / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def url(served_shapes) -> str:
    """The ShapesCLIP-RN-T server: what is tested here holds for any served model."""
    return served_shapes[0].grpc_url


def _shards(out: Path) -> tuple[list[str], np.ndarray]:
    shards = list(iter_shards(out))
    return [p for paths, _ in shards for p in paths], np.concatenate([v for _, v in shards])


def _rejected(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len({r["path"] for r in rows}) == len(rows), "a file listed twice"
    return {r["path"]: r["reason"] for r in rows}


def _assert_reasons(rejected: dict[str, str], expected: dict[str, str]) -> None:
    import re

    assert sorted(rejected) == sorted(expected)
    for path, pattern in expected.items():
        assert re.search(pattern, rejected[path]), (path, rejected[path])
        assert "\n" not in rejected[path]


@server
def test_embed_folder_strict_fails_skip_invalid_embeds_exactly_the_good_files(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store = _store(tmp_path)
    common = ["--shard-size", "3", "--url", url, "--batch-size", "4", "--json", "-q"]

    # The default is strict: the first bad file ends the run, one line, exit 2, nothing listed.
    strict_out = tmp_path / "strict"
    code, stdout, stderr = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(strict_out), *common)
    assert code == 2 and stdout == "", stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: item "), stderr
    assert "img00001-truncated.jpg" in stderr and "rejected by clip_image" in stderr
    assert not (strict_out / REJECTED_NAME).exists()

    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "embed", str(store), "--out", str(out), "--skip-invalid", *common
    )
    assert code == 0, stderr
    # --quiet: no progress, only the one summary line (a warning, as the project's warnings go).
    assert stderr.strip() == f"[embed] WARNING: 5 files skipped, see {out / REJECTED_NAME}"
    summary = json.loads(stdout)
    assert (summary["count"], summary["embedded"], summary["shards"], summary["reused_shards"]) == (5, 5, 4, 0)
    assert (summary["rejected"], summary["rejected_now"]) == (5, 5)
    assert summary["rejected_file"] == str(out / REJECTED_NAME)
    _assert_reasons(_rejected(out / REJECTED_NAME), BAD)

    # Each shard's paths file lists only what it embedded; the all-bad shard (zz/) is empty but present.
    index = json.loads((out / INDEX_NAME).read_text())
    assert [s["count"] for s in index["shards"]] == [2, 2, 1, 0] and index["total"] == 5 and index["rejected"] == 5
    assert [[r["path"] for r in s.get("rejected", [])] for s in index["shards"]] == [
        ["img00001-truncated.jpg"], ["img00003-notes.jpg"], ["zz-huge.png", "zz/bad.png"], ["zz/empty.jpg"]
    ]
    assert [p for p, _ in iter_shards(out)] == [GOOD[:2], GOOD[2:4], GOOD[4:], []]

    # The vectors are a strict run's over the good files alone, row for row.
    good_out = tmp_path / "good-out"
    good = _good_only(tmp_path, store)
    code, _, stderr = run_main(monkeypatch, capsys, "embed", str(good), "--out", str(good_out), *common)
    assert code == 0, stderr
    got_paths, got = _shards(out)
    want_paths, want = _shards(good_out)
    assert got_paths == want_paths == GOOD
    np.testing.assert_allclose(got, want, atol=1e-5)

    # A strict rerun over the skipping run's output still fails on the bad files, and leaves it as it was.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, stderr = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(out), *common)
    assert code == 2 and stdout == "" and "img00001-truncated.jpg" in stderr, stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@server
def test_resume_keeps_alignment_and_lists_each_file_once(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store = _store(tmp_path)
    args = ["--shard-size", "3", "--url", url, "--batch-size", "4", "--json", "-q", "--skip-invalid"]
    full = tmp_path / "full"
    assert run_main(monkeypatch, capsys, "embed", str(store), "--out", str(full), *args)[0] == 0

    # Interrupted after two shards: the index lists them, the run is not complete, a third shard's
    # files are half there (a killed run writes shards before entering them in the index).
    out = shutil.copytree(full, tmp_path / "out")
    index = json.loads((out / INDEX_NAME).read_text())
    index["shards"], index["complete"] = index["shards"][:2], False
    index.pop("rejected")
    (out / INDEX_NAME).write_text(json.dumps(index))
    (out / "shard-00003.npy").unlink()
    (out / REJECTED_NAME).write_text((full / REJECTED_NAME).read_text().splitlines()[0] + "\n")
    code, stdout, stderr = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(out), *args)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["reused_shards"], summary["embedded"], summary["count"]) == (2, 1, 5)
    assert (summary["rejected"], summary["rejected_now"]) == (5, 3)
    assert stderr.strip() == f"[embed] WARNING: 5 files skipped, see {out / REJECTED_NAME}"
    assert (out / REJECTED_NAME).read_text() == (full / REJECTED_NAME).read_text()
    got_paths, got = _shards(out)
    want_paths, want = _shards(full)
    assert got_paths == want_paths
    np.testing.assert_allclose(got, want, atol=1e-6)

    # Nothing left to do: every shard kept, the list unchanged (no file twice).
    code, stdout, _ = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(out), *args)
    summary = json.loads(stdout)
    assert code == 0 and (summary["reused_shards"], summary["embedded"], summary["rejected_now"]) == (4, 0, 0)
    assert (out / REJECTED_NAME).read_text() == (full / REJECTED_NAME).read_text()

    # A left-out file fixed in place: its shard alone is embedded again, the file now in its walk position.
    notes = store / "img00003-notes.jpg"
    notes.write_bytes((store / GOOD[1]).read_bytes())
    code, stdout, stderr = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(out), *args)
    summary = json.loads(stdout)
    assert code == 0 and (summary["reused_shards"], summary["embedded"], summary["count"]) == (3, 3, 6), stderr
    assert stderr.strip() == f"[embed] WARNING: 4 files skipped, see {out / REJECTED_NAME}"
    assert "img00003-notes.jpg" not in _rejected(out / REJECTED_NAME)
    paths, vectors = _shards(out)
    assert paths == [*GOOD[:3], "img00003-notes.jpg", *GOOD[3:]]
    np.testing.assert_allclose(vectors[3], vectors[1], atol=1e-5)  # the same picture as img00001.png
    np.testing.assert_allclose(np.delete(vectors, 3, axis=0), want, atol=1e-5)


@server
def test_search_skip_invalid(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store = _store(tmp_path)
    args = ["--query", "a red car", "--top", "10", "--url", url, "--batch-size", "4", "--json", "-q"]
    code, stdout, stderr = run_main(monkeypatch, capsys, "search", "--images", str(store), *args)
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: item ")

    listed = store / SEARCH_REJECTED
    for run in range(2):  # the second run reads the cache: the bad files are tried again, listed once
        code, stdout, stderr = run_main(
            monkeypatch, capsys, "search", "--images", str(store), "--skip-invalid", *args
        )
        assert code == 0, stderr
        assert stderr.strip() == f"[search] WARNING: 5 files skipped, see {listed}"
        answer = json.loads(stdout)
        assert (answer["cached"], answer["embedded"]) == ((0, 5) if run == 0 else (5, 0))
        assert answer["rejected_file"] == str(listed)
        _assert_reasons({r["path"]: r["reason"] for r in answer["rejected"]}, BAD)
        _assert_reasons(_rejected(listed), BAD)

    good = _good_only(tmp_path, store)
    code, stdout, _ = run_main(monkeypatch, capsys, "search", "--images", str(good), "--no-cache", *args)
    want = json.loads(stdout)["results"]
    got = answer["results"]
    assert [Path(r["path"]).name for r in got] == [Path(r["path"]).name for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)

    # All fixed: nothing left out, and the old list is removed rather than left to mislead.
    for name in BAD:
        (store / name).unlink()
    code, stdout, stderr = run_main(monkeypatch, capsys, "search", "--images", str(store), "--skip-invalid", *args)
    assert code == 0 and stderr == "" and json.loads(stdout)["rejected"] == [], stderr
    assert not listed.exists()


@server
def test_unreadable_file_is_skipped_with_its_reason(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store = _store(tmp_path, locked=True)
    if os.access(store / LOCKED, os.R_OK):
        pytest.skip("running as root: a chmod 000 file is still readable")
    args = ["--shard-size", "3", "--url", url, "--json", "-q"]
    code, _, stderr = run_main(monkeypatch, capsys, "embed", str(store), "--out", str(tmp_path / "strict"), *args)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "embed", str(store), "--out", str(out), "--skip-invalid", *args
    )
    assert code == 0, stderr
    _assert_reasons(_rejected(out / REJECTED_NAME), {**BAD, LOCKED: "cannot read: Permission denied"})
    assert json.loads(stdout)["count"] == len(GOOD)


@server
def test_a_file_that_vanishes_mid_run_is_skipped(url: str, tmp_path: Path) -> None:
    store = _store(tmp_path)
    victim = store / GOOD[4]

    def progress(done: int, total: int, reused: int) -> None:
        if done >= 3:  # the walk has listed it; its shard is not embedded yet
            victim.unlink(missing_ok=True)

    with ClipClient(url, batch_size=4) as client:
        result = embed_folder(client, store, tmp_path / "out", shard_size=3, progress=progress, skip_invalid=True)
    assert result.count == 4 and dict(result.rejected)[GOOD[4]] == "file not found"
    assert _shards(tmp_path / "out")[0] == GOOD[:4]


@server
def test_embed_valid_isolates_the_bad_items_and_never_skips_transport_failures(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from clip_triton.clients import ServerUnavailableError
    from clip_triton.exporter.base.server import free_port

    store = _store(tmp_path)
    items = [store / GOOD[0], store / "img00001-truncated.jpg", store / GOOD[1], tmp_path / "gone.png",
             store / GOOD[2], store / "img00003-notes.jpg", store / GOOD[3]]
    with ClipClient(url, batch_size=8, concurrency=1) as client:  # the bad ones share a batch with good ones
        seen: list[int] = []
        vectors, kept, rejected = embed_valid(client, items, progress=lambda done, total: seen.append(done))
        want = client.embed_images([items[i] for i in (0, 2, 4, 6)])
    assert kept == [0, 2, 4, 6] and [i for i, _ in rejected] == [1, 3, 5]
    assert rejected[1][1] == "file not found"
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    assert seen == sorted(seen) and seen[-1] == len(items)
    # --preprocess client: the same files are refused here, by the server's own checks, before sending.
    with ClipClient(url, batch_size=8, preprocess="client") as client:
        pixels, kept, rejected = embed_valid(client, items)
    assert kept == [0, 2, 4, 6] and [i for i, _ in rejected] == [1, 3, 5]
    assert "rejected by" not in rejected[0][1] and "rejected by" not in rejected[2][1], rejected
    np.testing.assert_allclose(pixels, want, atol=1e-3)

    # A server that is not there is no file's fault: the run fails, nothing is listed.
    dead = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "embed", str(store), "--out", str(out), "--skip-invalid", "--url", dead, "--retries", "0"
    )
    assert code == 2 and stdout == "" and "unavailable" in stderr, stderr
    assert not (out / REJECTED_NAME).exists()
    with ClipClient(dead, retries=0) as client, pytest.raises(ServerUnavailableError):
        embed_valid(client, items[:1])
