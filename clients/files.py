"""Writing the client's outputs: never half a file (the client library does not import `exporter`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clip_triton.clients.errors import UsageError


def check_writable_parent(dest: Path) -> None:
    """Fail before the requests are sent when `dest` cannot be written."""
    parent = Path(dest).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {dest}: {parent} is not a writable folder")


@contextmanager
def staged_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` that replaces it only when the block succeeds (the exporter's
    atomic writes use it too: clip_triton.exporter.base.common.staged_file)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def one_line(text: str) -> str:
    """`text` with every run of whitespace (line breaks included) as one space."""
    return " ".join(str(text).split())


def write_rejected(dest: Path, rejected: Iterable[tuple[str, str]]) -> bool:
    """The files a `--skip-invalid` run left out, as JSON lines `{"path": ..., "reason": ...}` (a path
    relative to the folder, a one-line reason), replacing `dest` whole; with none, `dest` is removed.
    Returns whether the file now exists."""
    lines = [
        json.dumps({"path": path, "reason": one_line(reason)}, ensure_ascii=False) + "\n" for path, reason in rejected
    ]
    if not lines:
        Path(dest).unlink(missing_ok=True)
        return False
    with staged_path(dest) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a temp file or shared-memory region whose writer died is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0
