"""Embed a folder of any size into shard files, resumably: `clip-triton embed FOLDER --out DIR`.

DIR/shard-00000.npy (float32 [n, D]) and DIR/shard-00000.paths.txt (the n image paths, relative to the
folder, one per line) hold each run of `shard_size` images, in the folder's walk order
(search.iter_image_files). DIR/index.json records the folder, the shard size, the served model (its
key: the encoders' checksums) and, per shard, a digest of its files' names, sizes and mtimes.

Memory stays bounded: the folder is walked lazily and one shard's embeddings are held at a time.
Each file is written beside its destination and renamed into place, and a shard enters the index
only after both of its files are in place, so a killed run leaves no half shard; a rerun skips the
shards whose digest still matches and redoes the rest (the interrupted shard included).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients._core import ModelInfo
from clients._files import pid_alive, staged_path
from clients.errors import ClipClientError, ModelMismatchError, UsageError
from clients.search import IMAGE_SUFFIXES, iter_image_files
from clients.sync import ClipClient

INDEX_NAME = "index.json"
FORMAT = "clip-triton-embeddings"
VERSION = 1
DEFAULT_SHARD_SIZE = 10_000
# staged_path's temporary names: .NAME.tmp-PID
_TEMP = re.compile(r"^\.(?:shard-\d+\.(?:npy|paths\.txt)|index\.json)\.tmp-(\d+)$")

StreamProgress = Callable[[int, int, int], None]
"""Called as `progress(done, total, reused)`: images done (reused ones included) of the folder's total."""


@dataclass
class StreamResult:
    out: Path
    count: int  # images in the folder, all now embedded
    dim: int
    shards: int
    reused_shards: int  # found done by an earlier run and kept as they were
    embedded: int  # images sent to the server by this run


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def iter_shards(out: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(relative paths, float32 [n, D] embeddings) per shard of a finished DIR, in order; one shard in memory."""
    index = _read_index(Path(out) / INDEX_NAME)
    if not index.get("complete"):
        raise ClipClientError(f"{out} is not finished: run the same `clip-triton embed` again to complete it")
    for shard in index["shards"]:
        paths = (Path(out) / f"{shard['name']}.paths.txt").read_text(encoding="utf-8").splitlines()
        yield paths, np.load(Path(out) / f"{shard['name']}.npy")


def embed_folder(
    client: ClipClient,
    folder: Path,
    out: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: StreamProgress | None = None,
) -> StreamResult:
    """Embed every image under `folder` into shards in `out`, resuming what an earlier run left there."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ClipClientError(f"{folder} is not a folder")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    total = sum(1 for _ in iter_image_files(folder))  # names only: the count gives progress its ETA
    if total == 0:
        raise ClipClientError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    info = client.model_info
    index = _open_index(out, folder, info, shard_size)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    entries: dict[str, dict[str, Any]] = {s["name"]: s for s in index["shards"]}
    index.update(total=total, complete=False)
    done = reused = embedded = reused_shards = 0
    count = 0
    for k, paths in enumerate(_batches(iter_image_files(folder), shard_size)):
        count = k + 1
        name = shard_name(k)
        rels = [_relative(folder, p) for p in paths]
        digest = _digest(paths, rels)
        previous = entries.get(name)
        if previous is not None and previous["digest"] == digest and _shard_files_exist(out, name):
            done, reused, reused_shards = done + len(paths), reused + len(paths), reused_shards + 1
            if progress is not None:
                progress(done, total, reused)
            continue
        if previous is not None:  # its files are about to change: out of the index first
            del entries[name]
            _write_index(out, index, entries)
        within = None if progress is None else _offset(progress, done, total, reused)
        vectors = client.embed_images(paths, progress=within)
        _write_shard(out, name, vectors, rels)
        entries[name] = {"name": name, "count": len(paths), "digest": digest, "first": rels[0]}
        _write_index(out, index, entries)
        done, embedded = done + len(paths), embedded + len(paths)
    # The folder may have shrunk since an earlier run: drop shards past its end.
    for name in [n for n in entries if n >= shard_name(count)]:
        del entries[name]
        for suffix in (".npy", ".paths.txt"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    index.update(total=done, complete=True)
    _write_index(out, index, entries)
    return StreamResult(out, done, info.dim, count, reused_shards, embedded)


def _offset(progress: StreamProgress, base: int, total: int, reused: int) -> Callable[[int, int], None]:
    """A shard's progress (done of its own items) as the folder's."""
    return lambda done, _shard_total: progress(base + done, total, reused)


def _batches(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    iterator = iter(paths)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _relative(folder: Path, path: Path) -> str:
    rel = path.relative_to(folder).as_posix()
    if "\n" in rel or "\r" in rel:
        raise ClipClientError(f"cannot list {rel!r} in a paths file: its name has a line break; rename it")
    return rel


def _digest(paths: list[Path], rels: list[str]) -> str:
    """Names, sizes and mtimes of a shard's files: a changed or moved file makes its shard be redone."""
    h = hashlib.sha256()
    for path, rel in zip(paths, rels, strict=True):
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _shard_files_exist(out: Path, name: str) -> bool:
    return (out / f"{name}.npy").is_file() and (out / f"{name}.paths.txt").is_file()


def _write_shard(out: Path, name: str, vectors: np.ndarray, rels: list[str]) -> None:
    with staged_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as handle:  # a handle: np.save adds no suffix
        np.save(handle, vectors.astype(np.float32, copy=False))
    with staged_path(out / f"{name}.paths.txt") as tmp:
        tmp.write_text("".join(f"{rel}\n" for rel in rels), encoding="utf-8")


def _model_record(info: ModelInfo) -> dict[str, Any]:
    return {"key": info.key, "describe": info.describe(), "image_model": info.image.model, "dim": info.dim}


def _read_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipClientError(f"cannot read {path}: {exc}; remove its folder to start again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ClipClientError(f"{path} is not a clip-triton embeddings index (version {VERSION})")
    return data


def _open_index(out: Path, folder: Path, info: ModelInfo, shard_size: int) -> dict[str, Any]:
    """The index of an earlier run into `out` (checked against this one), or a fresh one."""
    path = out / INDEX_NAME
    source = str(folder.resolve())
    if not path.is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UsageError(f"--out {out} holds other files and no {INDEX_NAME}: give a new or empty folder")
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": "image",
            "folder": source,
            "model": _model_record(info),
            "shard_size": shard_size,
            "shards": [],
        }
    index = _read_index(path)
    if index["model"]["key"] != info.key:
        raise ModelMismatchError(
            f"{out} holds embeddings of {index['model']['describe']} but the server serves {info.describe()}: "
            "resume against the same model, or write to a new --out"
        )
    if index["shard_size"] != shard_size:
        raise UsageError(
            f"{out} was written with --shard-size {index['shard_size']}: resume with it, or write to a new --out"
        )
    if index["folder"] != source:
        raise UsageError(f"{out} holds embeddings of {index['folder']}, not {source}: write to a new --out")
    return index


def _write_index(out: Path, index: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    index["shards"] = [entries[name] for name in sorted(entries)]
    with staged_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _remove_stale_temp_files(out: Path) -> None:
    """Temporary files of a run that was killed (a live run's own are left alone)."""
    for entry in out.iterdir():
        match = _TEMP.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)

