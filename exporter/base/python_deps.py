"""The python models' wheels, fetched at build time and carried inside the repository (docs/deploy.md).

Each python model gets `<model>/1/deps/`: its packages (and their dependencies) installed from
the package index for the target container's Python and platform, pinned to the versions this
environment runs (the ones the parity tests passed with: Pillow's resampling and the tokenizers
must be the same code in the server as here). `bundled_deps.py`, copied beside each model.py,
puts the folder first on sys.path and refuses, in one line, a server whose Python is not the one
the wheels were built for. numpy is left out: the python backend itself needs it, so every Triton
container ships it, and a second copy would shadow the one the backend's tensors use.

Why a folder on sys.path and not the python backend's EXECUTION_ENV_PATH: a packed environment
is a whole conda interpreter (hundreds of MB, conda-pack at build time, made on the target
platform), is unpacked per model at every load, and its Python must still match the stub's. A
folder of wheels for the container's own Python is made from any machine with pip, costs only the
packages, and is read in place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.releases import TritonRelease

DEPS_DIR = "deps"
DEPS_RECORD = "DEPS.json"
# What every Triton container's python backend already provides (see the module docstring).
PROVIDED = ("numpy",)
# glibc of each Ubuntu base: wheels for any manylinux up to it run there.
GLIBC = {"22.04": 35, "24.04": 39}
ARCHES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class Target:
    """Where the wheels will run: the container's python3 X.Y and its manylinux platform."""

    python: str
    glibc: int
    arch: str = "x86_64"

    @classmethod
    def for_release(cls, release: TritonRelease, python: str | None = None, arch: str = "x86_64") -> Target:
        if arch not in ARCHES:
            raise ClipTritonError(f"--deps-arch must be one of {', '.join(ARCHES)}, not {arch!r}")
        if python is not None and not _is_xy(python):
            raise ClipTritonError(f"--deps-python must be a Python version X.Y, not {python!r}")
        return cls(python or release.python, GLIBC.get(release.ubuntu, min(GLIBC.values())), arch)

    def platforms(self) -> list[str]:
        """pip's --platform values: every manylinux tag this glibc runs (pip does not expand them itself)."""
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(self.glibc, 16, -1)]
        return [*tags, f"manylinux2014_{self.arch}"]


def _is_xy(version: str) -> bool:
    parts = version.split(".")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _version(name: str) -> str | None:
    """The version installed here, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def pins(packages: list[str]) -> list[str]:
    """`name==version` for each package, as installed here (the versions the tests ran)."""
    out = []
    for name in sorted(set(packages)):
        version = _version(name)
        if version is None:
            raise ClipTritonError(
                f"cannot pin {name!r} for the repository: it is not installed in this environment "
                "(install it, or write the repository with --no-python-deps)"
            )
        out.append(f"{name}=={version}")
    return out


def _constraints() -> list[str]:
    # Resolve against the numpy the backend will provide (the one tested here), then leave it out.
    return [f"{name}=={version}" for name in PROVIDED if (version := _version(name))]


def _cache_dir() -> Path:
    from clip_triton.exporter.base.server import cache_root

    return cache_root() / "python-deps"


def fetch(requirements: list[str], target: Target) -> Path:
    """A folder with `requirements` and their dependencies installed for `target` (cached by key)."""
    constraints = _constraints()
    key_text = json.dumps([requirements, constraints, target.python, target.glibc, target.arch])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = _cache_dir()
    dest = root / f"py{target.python}-{target.arch}-{key}"
    if (dest / DEPS_RECORD).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".deps-", dir=root))
    try:
        work = tmp / "deps"
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=tmp, delete=False) as fh:
            fh.write("\n".join(constraints) + "\n")
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
            "--no-compile", "--target", str(work), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", target.python, "--constraint", fh.name,
            *[arg for tag in target.platforms() for arg in ("--platform", tag)],
            *requirements,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            last = lines[-1] if lines else f"pip exited {proc.returncode}"
            raise ClipTritonError(
                f"could not fetch the python models' wheels ({' '.join(requirements)}) for Python "
                f"{target.python} {target.arch}: {last.strip()} (the pins are the versions tested here: choose "
                "a --triton-release whose Python they support, or --no-python-deps and install them yourself)"
            )
        for name in PROVIDED:
            _remove_distribution(work, name)
        shutil.rmtree(work / "bin", ignore_errors=True)  # console scripts: never run inside Triton
        record = {
            "python": target.python,
            "platforms": target.platforms()[:1] + target.platforms()[-1:],
            "arch": target.arch,
            "requirements": requirements,
            "packages": installed_packages(work),
            "provided_by_the_container": list(PROVIDED),
        }
        (work / DEPS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _world_readable(work)  # repositories hard-link these files: KServe runs Triton as uid 1000
        try:
            work.rename(dest)
        except OSError:
            if not (dest / DEPS_RECORD).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _world_readable(root: Path) -> None:
    """Folders 0755, files readable by all and writable by the owner only (x bits kept), whatever the umask."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(0o755 if path.is_dir() else (mode & 0o711) | 0o644)


def _remove_distribution(site: Path, name: str) -> None:
    """Delete an installed distribution (its files per RECORD, its .libs, its dist-info) from `site`."""
    for info in site.glob("*.dist-info"):
        if info.name.split("-")[0].lower().replace("_", "-") != name:
            continue
        top = (info / "top_level.txt").read_text().split() if (info / "top_level.txt").is_file() else [name]
        for package in {*top, name}:
            shutil.rmtree(site / package, ignore_errors=True)
            shutil.rmtree(site / f"{package}.libs", ignore_errors=True)
        shutil.rmtree(info, ignore_errors=True)


def installed_packages(site: Path) -> dict[str, str]:
    """name -> version of every distribution installed in `site`."""
    found = {}
    for info in sorted(site.glob("*.dist-info")):
        meta = md.Distribution.at(info).metadata
        found[str(meta["Name"]).lower()] = str(meta["Version"])
    return found


def place(cached: Path, version_dir: Path) -> dict[str, str]:
    """Put the cached folder into a model's version folder as `deps/` (hard links where possible,
    nothing is edited in place); returns its packages."""
    dest = version_dir / DEPS_DIR

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(cached, dest, copy_function=link, symlinks=True)
    return dict(json.loads((dest / DEPS_RECORD).read_text())["packages"])
