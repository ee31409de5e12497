"""Embed a folder of any size into shard files, resumably: `clip-triton embed FOLDER --out DIR`.

DIR/shard-00000.npy (float32 [n, D]) and DIR/shard-00000.paths.txt (the n image paths, relative to the
folder, one per line) hold each run of `shard_size` images, in the folder's walk order
(search.iter_image_files). DIR/index.json records the folder, the shard size, the served model (its
key: the encoders' checksums) and, per shard, a digest of its input files' names, sizes and mtimes and
the sha256 of each of its two output files.

Memory stays bounded: the folder is walked lazily and one shard's embeddings are held at a time.
Each file is written beside its destination and renamed into place, and a shard enters the index
only after both of its files are in place, so a killed run leaves no half shard. A rerun keeps a
shard only when its input digest still matches and its output files check out (sha256, npy header,
dtype, dim and row count, the paths equal to the folder's); it redoes the rest (the interrupted shard
included), saying which shards were damaged and why.

With `skip_invalid`, a file that fails as its own fault (search.embed_valid: unreadable, vanished, over
the size limits, not an image, truncated, refused by the server with INVALID_ARGUMENT) is left out of its
shard instead of ending the run: the shard's paths file lists only the files embedded, its index entry
lists the files left out (relative path, one-line reason) and DIR/rejected.jsonl gathers them from every
shard, in walk order. Shards are still cut from the folder's files (`shard_size` inputs each) and the
digest still covers every input, so resuming keeps vectors and paths aligned, and a left-out file that
changes (mtime or size) has its shard embedded again.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.clients._core import ModelInfo
from clip_triton.clients.errors import ClipClientError, ModelMismatchError, UsageError
from clip_triton.clients.files import pid_alive, staged_path, write_rejected
from clip_triton.clients.search import IMAGE_SUFFIXES, describe_skipped, embed_valid, iter_image_files, unreadable
from clip_triton.clients.sync import ClipClient

INDEX_NAME = "index.json"
REJECTED_NAME = "rejected.jsonl"  # skip_invalid: {"path": ..., "reason": ...} per file left out
FORMAT = "clip-triton-embeddings"
VERSION = 2  # 2: per-shard sha256 of the output files. A version-1 index is read; its shards are redone.
_READABLE = (1, 2)
DEFAULT_SHARD_SIZE = 10_000
# staged_path's temporary names: .NAME.tmp-PID
_TEMP = re.compile(r"^\.(?:shard-\d+\.(?:npy|paths\.txt)|index\.json|rejected\.jsonl)\.tmp-(\d+)$")
_SHARD = re.compile(r"shard-(\d{5,})")
_SHARD_FILE = re.compile(r"(shard-\d{5,})\.(?:npy|paths\.txt)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_HASHES = ("digest", "npy_sha256", "paths_sha256")

StreamProgress = Callable[[int, int, int], None]
"""Called as `progress(done, total, reused)`: images done (reused ones included) of the folder's total."""
Notice = Callable[[str], None]
"""Called with one line per thing the run found and dealt with (a damaged shard redone, a dropped index
entry, skipped non-regular files); by default each becomes a warnings.warn."""


@dataclass
class StreamResult:
    out: Path
    count: int  # images embedded in DIR's shards: the folder's, less those left out (skip_invalid)
    dim: int
    shards: int
    reused_shards: int  # found done by an earlier run and kept as they were
    embedded: int  # images sent to the server by this run
    damaged: dict[str, str] = field(default_factory=dict)  # shard name -> why its kept files were redone
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # image-named entries that are not files
    # skip_invalid: every file DIR's shards leave out (this run's and kept shards'), as (relative path, reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_now: int = 0  # of those, found by this run


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def iter_shards(out: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(relative paths, float32 [n, D] embeddings) per shard of a finished DIR, in order; one shard in memory.

    Each shard is checked as it is read (the sha256 recorded in the index, its row count): a damaged one
    raises ClipClientError naming it (rerunning the same `clip-triton embed` redoes it)."""
    out = Path(out)
    path = out / INDEX_NAME
    index = _read_index(path, out)
    if not index.get("complete"):
        raise ClipClientError(f"{out} is not finished: run the same `clip-triton embed` again to complete it")
    again = "run the same `clip-triton embed` again to redo it"
    for i, raw in enumerate(index["shards"]):
        problem = _entry_problem(raw)
        if problem is None and raw["name"] != shard_name(i):
            problem = f"entry {i} is {raw['name']}, expected {shard_name(i)}"
        if problem is not None:
            raise ClipClientError(f"{path} is damaged: {problem}; {again}")
    if sum(s["count"] for s in index["shards"]) != index.get("total"):
        raise ClipClientError(f"{path} is damaged: its shards do not add up to its total; {again}")
    for shard in index["shards"]:
        name = shard["name"]
        try:
            text = (out / f"{name}.paths.txt").read_bytes()
            data = (out / f"{name}.npy").read_bytes()
        except OSError as exc:
            raise ClipClientError(f"{out / name} is damaged: {exc.strerror or exc}; {again}") from None
        paths = text.decode("utf-8", errors="replace").splitlines()
        problem = None
        if hashlib.sha256(text).hexdigest() != shard["paths_sha256"]:
            problem = "paths.txt checksum differs from index.json"
        elif hashlib.sha256(data).hexdigest() != shard["npy_sha256"]:
            problem = "npy checksum differs from index.json"
        else:
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
            if not (vectors.ndim == 2 and vectors.shape[0] == len(paths) == shard["count"]):
                problem = f"{vectors.shape[0]} rows, {len(paths)} paths, index.json says {shard['count']}"
        if problem is not None:
            raise ClipClientError(f"{out / name} is damaged ({problem}); {again}")
        yield paths, vectors


def embed_folder(
    client: ClipClient,
    folder: Path,
    out: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: StreamProgress | None = None,
    notice: Notice | None = None,
    skip_invalid: bool = False,
) -> StreamResult:
    """Embed every image under `folder` into shards in `out`, resuming what an earlier run left there.

    `notice(line)` hears of everything found wrong and dealt with: image-named entries that are not
    regular files (skipped), index entries dropped, kept shards whose files are damaged (redone).
    `skip_invalid`: files that fail as their own fault are left out and listed (DIR/rejected.jsonl,
    StreamResult.rejected) instead of ending the run; a strict run (the default) redoes a shard that
    an earlier skip_invalid run left files out of, so it fails on them as a first strict run would."""
    folder, out = Path(folder), Path(out)
    note = notice if notice is not None else _warn
    if not folder.is_dir():
        raise ClipClientError(f"{folder} is not a folder")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    skipped: list[tuple[Path, str]] = []
    # Names only: the count gives progress its ETA. FIFOs, devices and broken symlinks are never opened.
    total = sum(1 for _ in iter_image_files(folder, lambda path, what: skipped.append((path, what))))
    if skipped:
        note(describe_skipped(skipped, folder))
    if total == 0:
        raise ClipClientError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    info = client.model_info
    index, entries = _open_index(out, folder, info, shard_size, note)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    index.update(total=total, complete=False)
    done = reused = embedded = reused_shards = rejected_now = 0
    count = 0
    damaged: dict[str, str] = {}
    for k, paths in enumerate(_batches(iter_image_files(folder), shard_size)):
        count = k + 1
        name = shard_name(k)
        unlisted: dict[int, str] = {}  # skip_invalid: files whose names cannot go in a paths file
        rels = [_relative(folder, p, unlisted if skip_invalid else None, i) for i, p in enumerate(paths)]
        digest = _digest(paths, rels)
        previous = entries.get(name)
        intact = False  # its files check out: they stay listed until the new ones replace them
        if previous is not None and previous["digest"] == digest:
            gone = {r["path"] for r in previous.get("rejected", ())}
            problem = _shard_problem(out, previous, [r for r in rels if r not in gone], info.dim)
            if problem is None and (skip_invalid or not gone):
                done, reused, reused_shards = done + len(paths), reused + len(paths), reused_shards + 1
                if progress is not None:
                    progress(done, total, reused)
                continue
            if problem is not None:
                damaged[name] = problem
                note(f"{name}: damaged ({problem}), embedding again")
            # else a strict run over files an earlier run left out: embedded again, so it fails on them,
            # leaving the shard (a complete one, of the skipping run) listed
            intact = problem is None
        if previous is not None and not intact:  # out of the index first: its files are stale
            del entries[name]
            _write_index(out, index, entries)
        within = None if progress is None else _offset(progress, done, total, reused)
        if skip_invalid:
            vectors, kept, rejected = _embed_skipping(client, paths, unlisted, within)
        else:
            vectors, kept, rejected = client.embed_images(paths, progress=within), list(range(len(paths))), []
        if name in entries:  # its files are about to change: out of the index first
            del entries[name]
            _write_index(out, index, entries)
        kept_rels = [rels[i] for i in kept]
        npy_sha256, paths_sha256 = _write_shard(out, name, vectors, kept_rels)
        entries[name] = {
            "name": name,
            "count": len(kept_rels),
            "digest": digest,
            "first": kept_rels[0] if kept_rels else None,
            "npy_sha256": npy_sha256,
            "paths_sha256": paths_sha256,
        }
        if rejected:
            entries[name]["rejected"] = [{"path": rels[i], "reason": reason} for i, reason in rejected]
        _write_index(out, index, entries)
        done, embedded, rejected_now = done + len(paths), embedded + len(kept_rels), rejected_now + len(rejected)
    # The folder may have shrunk since an earlier run (or the index names shards it never had): drop
    # entries past its end, and their files.
    for name in sorted(n for n in entries if _number(n) >= count):
        note(f"{name}: past the folder's end (it has {count} shard(s) now), removed")
        del entries[name]
    rows = sum(entry["count"] for entry in entries.values())
    left_out = _left_out(entries[n] for n in sorted(entries, key=_number))
    index.update(total=rows, complete=True)
    if left_out:
        index["rejected"] = len(left_out)
    _write_index(out, index, entries)
    _remove_files_past(out, count)
    return StreamResult(
        out, rows, info.dim, count, reused_shards, embedded, damaged, skipped, left_out, rejected_now
    )


def _embed_skipping(
    client: ClipClient, paths: list[Path], unlisted: dict[int, str], progress: Callable[[int, int], None] | None
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """One shard's embeddings with the files that fail as their own fault left out: (vectors, indices
    of the files kept, [(index, reason)] of those left out), in the shard's order."""
    candidates = [i for i in range(len(paths)) if i not in unlisted]
    vectors, kept, bad = embed_valid(client, [paths[i] for i in candidates], progress=progress)
    rejected = sorted([*unlisted.items(), *((candidates[j], reason) for j, reason in bad)])
    return vectors, [candidates[j] for j in kept], rejected


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _offset(progress: StreamProgress, base: int, total: int, reused: int) -> Callable[[int, int], None]:
    """A shard's progress (done of its own items) as the folder's."""
    return lambda done, _shard_total: progress(base + done, total, reused)


def _batches(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    iterator = iter(paths)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _relative(folder: Path, path: Path, unlisted: dict[int, str] | None = None, index: int = 0) -> str:
    """`path` relative to `folder`, for a paths file; a name with a line break cannot go in one: an
    error, or (skipping, `unlisted` given) recorded there by `index` as the file's reason to be left out."""
    rel = path.relative_to(folder).as_posix()
    if "\n" in rel or "\r" in rel:
        if unlisted is None:
            raise ClipClientError(f"cannot list {rel!r} in a paths file: its name has a line break; rename it")
        unlisted[index] = "its name has a line break, which a paths file cannot list; rename it"
    return rel


def _digest(paths: list[Path], rels: list[str]) -> str:
    """Names, sizes and mtimes of a shard's files: a changed or moved file makes its shard be redone.
    A file that cannot be looked at (vanished, no permission) enters as its name and why."""
    h = hashlib.sha256()
    for path, rel in zip(paths, rels, strict=True):
        try:
            st = path.stat()
        except OSError as exc:
            h.update(f"{rel}\0{unreadable(path, exc)}\n".encode())
            continue
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _number(name: str) -> int:
    return int(name.removeprefix("shard-"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _shard_problem(out: Path, entry: dict[str, Any], rels: list[str], dim: int) -> str | None:
    """Why a shard the index lists cannot be kept as it is (one short phrase), or None when its files
    are exactly what was written: npy header, dtype, dim, rows and size, then the paths, then both
    files' sha256 against the index."""
    name = entry["name"]
    if entry["count"] != len(rels):
        return f"index.json says {entry['count']} images, the folder's shard has {len(rels)}"
    npy, txt = out / f"{name}.npy", out / f"{name}.paths.txt"
    for file, what in ((npy, "npy"), (txt, "paths.txt")):
        if not file.exists():
            return f"{what} missing"
        if not file.is_file():
            return f"{what} is not a regular file"
    try:
        with open(npy, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
        size = os.stat(npy).st_size
        raw = txt.read_bytes()
    except OSError as exc:
        return f"{Path(exc.filename or name).name} unreadable: {exc.strerror or exc}"
    except (ValueError, EOFError) as exc:  # numpy's words for a truncated or foreign header
        return f"npy unreadable: {' '.join(str(exc).split())[:120]}"
    if dtype != np.dtype(np.float32) or fortran:
        return f"npy holds {dtype}{' in Fortran order' if fortran else ''}, not float32"
    if len(shape) != 2 or (dim > 0 and shape[1] != dim):
        return f"npy shape is {list(shape)}, expected [{len(rels)}, {dim}]"
    if shape[0] != len(rels):
        return f"npy has {shape[0]} rows, expected {len(rels)}"
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size < expected:
        return f"npy truncated: {size} of {expected} bytes"
    if size > expected:
        return f"npy has {size - expected} bytes past its data"
    if raw != _paths_text(rels):
        listed = raw.decode("utf-8", errors="replace").splitlines()
        if len(listed) != len(rels):
            return f"paths.txt has {len(listed)} line(s), expected {len(rels)}"
        line = next((i for i, (a, b) in enumerate(zip(listed, rels, strict=True)) if a != b), None)
        if line is not None:
            return f"paths.txt line {line + 1} is {listed[line][:80]!r}, expected {rels[line][:80]!r}"
        return "paths.txt differs from the folder's paths (line breaks)"
    if hashlib.sha256(raw).hexdigest() != entry["paths_sha256"]:
        return "paths.txt checksum differs from index.json"
    if _sha256_file(npy) != entry["npy_sha256"]:
        return "npy checksum differs from index.json: replaced or edited"
    return None


def _paths_text(rels: list[str]) -> bytes:
    return "".join(f"{rel}\n" for rel in rels).encode("utf-8")


def _write_shard(out: Path, name: str, vectors: np.ndarray, rels: list[str]) -> tuple[str, str]:
    """Both files of a shard, each renamed into place; returns their sha256 (npy, paths.txt)."""
    with staged_path(out / f"{name}.npy") as tmp:
        with open(tmp, "wb") as handle:  # a handle: np.save adds no suffix
            np.save(handle, vectors.astype(np.float32, copy=False))
        npy_sha256 = _sha256_file(tmp)
    text = _paths_text(rels)
    with staged_path(out / f"{name}.paths.txt") as tmp:
        tmp.write_bytes(text)
    return npy_sha256, hashlib.sha256(text).hexdigest()


def _model_record(info: ModelInfo) -> dict[str, Any]:
    return {"key": info.key, "describe": info.describe(), "image_model": info.image.model, "dim": info.dim}


def _read_index(path: Path, out: Path) -> dict[str, Any]:
    """The index, its top level checked (shard entries are checked by _entry_problem): anything else
    is a one-line ClipClientError (exit 2) rather than a guess at what the damaged index meant."""
    fix = f"remove {out} (or give a new --out) to start again"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClipClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ClipClientError(f"{path} is damaged: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ClipClientError(f"{path} is not a clip-triton embeddings index; {fix}")
    if data.get("version") not in _READABLE:
        raise ClipClientError(f"{path} has version {data.get('version')!r}; this clip-triton reads {_READABLE}")
    model = data.get("model")
    problems = [
        (not isinstance(data.get("folder"), str), "'folder' is not a path"),
        (not _positive_int(data.get("shard_size")), "'shard_size' is not a positive integer"),
        (not isinstance(model, dict), "'model' is not an object"),
        (isinstance(model, dict) and not all(isinstance(model.get(k), str) for k in ("key", "describe")),
         "'model' lacks its key or description"),
        (not isinstance(data.get("shards"), list), "'shards' is not a list"),
        (not isinstance(data.get("complete", False), bool), "'complete' is not true or false"),
    ]
    for bad, what in problems:
        if bad:
            raise ClipClientError(f"{path} is damaged: {what}; {fix}")
    return data


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _entry_problem(raw: Any) -> str | None:
    """Why one `shards` entry of the index cannot be used (it is then dropped), or None."""
    if not isinstance(raw, dict):
        return f"{type(raw).__name__}, not an object"
    name = raw.get("name")
    if not isinstance(name, str) or not _SHARD.fullmatch(name):
        return f"name {name!r} is not a shard name"
    if "npy_sha256" not in raw and "paths_sha256" not in raw:
        return f"{name} has no output checksums (written by an older clip-triton)"
    rejected = raw.get("rejected", [])
    if not isinstance(rejected, list) or not all(
        isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("reason"), str) for r in rejected
    ):
        return f"{name} has a 'rejected' list that is not of {{path, reason}} objects"
    count = raw.get("count")
    if not (_positive_int(count) or (count == 0 and not isinstance(count, bool) and rejected)):
        return f"{name} has no positive image count"
    for key in _ENTRY_HASHES:
        if not isinstance(raw.get(key), str) or not _SHA256.fullmatch(raw[key]):
            return f"{name} has no valid {key}"
    return None


def _open_index(
    out: Path, folder: Path, info: ModelInfo, shard_size: int, note: Notice
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The index of an earlier run into `out` (checked against this one) and its usable shard entries,
    by name; or a fresh index. Entries that cannot be used are dropped, each with a notice."""
    path = out / INDEX_NAME
    source = str(folder.resolve())
    fresh = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "image",
        "folder": source,
        "model": _model_record(info),
        "shard_size": shard_size,
        "shards": [],
    }
    if not path.exists():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UsageError(f"--out {out} holds other files and no {INDEX_NAME}: give a new or empty folder")
        return fresh, {}
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file: give a new or empty --out folder")
    index = _read_index(path, out)
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
    entries: dict[str, dict[str, Any]] = {}
    twice: set[str] = set()
    for i, raw in enumerate(index["shards"]):
        problem = _entry_problem(raw)
        if problem is not None:
            note(f"{INDEX_NAME}: dropping entry {i} ({problem})")
            continue
        name = raw["name"]
        if name in entries or name in twice:
            if name not in twice:
                note(f"{INDEX_NAME}: {name} is listed more than once; dropping it")
            twice.add(name)
            entries.pop(name, None)
            continue
        entries[name] = {k: raw[k] for k in ("name", "count", *_ENTRY_HASHES)} | {"first": raw.get("first")}
        if raw.get("rejected"):
            entries[name]["rejected"] = [{"path": r["path"], "reason": r["reason"]} for r in raw["rejected"]]
    # Rebuilt from the fields this version knows: unknown ones are not carried forward.
    return fresh, entries


def _write_index(out: Path, index: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """The index, then DIR/rejected.jsonl as the files its shards leave out (removed when none do)."""
    index["shards"] = [entries[name] for name in sorted(entries, key=_number)]
    with staged_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    write_rejected(out / REJECTED_NAME, _left_out(index["shards"]))


def _left_out(shards: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(relative path, reason) of every file the shards' entries list as left out, in their order."""
    return [(r["path"], r["reason"]) for shard in shards for r in shard.get("rejected", ())]


def _remove_files_past(out: Path, count: int) -> None:
    """Shard files numbered `count` or more: an earlier run's over a larger folder (not in the index)."""
    for entry in out.iterdir():
        match = _SHARD_FILE.fullmatch(entry.name)
        if match and _number(match.group(1)) >= count and entry.is_file():
            entry.unlink(missing_ok=True)


def _remove_stale_temp_files(out: Path) -> None:
    """Temporary files of a run that was killed (a live run's own are left alone)."""
    for entry in out.iterdir():
        match = _TEMP.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)

