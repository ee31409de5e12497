"""Which model a server or a repository serves, against the export parity compares with.

Every repository publishes its encoders' checksums: the ensembles' config parameters
`image_encoder_sha256` / `text_encoder_sha256` (clients/contract.py) and the repository's own
manifest.json. Both are the sha256 of the export's FP32 graphs (`manifest.files[<tower>.file]`),
whatever the repository serves (FP32 or FP16 graph, TensorRT plan): one export, one pair of checksums,
so a matching FP16 or engine repository of this export is the same model. Checksums that differ mean
another model (other weights, another architecture, another export of it): parity stops before any
comparison with one line (DifferentModelError, exit 2) instead of reporting the difference as drift.
A server or repository that publishes no checksums (written before they existed) is "unknown": parity
says so and compares anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clip_triton.clients import contract
from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import TOWERS, Manifest, repository_manifest

MATCH, DIFFERENT, UNKNOWN, UNREACHABLE = "match", "different", "unknown", "unreachable"
PARAMS = {"image": contract.PARAM_IMAGE_ENCODER_SHA256, "text": contract.PARAM_TEXT_ENCODER_SHA256}
DISCOVERY_TIMEOUT = 60.0


class DifferentModelError(ClipTritonError):
    """The server or repository serves another model than the export: nothing is compared (exit 2)."""


@dataclass
class Served:
    """What one server (`url`) or repository folder (`repository`) says it serves."""

    where: str  # "server HOST:PORT" or "repository PATH"
    url: str | None = None
    repository: str | None = None
    model_name: str | None = None
    checksums: dict[str, str] = field(default_factory=dict)  # tower -> sha256 (only those published)
    status: str = UNKNOWN
    error: str | None = None  # why nothing was read (unreachable)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


def expected_checksums(manifest: Manifest) -> dict[str, str]:
    """tower -> the sha256 a repository of this export publishes (its FP32 graph's); empty when unrecorded."""
    out = {}
    for tower in TOWERS:
        sha = (manifest.files.get(manifest.tower(tower).file) or {}).get("sha256")
        if isinstance(sha, str) and sha:
            out[tower] = sha
    return out


def judge(served: Served, expected: dict[str, str]) -> Served:
    """Set `served.status`: match, different (a tower's checksum differs), unknown (none to compare)."""
    if served.error is not None:
        served.status = UNREACHABLE
        return served
    both = [t for t in TOWERS if t in served.checksums and t in expected]
    if not both:
        served.status = UNKNOWN
    elif any(served.checksums[t] != expected[t] for t in both):
        served.status = DIFFERENT
    else:
        served.status = MATCH
    return served


def from_server(url: str, prefix: str) -> Served:
    """Read the served model's name and checksums through the client's own discovery (ClipClient.model_info:
    the ensembles' parameters, then their steps')."""
    from clip_triton.clients.sync import ClipClient

    served = Served(where=f"server {url}", url=url)
    try:
        with ClipClient(url, prefix=prefix, retries=0, timeout=DISCOVERY_TIMEOUT) as client:
            params = client.model_info.parameters
    except Exception as exc:  # noqa: BLE001 - unreachable or not a CLIP repository: the stages say more
        served.error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return served
    served.model_name = params.get(contract.PARAM_MODEL_NAME) or None
    served.checksums = {t: params[p] for t, p in PARAMS.items() if params.get(p)}
    return served


def from_repository(repo: Path) -> Served:
    """What a repository folder's own manifest.json publishes (the same checksums its configs carry)."""
    repo = Path(repo)
    served = Served(where=f"repository {repo}", repository=str(repo.resolve()))
    own = repository_manifest(repo)
    if own is not None:
        served.model_name = own.model_name
        served.checksums = expected_checksums(own)
    return served


def _short(checksums: dict[str, str]) -> str:
    return ", ".join(f"{t} encoder sha256 {checksums[t][:12]}" for t in TOWERS if t in checksums) or "no checksums"


def mismatch_line(served: Served, manifest: Manifest, expected: dict[str, str]) -> str:
    """One clause naming what `served` serves and what the export is."""
    name = served.model_name or "an unnamed model"
    return (f"the {served.where} serves {name} ({_short(served.checksums)}), not this export's "
            f"{manifest.model_name} ({_short(expected)})")


def check(manifest: Manifest, served: list[Served]) -> None:
    """Raise DifferentModelError naming every server/repository whose checksums differ from the export's."""
    expected = expected_checksums(manifest)
    bad = [s for s in served if judge(s, expected).status == DIFFERENT]
    if bad:
        detail = "; ".join(mismatch_line(s, manifest, expected) for s in bad)
        others = [s.where for s in served if s.status == MATCH]
        mixed = f" (mixed replicas: {', '.join(others)} serve this export)" if others else ""
        raise DifferentModelError(f"different model: {detail}{mixed}; nothing was compared")


def unknown_line(served: Served) -> str:
    """A warning for a server/repository whose checksums cannot be compared."""
    if served.status == UNREACHABLE:
        return f"the {served.where} did not answer ({served.error}): which model it serves is unknown"
    return (f"the {served.where} publishes no encoder checksums (written before they existed?): "
            "checksums unknown, assumed to serve this export")
