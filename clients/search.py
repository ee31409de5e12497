"""Embed a folder of images once and keep the embeddings next to it, keyed by file and served model."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients._core import ProgressCallback
from clients._files import staged_path
from clients.errors import ClipClientError
from clients.sync import ClipClient

CACHE_NAME = ".clip-triton-cache.npz"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_CACHE_VERSION = 1


def iter_image_files(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, lazily (one folder's listing at a time), hidden files and folders
    skipped, in a deterministic order: each folder's files sorted, then its sub-folders, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipClientError(f"{folder} is not a folder")
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, hidden files and folders skipped), sorted for a stable order."""
    return sorted(iter_image_files(folder))


@dataclass
class FolderIndex:
    paths: list[Path]  # absolute-or-as-given paths, aligned with `embeddings`
    embeddings: np.ndarray  # float32 [N, D]
    reused: int  # how many came from the cache
    embedded: int  # how many were sent to the server
    cache_written: bool


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
    paths = image_files(folder)
    if not paths:
        raise ClipClientError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
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
    return FolderIndex(paths, vectors, len(paths) - len(missing), len(missing), written)
