"""Embed a folder of images once and keep the embeddings next to it, keyed by file and served model."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip_triton.clients._core import ProgressCallback, describe_entry, path_problem
from clip_triton.clients.errors import ClipClientError, ItemError
from clip_triton.clients.files import one_line, staged_path, write_rejected
from clip_triton.clients.sync import ClipClient

CACHE_NAME = ".clip-triton-cache.npz"
REJECTED_NAME = ".clip-triton-rejected.jsonl"  # `search --skip-invalid`: the files it left out, and why
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
    shown = ", ".join(f"{relative(path, folder)} ({what})" for path, what in skipped[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} image-named entr{'y' if len(skipped) == 1 else 'ies'} that are not regular " \
        f"files: {shown}{more}"


def relative(path: Path, folder: Path) -> str:
    """`path` as seen from `folder` (posix), or as given when it is not under it."""
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
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # skip_invalid: files left out, and why
    rejected_file: Path | None = None  # where they are listed (None: none, or the list could not be written)


# ---------------------------------------------------------------------------------------------- skipping


def embed_valid(
    client: ClipClient, paths: Sequence[Path], *, progress: ProgressCallback | None = None
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Embed `paths`, leaving out each file that fails as the item's own fault: (float32 [k, D] of the
    files kept, their indices into `paths`, [(index, reason)] of the files left out), in input order.

    An item's fault is an ItemError: a file that cannot be read (gone, no permission, not a regular
    file), is over the size limits, or that the server refuses with INVALID_ARGUMENT (not an image,
    truncated, corrupt; the client already sends a rejected batch again item by item to name the item).
    Everything else (server down, timeouts, server faults) is raised as from `embed_images`.

    The paths go in windows of a few requests per endpoint; a rejection costs one window sent again
    without the item, never the whole list."""
    opts = client.options
    window = max(64, 4 * opts.batch_size * opts.concurrency * len(opts.urls))
    rows: list[np.ndarray] = []
    kept: list[int] = []
    rejected: list[tuple[int, str]] = []
    high = 0  # progress never goes back when a window is sent again

    def report(base: int) -> ProgressCallback:
        def within(done: int, _total: int) -> None:
            nonlocal high
            high = max(high, min(base + done, len(paths)))
            if progress is not None:
                progress(high, len(paths))

        return within

    for start in range(0, len(paths), window):
        pending = list(range(start, min(start + window, len(paths))))
        size = len(pending)
        while pending:
            base = start + size - len(pending)  # the window's rejected items count as done
            try:
                vectors = client.embed_images([paths[i] for i in pending], progress=report(base))
            except ItemError as err:  # not ServerFaultError: that is the server's, and ends the run
                if not 0 <= err.index < len(pending):
                    raise
                rejected.append((pending.pop(err.index), one_line(err.reason)))
                continue
            rows.append(vectors)
            kept.extend(pending)
            break
    if progress is not None and high < len(paths):
        progress(len(paths), len(paths))
    rejected.sort()
    dim = max(client.model_info.dim, 0)
    return (np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)), kept, rejected


def unreadable(path: Path, exc: OSError) -> str:
    """Why a file listed a moment ago cannot be looked at now (vanished, no permission): one line."""
    return path_problem(path) or f"cannot read: {exc.strerror or exc}"


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
    client: ClipClient,
    folder: Path,
    *,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
    skip_invalid: bool = False,
) -> FolderIndex:
    """Embeddings of every image in `folder`, reusing FOLDER/.clip-triton-cache.npz where file and model match.

    `skip_invalid`: a file that fails as the item's own fault (embed_valid) is left out instead of ending
    the run, and listed with its reason in FOLDER/.clip-triton-rejected.jsonl (rewritten by each such run;
    removed when nothing was left out). Left-out files are not cached: the next run tries them again."""
    folder = Path(folder)
    skipped: list[tuple[Path, str]] = []
    paths = image_files(folder, lambda path, what: skipped.append((path, what)))
    if not paths:
        names = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ClipClientError(f"no images ({names}) under {folder}{_skipped_note(skipped, folder)}")
    identity = model_identity(client)
    cache = folder / CACHE_NAME
    rejected: list[tuple[Path, str]] = []
    if skip_invalid:
        keys, listed = [], []
        for path in paths:
            try:
                keys.append(_key(folder, path))
                listed.append(path)
            except OSError as exc:  # vanished since the listing, or a folder we may not enter
                rejected.append((path, unreadable(path, exc)))
        paths = listed
    else:
        keys = [_key(folder, p) for p in paths]
    cached = _load_cache(cache, identity) if use_cache else {}
    missing = [i for i, k in enumerate(keys) if k not in cached]
    fresh = None
    if missing and skip_invalid:
        fresh, kept, bad = embed_valid(client, [paths[i] for i in missing], progress=progress)
        rejected += [(paths[missing[j]], reason) for j, reason in bad]
        gone = {missing[j] for j, _ in bad}
        missing = [missing[j] for j in kept]
        paths, keys, missing = _without(gone, paths, keys, missing)
    elif missing:
        fresh = client.embed_images([paths[i] for i in missing], progress=progress)
    if fresh is not None:
        dim = fresh.shape[1]
    else:  # everything from the cache (or, skipping, nothing left at all)
        dim = len(next(iter(cached.values()))) if cached else max(client.model_info.dim, 0)
    vectors = np.empty((len(paths), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        if key in cached:
            vectors[i] = cached[key]
    if fresh is not None:
        vectors[missing] = fresh
    written = False
    if use_cache and (missing or len(cached) != len(keys)):
        written = _save_cache(cache, identity, keys, vectors)
    index = FolderIndex(paths, vectors, len(paths) - len(missing), len(missing), written, skipped)
    if skip_invalid:
        index.rejected = sorted(rejected, key=lambda r: r[0])  # image_files' order
        index.rejected_file = _save_rejected(folder / REJECTED_NAME, folder, index.rejected)
    return index


def _without(
    gone: set[int], paths: list[Path], keys: list[tuple[str, int, int]], missing: list[int]
) -> tuple[list[Path], list[tuple[str, int, int]], list[int]]:
    """The lists with the items numbered in `gone` left out, `missing` renumbered to match."""
    if not gone:
        return paths, keys, missing
    new: dict[int, int] = {}  # old number -> new
    for i in range(len(paths)):
        if i not in gone:
            new[i] = len(new)
    return [paths[i] for i in new], [keys[i] for i in new], [new[i] for i in missing]


def _save_rejected(dest: Path, folder: Path, rejected: list[tuple[Path, str]]) -> Path | None:
    try:
        return dest if write_rejected(dest, [(relative(path, folder), why) for path, why in rejected]) else None
    except OSError as exc:
        print(f"[search] WARNING: cannot write the list of skipped files {dest}: {exc.strerror or exc}",
              file=sys.stderr)
        return None


def _skipped_note(skipped: list[tuple[Path, str]], folder: Path) -> str:
    return f" ({describe_skipped(skipped, folder)})" if skipped else ""
