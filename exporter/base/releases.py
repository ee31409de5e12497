"""NVIDIA's Triton container releases: the TensorRT and Python each ships (docs/releases.md).

One table, three users: `clip-triton repository` picks the release whose TensorRT built the engines
(a plan runs only on the TensorRT version that built it) and fetches the python models' wheels for
that release's Python; `clip-triton deploy` names the matching image; the repository README says it.
Sources, per row, and what could not be verified: docs/releases.md. Releases 25.04 ... 26.08 are
listed with their verified tritonserver / Python / Ubuntu but no TensorRT (not confirmed): they serve
repositories without engines (the default target is the newest), and engines never match them.
"""

from __future__ import annotations

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

    @property
    def image(self) -> str:
        return f"{IMAGE}:{self.release}-py3"

    @property
    def tensorrt_major_minor(self) -> str | None:
        return major_minor(self.tensorrt) if self.tensorrt else None


# Oldest first; docs/releases.md gives each row's sources and what is unverified. tritonserver
# version: build.py's TRITON_VERSION_MAP / DEFAULT_TRITON_VERSION_MAP on the r<YY.MM> branch of
# triton-inference-server/server. Python and Ubuntu: that branch's build.py (ubuntu:22.04 -> 24.04
# from r24.11, PR #7783) and qa/L0_backend_python/test.sh, which asserts `python3 --version` (3.10
# through r24.10, 3.12 from r24.11). TensorRT: kept from the original table; NVIDIA's release-note
# component lists were not readable in the copies searched, so only some rows are corroborated.
RELEASES: tuple[TritonRelease, ...] = (
    TritonRelease("24.08", "2.49.0", "10.3.0.26", "3.10", "22.04"),
    TritonRelease("24.09", "2.50.0", "10.4.0.26", "3.10", "22.04"),
    TritonRelease("24.10", "2.51.0", "10.5.0.18", "3.10", "22.04"),
    TritonRelease("24.11", "2.52.0", "10.6.0.26", "3.12", "24.04"),  # first Ubuntu 24.04 release
    TritonRelease("24.12", "2.53.0", "10.7.0.23", "3.12", "24.04"),
    TritonRelease("25.01", "2.54.0", "10.8.0.43", "3.12", "24.04"),
    TritonRelease("25.02", "2.55.0", "10.8.0.43", "3.12", "24.04"),
    TritonRelease("25.03", "2.56.0", "10.9.0.34", "3.12", "24.04"),
    # TensorRT unconfirmed from here on (docs/releases.md); 25.08+ are CUDA 13.
    TritonRelease("25.04", "2.57.0", None, "3.12", "24.04"),
    TritonRelease("25.05", "2.58.0", None, "3.12", "24.04"),
    TritonRelease("25.06", "2.59.0", None, "3.12", "24.04"),
    TritonRelease("25.07", "2.59.1", None, "3.12", "24.04"),
    TritonRelease("25.08", "2.60.0", None, "3.12", "24.04"),
    TritonRelease("25.09", "2.61.0", None, "3.12", "24.04"),
    TritonRelease("25.10", "2.62.0", None, "3.12", "24.04"),
    TritonRelease("25.11", "2.63.0", None, "3.12", "24.04"),
    TritonRelease("25.12", "2.64.0", None, "3.12", "24.04"),
    TritonRelease("26.01", "2.65.0", None, "3.12", "24.04"),
    TritonRelease("26.02", "2.66.0", None, "3.12", "24.04"),
    TritonRelease("26.03", "2.67.0", None, "3.12", "24.04"),
    TritonRelease("26.04", "2.68.0", None, "3.12", "24.04"),
    TritonRelease("26.05", "2.69.0", None, "3.12", "24.04"),
    TritonRelease("26.06", "2.70.0", None, "3.12", "24.04"),
    TritonRelease("26.07", "2.71.0", None, "3.12", "24.04"),
    TritonRelease("26.08", "2.72.0", None, "3.12", "24.04"),
)

# Used when no engine pins the release (onnxruntime / python runtimes): the newest in the table.
DEFAULT_RELEASE = RELEASES[-1]


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


def target_release(manifest: Manifest, requested: str | None = None) -> TritonRelease:
    """The Triton container a repository is written for: `requested`, else the release shipping the
    engines' TensorRT, else the newest known release (docs/releases.md). A request that contradicts
    the engines is refused; engines whose TensorRT no confirmed release ships need a request."""
    trt = engines_tensorrt(manifest)
    matched = release_for_tensorrt(trt) if trt else None
    if requested:
        row = get_release(requested)
        if trt and row.tensorrt is not None and row.tensorrt_major_minor != major_minor(trt):
            raise ClipTritonError(
                f"Triton {row.release} ships TensorRT {row.tensorrt}, but the engines were built with TensorRT "
                f"{trt}" + (f"; use --triton-release {matched.release}" if matched else "")
            )
        return row
    if trt and matched is None:
        raise ClipTritonError(
            f"the engines were built with TensorRT {trt}, which no release in exporter/base/releases.py is confirmed "
            "to ship (docs/releases.md): pass --triton-release YY.MM of the container you built them in"
        )
    return matched or DEFAULT_RELEASE


def repository_release(repo_manifest: Manifest) -> TritonRelease:
    """The release a written repository targets (recorded by `write_repository`; older repositories:
    derived from the engines as `target_release` would)."""
    recorded = (repo_manifest.repository or {}).get("triton_release")
    return get_release(recorded) if isinstance(recorded, str) else target_release(repo_manifest)
