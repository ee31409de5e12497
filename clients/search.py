"""Embed a folder of images once and keep the embeddings next to it, keyed by file and served model."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip_triton.clients._core import ProgressCallback, describe_entry
from clip_triton.clients.errors import ClipClientError
from clip_triton.clients.files import staged_path
from clip_triton.clients.sync import ClipClient

CACHE_NAME = ".clip-triton-cache.npz"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_CACHE_VERSION = 1


SkipCallback = Callable[[Path, str], None]
"""Called as `skipped(path, what)` for an image-named entry that is not a regular file ('a FIFO', ...)."""


def iter_image_files(folder: Path, skipped: SkipCallback | None = None) -> Iterator[Path]:
    """Image files under `folder`, lazily (one folder's listing at a time), hidden files and folders
    skipped, in a deterministic order: each folder's files sorted, then its sub-folders, sorted
    (os.walk's order; symlinked folders are not entered).

    Only regular files (or symlinks to them) are yielded: an image-named FIFO, device, socket or broken
    symlink is never opened, only reported to `skipped`. The listing's file types come from the
    directory entries (no stat per file, except for symlinks)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipClientError(f"{folder} is not a folder")
    yield from _walk(str(folder), skipped)


def _walk(top: str, skipped: SkipCallback | None) -> Iterator[Path]:
    stack = [top]
    while stack:
        root = stack.pop()
        try:
            with os.scandir(root) as listing:
                entries = list(listing)
        except OSError:
            continue  # an unreadable or vanished sub-folder: os.walk's default, skipped
        files: list[os.DirEntry[str]] = []
        dirs: list[os.DirEntry[str]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry)
        for entry in sorted(files, key=lambda e: e.name):
            if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                regular = entry.is_file()
            except OSError:
                regular = False
            if regular:
                yield Path(entry.path)
            elif skipped is not None:
                skipped(Path(entry.path), describe_entry(entry.path))
        # Depth first, sub-folders in sorted order: pushed reversed so the first one is walked next.
        subdirs = sorted(e.name for e in dirs if not e.name.startswith(".") and not e.is_symlink())
        stack.extend(os.path.join(root, name) for name in reversed(subdirs))


def image_files(folder: Path, skipped: SkipCallback | None = None) -> list[Path]:
    """Image files under `folder` (recursive, hidden files and folders skipped), sorted for a stable order."""
    return sorted(iter_image_files(folder, skipped))


def describe_skipped(skipped: list[tuple[Path, str]], folder: Path, limit: int = 3) -> str:
    """'skipped 2 image-named entries that are not regular files: a.jpg (a FIFO), b.png (...)'."""
    shown = ", ".join(f"{_rel(path, folder)} ({what})" for path, what in skipped[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} image-named entr{'y' if len(skipped) == 1 else 'ies'} that are not regular " \
        f"files: {shown}{more}"


def _rel(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


@dataclass
class FolderIndex:
    paths: list[Path]  # absolute-or-as-given paths, aligned with `embeddings`
    embeddings: np.ndarray  # float32 [N, D]
    reused: int  # how many came from the cache
    embedded: int  # how many were sent to the server
    cache_written: bool
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # image-named entries that are not files


_PROBE_TEXT = "clip-triton cache probe: a photo of a cat"


def model_identity(client: ClipClient) -> str:
    """The server's model identity plus a fingerprint of its weights: one probe text's embedding, rounded.

    Names, dims and config parameters alone do not change when the same architecture is redeployed
    with other weights; the probe does. Rounding absorbs run-to-run float noise (a rare miss only re-embeds).
    """
    import hashlib

    probe = np.round(client.embed_texts([_PROBE_TEXT])[0], 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    return hashlib.sha256(client.model_info.identity.encode() + probe.astype(np.float32).tobytes()).hexdigest()


def _key(folder: Path, path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (path.relative_to(folder).as_posix(), stat.st_mtime_ns, stat.st_size)


def _load_cache(cache: Path, identity: str) -> dict[tuple[str, int, int], np.ndarray]:
    if not cache.is_file():
        return {}
    try:
        with np.load(cache, allow_pickle=False) as data:
            if int(data["version"]) != _CACHE_VERSION or str(data["identity"]) != identity:
                return {}  # another model (or cache format): every entry is stale
            names, mtimes, sizes = data["paths"], data["mtimes"], data["sizes"]
            vectors = data["embeddings"].astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - a damaged cache is only a slower run
        print(f"[search] WARNING: ignoring unreadable cache {cache}: {exc}", file=sys.stderr)
        return {}
    return {(str(n), int(m), int(s)): v for n, m, s, v in zip(names, mtimes, sizes, vectors, strict=True)}


def _save_cache(cache: Path, identity: str, keys: list[tuple[str, int, int]], vectors: np.ndarray) -> bool:
    try:
        with staged_path(cache) as tmp, open(tmp, "wb") as handle:  # np.savez would append ".npz" to a path
            np.savez(
                handle,
                version=np.array(_CACHE_VERSION),
                identity=np.array(identity),
                paths=np.array([k[0] for k in keys], dtype=np.str_),
                mtimes=np.array([k[1] for k in keys], dtype=np.int64),
                sizes=np.array([k[2] for k in keys], dtype=np.int64),
                embeddings=vectors.astype(np.float32),
            )
        return True
    except OSError as exc:
        print(f"[search] WARNING: cannot write the cache {cache}: {exc.strerror or exc}", file=sys.stderr)
        return False


def index_folder(
    client: ClipClient, folder: Path, *, use_cache: bool = True, progress: ProgressCallback | None = None
) -> FolderIndex:
    """Embeddings of every image in `folder`, reusing FOLDER/.clip-triton-cache.npz where file and model match."""
    folder = Path(folder)
    skipped: list[tuple[Path, str]] = []
    paths = image_files(folder, lambda path, what: skipped.append((path, what)))
    if not paths:
        names = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ClipClientError(f"no images ({names}) under {folder}{_skipped_note(skipped, folder)}")
    identity = model_identity(client)
    cache = folder / CACHE_NAME
    keys = [_key(folder, p) for p in paths]
    cached = _load_cache(cache, identity) if use_cache else {}
    missing = [i for i, k in enumerate(keys) if k not in cached]
    fresh = client.embed_images([paths[i] for i in missing], progress=progress) if missing else None
    dim = fresh.shape[1] if fresh is not None else len(next(iter(cached.values())))
    vectors = np.empty((len(paths), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        if key in cached:
            vectors[i] = cached[key]
    if fresh is not None:
        vectors[missing] = fresh
    written = False
    if use_cache and (missing or len(cached) != len(keys)):
        written = _save_cache(cache, identity, keys, vectors)
    return FolderIndex(paths, vectors, len(paths) - len(missing), len(missing), written, skipped)


def _skipped_note(skipped: list[tuple[Path, str]], folder: Path) -> str:
    return f" ({describe_skipped(skipped, folder)})" if skipped else ""
