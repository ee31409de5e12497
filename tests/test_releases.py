"""Which Triton release a repository targets (exporter/base/releases.py, docs/releases.md): the engines'
TensorRT, else the newest release whose NVIDIA driver floor is at most --min-driver (default R570)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.releases import (
    DEFAULT_MIN_DRIVER,
    DEFAULT_RELEASE,
    RELEASES,
    check_release_options,
    choose_release,
    get_release,
    parse_driver,
    release_for_driver,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "releases.md"


def _manifest(tensorrt: str | None = None) -> Any:
    """What the rule reads of a manifest: the engines' TensorRT (None: no engines)."""
    return SimpleNamespace(engines={"tensorrt": tensorrt} if tensorrt else None, versions={})


@pytest.mark.parametrize(
    ("driver", "release"),
    [
        ("560", "24.10"),  # 24.11-25.01: CUDA not retrieved, floor taken as the higher neighbour's (R570)
        ("565", "24.10"),
        ("570", "25.03"),
        ("R570", "25.03"),
        ("570.124.06", "25.03"),
        ("575", "25.06"),  # 25.07: between CUDA 12.9 and 13.0, taken as R580
        ("580", "25.10"),  # 25.11+: no driver floor found, used only by name
        ("590", "25.10"),
    ],
)
def test_min_driver_picks_the_newest_release_it_runs(driver: str, release: str) -> None:
    assert release_for_driver(driver).release == release
    row, reason = choose_release(_manifest(), min_driver=driver)
    assert row.release == release and f"R{parse_driver(driver)}" in reason
    assert row.driver is not None and row.driver <= parse_driver(driver)


def test_the_default_is_the_newest_release_for_r570() -> None:
    assert DEFAULT_MIN_DRIVER == 570 and DEFAULT_RELEASE.release == "25.03"
    row, reason = choose_release(_manifest())
    assert row is DEFAULT_RELEASE and "default --min-driver" in reason
    assert DEFAULT_RELEASE.driver_note == "NVIDIA driver R570 or newer (CUDA 12.8.1.012)"


@pytest.mark.parametrize(
    ("driver", "message"),
    [
        ("535", r"no Triton release .* known to run on NVIDIA driver R535: the oldest, 24\.08, needs R560"),
        ("550", "R550"),
        ("abc", "--min-driver must be an NVIDIA driver branch"),
        ("5.70", "--min-driver must be"),
        ("", "--min-driver must be"),
    ],
)
def test_too_old_or_malformed_driver_is_a_one_line_error(driver: str, message: str) -> None:
    with pytest.raises(ClipTritonError, match=message) as info:
        choose_release(_manifest(), min_driver=driver)
    assert "\n" not in str(info.value)
    with pytest.raises(ClipTritonError, match=message):
        check_release_options(None, driver)


def test_engines_decide_and_must_fit_an_explicit_driver() -> None:
    row, reason = choose_release(_manifest("10.9.0.34"))
    assert row.release == "25.03" and "TensorRT 10.9.0.34" in reason
    assert choose_release(_manifest("10.9.0.34"), min_driver="580")[0].release == "25.03"  # newer driver: fine
    with pytest.raises(ClipTritonError, match=r"need Triton 25\.03, which needs NVIDIA driver R570.*--min-driver 560"):
        choose_release(_manifest("10.9.0.34"), min_driver="560")


def test_a_requested_release_is_checked_against_the_driver() -> None:
    row, reason = choose_release(_manifest(), "24.10", "560")
    assert row.release == "24.10" and reason == "--triton-release"
    assert choose_release(_manifest(), "26.08", "560")[0].release == "26.08"  # floor unknown: the user's call
    with pytest.raises(ClipTritonError, match=r"--triton-release 25\.08 needs NVIDIA driver R580 .*--min-driver 570"):
        check_release_options("25.08", "570")
    with pytest.raises(ClipTritonError, match="unknown Triton release '99.99'"):
        check_release_options("99.99", None)
    check_release_options("26.08-py3", None)
    check_release_options(None, None)


def test_floors_never_fall_as_releases_get_newer() -> None:
    floors = [r.driver for r in RELEASES if r.driver is not None]
    assert floors == sorted(floors)
    known = [r for r in RELEASES if r.driver is not None]
    assert known[-1].release == "25.10" and all(r.driver is None for r in RELEASES[RELEASES.index(known[-1]) + 1 :])


def test_docs_table_agrees_with_the_code() -> None:
    """docs/releases.md's driver table and its stated default are the code's."""
    text = DOCS.read_text()
    rows = re.findall(r"^\| (\d\d\.\d\d) \| ([^|]+) \| ([^|]+) \|", text.split("## Driver floors", 1)[1], re.M)
    table = {release: (cuda.strip(), floor.strip()) for release, cuda, floor in rows}
    assert list(table) == [r.release for r in RELEASES]
    for release, (cuda, floor) in table.items():
        row = get_release(release)
        assert cuda == (row.cuda or "–"), release
        assert re.sub(r"\D", "", floor.split()[0]) == (str(row.driver) if row.driver else ""), release
    assert f"default `--min-driver` is {DEFAULT_MIN_DRIVER}" in text
    assert f"`DEFAULT_RELEASE` is {DEFAULT_RELEASE.release}" in text
