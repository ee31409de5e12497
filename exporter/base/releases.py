"""NVIDIA's Triton container releases: the TensorRT, Python, CUDA and NVIDIA driver floor of each
(docs/releases.md).

One table, three users: `clip-triton repository` (and `build`) picks the release, fetches the python
models' wheels for its Python and records it; `clip-triton deploy` names the matching image; the
repository README says it. The rule (`choose_release`): an explicit --triton-release; else the release
shipping the engines' TensorRT (a plan runs only on the TensorRT version that built it); else the
newest release whose driver floor is at most --min-driver (default DEFAULT_MIN_DRIVER, R570: 25.03).
Sources, per row, and what could not be verified: docs/releases.md. Releases 25.04 ... 26.08 are
listed with their verified tritonserver / Python / Ubuntu but no TensorRT (not confirmed): engines
never match them; rows whose driver floor is unknown (None) are used only when asked for by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import Manifest

IMAGE = "nvcr.io/nvidia/tritonserver"


def major_minor(version: str) -> str:
    """"10.9.0.34" -> "10.9": plans need the same TensorRT; a release is matched on major.minor."""
    return ".".join(version.split(".")[:2])


@dataclass(frozen=True)
class TritonRelease:
    release: str  # YY.MM, the container tag without "-py3"
    triton: str  # tritonserver version inside it
    tensorrt: str | None  # TensorRT version it ships (None: not confirmed by a source, docs/releases.md)
    python: str  # the container's python3 X.Y (the python backend stub is built for it)
    ubuntu: str
    cuda: str | None = None  # the CUDA its release notes name (None: not retrieved)
    # The oldest NVIDIA driver branch it runs on without the forward-compatibility package (None: unknown;
    # such a row is never picked by --min-driver). docs/releases.md says which floors are read, derived or inferred.
    driver: int | None = None

    @property
    def image(self) -> str:
        return f"{IMAGE}:{self.release}-py3"

    @property
    def driver_note(self) -> str:
        """E.g. "NVIDIA driver R570 or newer (CUDA 12.8.1.012)"; says so when the floor is not known."""
        cuda = f"CUDA {self.cuda}" if self.cuda else "CUDA not confirmed"
        if self.driver is None:
            return f"NVIDIA driver floor not confirmed ({cuda}; docs/releases.md)"
        return f"NVIDIA driver R{self.driver} or newer ({cuda})"

    @property
    def tensorrt_major_minor(self) -> str | None:
        return major_minor(self.tensorrt) if self.tensorrt else None


# Oldest first; docs/releases.md gives each row's sources and what is unverified. tritonserver
# version: build.py's TRITON_VERSION_MAP / DEFAULT_TRITON_VERSION_MAP on the r<YY.MM> branch of
# triton-inference-server/server. Python and Ubuntu: that branch's build.py (ubuntu:22.04 -> 24.04
# from r24.11, PR #7783) and qa/L0_backend_python/test.sh, which asserts `python3 --version` (3.10
# through r24.10, 3.12 from r24.11). TensorRT: kept from the original table; NVIDIA's release-note
# component lists were not readable in the copies searched, so only some rows are corroborated.
# CUDA: the release notes' "Driver Requirements" paragraph (rel-YY-MM). driver: that paragraph's
# "requires NVIDIA Driver release N or later" where read, else the driver branch of the row's CUDA
# minor, else (CUDA not retrieved) the higher floor of the two neighbouring rows; None: unknown.
RELEASES: tuple[TritonRelease, ...] = (
    TritonRelease("24.08", "2.49.0", "10.3.0.26", "3.10", "22.04", "12.6", 560),
    TritonRelease("24.09", "2.50.0", "10.4.0.26", "3.10", "22.04", None, 560),  # between two CUDA 12.6 rows
    TritonRelease("24.10", "2.51.0", "10.5.0.18", "3.10", "22.04", "12.6.2", 560),
    TritonRelease("24.11", "2.52.0", "10.6.0.26", "3.12", "24.04", None, 570),  # first Ubuntu 24.04 release
    TritonRelease("24.12", "2.53.0", "10.7.0.23", "3.12", "24.04", None, 570),
    TritonRelease("25.01", "2.54.0", "10.8.0.43", "3.12", "24.04", None, 570),
    TritonRelease("25.02", "2.55.0", "10.8.0.43", "3.12", "24.04", "12.8.0.38", 570),
    TritonRelease("25.03", "2.56.0", "10.9.0.34", "3.12", "24.04", "12.8.1.012", 570),
    # TensorRT unconfirmed from here on (docs/releases.md); 25.08+ are CUDA 13.
    TritonRelease("25.04", "2.57.0", None, "3.12", "24.04", "12.9.0", 575),
    TritonRelease("25.05", "2.58.0", None, "3.12", "24.04", None, 575),  # between two CUDA 12.9 rows
    TritonRelease("25.06", "2.59.0", None, "3.12", "24.04", "12.9.1.010", 575),
    TritonRelease("25.07", "2.59.1", None, "3.12", "24.04", None, 580),
    TritonRelease("25.08", "2.60.0", None, "3.12", "24.04", "13.0.0.044", 580),
    TritonRelease("25.09", "2.61.0", None, "3.12", "24.04", None, 580),  # between two CUDA 13.0 rows
    TritonRelease("25.10", "2.62.0", None, "3.12", "24.04", "13.0.2.006", 580),
    # CUDA 13.0 ... 13.4 and no driver floor found: used only when asked for by --triton-release.
    TritonRelease("25.11", "2.63.0", None, "3.12", "24.04"),
    TritonRelease("25.12", "2.64.0", None, "3.12", "24.04"),
    TritonRelease("26.01", "2.65.0", None, "3.12", "24.04"),
    TritonRelease("26.02", "2.66.0", None, "3.12", "24.04"),
    TritonRelease("26.03", "2.67.0", None, "3.12", "24.04"),
    TritonRelease("26.04", "2.68.0", None, "3.12", "24.04"),
    TritonRelease("26.05", "2.69.0", None, "3.12", "24.04"),
    TritonRelease("26.06", "2.70.0", None, "3.12", "24.04", "13.3.0"),
    TritonRelease("26.07", "2.71.0", None, "3.12", "24.04"),
    TritonRelease("26.08", "2.72.0", None, "3.12", "24.04", "13.4.1"),
)

# The driver branch a cluster is assumed to have when --min-driver is not given: R570 (a production
# branch of 2025; docs/releases.md, "Which release"). It picks 25.03, the newest release with a
# confirmed TensorRT. A cluster on R580 passes --min-driver 580; one on R535/R550 cannot run any row
# (the oldest needs R560) without NVIDIA's forward-compatibility package: --triton-release then.
DEFAULT_MIN_DRIVER = 570


def parse_driver(value: int | str) -> int:
    """The driver branch of "570", "R570" or a full version "570.124.06" -> 570; a one-line error otherwise."""
    text = str(value).strip()
    match = re.fullmatch(r"[rR]?(\d{3,4})(?:\.\d+){0,2}", text)
    if not match:
        raise ClipTritonError(
            f"--min-driver must be an NVIDIA driver branch such as 570 or 580.65.06 (`nvidia-smi` shows it), "
            f"got {text!r}"
        )
    return int(match.group(1))


def release_for_driver(driver: int | str) -> TritonRelease:
    """The newest release whose known driver floor is at most `driver`; a one-line error if none is."""
    branch = parse_driver(driver)
    rows = [r for r in RELEASES if r.driver is not None and r.driver <= branch]
    if rows:
        return rows[-1]
    oldest = min((r for r in RELEASES if r.driver is not None), key=lambda r: r.driver or 0)
    raise ClipTritonError(
        f"no Triton release in exporter/base/releases.py is known to run on NVIDIA driver R{branch}: the oldest, "
        f"{oldest.release}, needs R{oldest.driver}; upgrade the driver, or (data-center GPUs) install NVIDIA's "
        "CUDA forward-compatibility package and pass --triton-release YY.MM (docs/releases.md)"
    )


# Used when no engine pins the release and no --min-driver is given.
DEFAULT_RELEASE = release_for_driver(DEFAULT_MIN_DRIVER)


def get_release(release: str) -> TritonRelease:
    """The row for a YY.MM tag; a one-line error naming the known ones otherwise."""
    tag = release.removesuffix("-py3")
    for row in RELEASES:
        if row.release == tag:
            return row
    known = ", ".join(r.release for r in RELEASES)
    raise ClipTritonError(f"unknown Triton release {release!r}; known: {known}")


def release_for_tensorrt(version: str) -> TritonRelease | None:
    """The container to serve plans built with TensorRT `version`: the same full version if a
    release ships it, else the newest release with the same major.minor; None if none does."""
    exact = [r for r in RELEASES if r.tensorrt == version]
    if exact:
        return exact[-1]
    same = [r for r in RELEASES if r.tensorrt_major_minor == major_minor(version)]
    return same[-1] if same else None


def engines_tensorrt(manifest: Manifest) -> str | None:
    """The TensorRT version that built this export's plans (None: no engines)."""
    engines = manifest.engines or {}
    trt = engines.get("tensorrt") or manifest.versions.get("tensorrt")
    return trt if isinstance(trt, str) else None


def choose_release(
    manifest: Manifest, requested: str | None = None, min_driver: int | str | None = None
) -> tuple[TritonRelease, str]:
    """The Triton container a repository is written for, and why (one phrase, for the progress line and the
    README): `requested`, else the release shipping the engines' TensorRT, else the newest release whose
    driver floor is at most `min_driver` (default DEFAULT_MIN_DRIVER). A request, or engines, that need a
    newer driver than an explicit `min_driver` are refused, as is a request that contradicts the engines;
    engines whose TensorRT no confirmed release ships need a request (docs/releases.md)."""
    branch = parse_driver(min_driver) if min_driver is not None else None
    trt = engines_tensorrt(manifest)
    matched = release_for_tensorrt(trt) if trt else None
    if requested:
        row = get_release(requested)
        if trt and row.tensorrt is not None and row.tensorrt_major_minor != major_minor(trt):
            raise ClipTritonError(
                f"Triton {row.release} ships TensorRT {row.tensorrt}, but the engines were built with TensorRT "
                f"{trt}" + (f"; use --triton-release {matched.release}" if matched else "")
            )
        _check_driver(row, branch, f"--triton-release {row.release}")
        return row, "--triton-release"
    if trt and matched is None:
        raise ClipTritonError(
            f"the engines were built with TensorRT {trt}, which no release in exporter/base/releases.py is confirmed "
            "to ship (docs/releases.md): pass --triton-release YY.MM of the container you built them in"
        )
    if matched is not None:
        _check_driver(matched, branch, f"the engines (TensorRT {trt}) need Triton {matched.release}, which")
        return matched, f"it ships the engines' TensorRT {trt}"
    if branch is None:
        return DEFAULT_RELEASE, f"the newest release for driver R{DEFAULT_MIN_DRIVER}, the default --min-driver"
    return release_for_driver(branch), f"the newest release for driver R{branch}, --min-driver {branch}"


def check_release_options(requested: str | None, min_driver: int | str | None) -> None:
    """--triton-release and --min-driver checked before any work (`build`): a one-line error for an unknown
    release, a malformed or too old driver, or a release that needs a newer driver than --min-driver."""
    branch = parse_driver(min_driver) if min_driver is not None else None
    if requested:
        row = get_release(requested)
        _check_driver(row, branch, f"--triton-release {row.release}")
    elif branch is not None:
        release_for_driver(branch)


def _check_driver(row: TritonRelease, branch: int | None, what: str) -> None:
    if branch is not None and row.driver is not None and row.driver > branch:
        raise ClipTritonError(
            f"{what} needs NVIDIA driver R{row.driver} (CUDA {row.cuda or 'not confirmed'}), newer than --min-driver "
            f"{branch}; the newest for R{branch}: " + _newest_for(branch)
        )


def _newest_for(branch: int) -> str:
    try:
        return f"--triton-release {release_for_driver(branch).release}"
    except ClipTritonError:
        return "none in the table"


def target_release(
    manifest: Manifest, requested: str | None = None, min_driver: int | str | None = None
) -> TritonRelease:
    """`choose_release` without the reason."""
    return choose_release(manifest, requested, min_driver)[0]


def repository_release(repo_manifest: Manifest) -> TritonRelease:
    """The release a written repository targets (recorded by `write_repository`; older repositories:
    derived from the engines as `target_release` would)."""
    recorded = (repo_manifest.repository or {}).get("triton_release")
    return get_release(recorded) if isinstance(recorded, str) else target_release(repo_manifest)
