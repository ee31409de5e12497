"""Small pieces every stage shares: user-facing errors, progress lines, atomic output folders."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from clip_triton.clients.files import staged_path

# The python-backend sources copied into every repository (model_repository/ in the source tree).
# A wheel ships them inside the package, as clip_triton/exporter/model_repository (pyproject's package-dir).
_EXPORTER = Path(__file__).resolve().parents[1]
_PACKAGED_SOURCES = _EXPORTER / "model_repository"
REPOSITORY_SOURCES = _PACKAGED_SOURCES if _PACKAGED_SOURCES.is_dir() else _EXPORTER.parent / "model_repository"


class ClipTritonError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2


class MissingDependencyError(ClipTritonError):
    """A needed package or device is absent (TensorRT, a GPU): exit code 3."""

    exit_code = 3


def os_error_message(exc: OSError) -> str:
    """One line for a failed file operation (a full disk above all), naming the path."""
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}; free some space and run again (nothing was left half-written)"
    return f"{exc.strerror or exc}{where}"


INT32_MAX = 2**31 - 1  # the protobuf int32 fields of a Triton config (max_batch_size, instance counts)


def check_number(
    flag: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    off: float | None = None,
    note: str = "",
) -> None:
    """Refuse a numeric option that is NaN, infinite or outside [low, high] (`above`: low itself is
    refused too). `off` is accepted besides (0: the limit is off). One line, exit 2; None passes (unset)."""
    if value is None or (off is not None and value == off):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClipTritonError(f"{flag} must be a number, got {value!r}")
    if math.isfinite(value) and (low is None or value > low or (value == low and not above)):
        if high is None or value <= high:
            return

    def text(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    span = " and ".join(
        ([f"{'>' if above else '>='} {text(low)}"] if low is not None else [])
        + ([f"<= {text(high)}"] if high is not None else [])
    )
    why = note or (f"{text(off)} turns the limit off" if off is not None else "")
    kind = "a finite number " if isinstance(value, float) else ""
    raise ClipTritonError(f"{flag} must be {kind}{span}{f' ({why})' if why else ''}, got {value}")


def check_min_cosine(flag: str, value: float) -> None:
    """A stage gate's threshold: a cosine in (0, 1] (NaN fails too); one line, exit 2."""
    if not 0.0 < value <= 1.0:
        raise ClipTritonError(f"{flag} must be in (0, 1], got {value}")


class ParityError(ClipTritonError):
    """A stage's outputs drifted from the PyTorch reference beyond its tolerance."""

    exit_code = 1


def repository_common_module(name: str) -> ModuleType:
    """model_repository/common/<name>.py, imported once by path.

    The folder is copied into Triton models as loose files (their model.py imports it as a top-level
    module), so it is not a package; loading it here lets the exporter run the very code Triton runs.
    """
    qualified = f"clip_triton_model_common.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    path = REPOSITORY_SOURCES / "common" / f"{name}.py"
    if not path.is_file():
        raise ClipTritonError(f"{path} is missing: a broken clip-triton install")
    spec = importlib.util.spec_from_file_location(qualified, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


class Progress:
    """Step lines on stderr (`[export] image tower -> ONNX ... done in 3.1s`); silent when quiet."""

    def __init__(self, stage: str, quiet: bool = False) -> None:
        self.stage = stage
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.stage}] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        # Warnings are shown even when quiet: they are about correctness, not progress.
        print(f"[{self.stage}] WARNING: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        start = time.perf_counter()
        self.info(f"{message} ...")
        yield
        self.info(f"{message}: done in {time.perf_counter() - start:.1f}s")


def check_writable_parent(dest: Path) -> None:
    parent = dest.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ClipTritonError(f"cannot write to {dest}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ClipTritonError(f"cannot write to {dest}: {parent} is not writable")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_permissions(root: Path) -> None:
    """Give a staged output the modes a plain mkdir/open would have (0777/0666 less the umask).

    mkdtemp/mkstemp create 0700/0600, which would leak into the result: Triton in KServe runs as
    uid 1000 and must read every file a user deploys.
    """
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else 0o666 | (path.stat().st_mode & 0o111)
        os.chmod(path, mode & ~mask)


def _rename_no_replace(src: Path, dest: Path) -> None:
    """rename(2) `src` onto `dest`, refusing if `dest` appeared meanwhile (another run finished first).

    A folder renames onto a missing or empty folder only, so between two concurrent runs exactly one
    wins; the loser gets a clear error instead of silently replacing the winner's output.
    """
    try:
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(errno.EEXIST, "exists", str(dest))
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise ClipTritonError(
            f"{dest} was written by another run while this one worked; nothing replaced "
            "(pass --force to replace it)"
        ) from exc


@contextlib.contextmanager
def staged_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; move it into place only if the block succeeds.

    A failure (or Ctrl-C) leaves `dest` exactly as it was: never a half-written output. Without
    `force`, the move refuses (atomically) an output another run put in place meanwhile.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        if not dest.is_dir() or any(dest.iterdir()):
            raise ClipTritonError(f"{dest} already exists; pass --force to replace it")
    check_writable_parent(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        if not force:
            _rename_no_replace(tmp, dest)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: Path, dest: Path, copy: bool = False) -> None:
    """Place a model file at `dest`: a hard link when `src` is on the same filesystem, else a copy.

    Encoders run to gigabytes (ViT-bigG is ~10 GB in FP32), so a repository beside its export costs no
    extra disk. Safe because no stage edits a file in place: every writer here replaces files atomically
    (staged_file / staged_dir), which leaves the other name holding the old contents.
    """
    if not copy:
        try:
            os.link(src, dest)
            return
        except OSError:  # another filesystem, or one without hard links
            pass
    shutil.copy2(src, dest)


# A temporary path beside `dest` that replaces it only if the block succeeds: the client library's
# (clients/files.py), which stands alone, so the one implementation lives there.
staged_file = staged_path


def release_memory() -> None:
    """Hand freed memory back to the OS: a garbage collection, then glibc's `malloc_trim(0)`.

    A large model's weights are thousands of allocations; once dropped, glibc keeps many of their
    pages in its arenas, and the next step's peak (an ONNX Runtime session, the next tower) would
    stack on top of them. A no-op where the C library has no malloc_trim (musl, macOS).
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
