"""Helpers the test modules share: the CLI as a subprocess, and disk-cheap copies of exports."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "clip_triton.exporter.cli"]


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def linked_copy(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """A cheap copy of an export (hard links): every writer here replaces files, never edits them.

    `skip`: file-name endings to leave out (an FP32-only copy of an export that has FP16 graphs).
    """

    def ignore(_folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(skip) or n.startswith(".")] if skip else []

    shutil.copytree(src, dest, copy_function=os.link, ignore=ignore)
    return dest


@contextlib.contextmanager
def scratch_dir(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A module fixture's folder, deleted at teardown (exports and repositories run to hundreds of MB;
    CI machines can have little disk)."""
    path = factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tiny_images(n: int, seed: int = 0, size: int = 16) -> list[bytes]:
    """`n` distinct small encoded images (PNG, every third one JPEG): cheap to make, decode and send."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size + i % 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG" if i % 3 == 2 else "PNG")
        out.append(buf.getvalue())
    return out


def write_tiny_images(folder: Path, n: int, seed: int = 0, per_folder: int = 0) -> list[Path]:
    """`n` tiny images written under `folder` (sub-folders of `per_folder` files each when > 0)."""
    paths = []
    for i, data in enumerate(tiny_images(n, seed)):
        sub = folder / f"part{i // per_folder:03d}" if per_folder else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:05d}.{'jpg' if i % 3 == 2 else 'png'}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`clip-triton ARGS` in this process, through the console entry point (its one-line errors)."""
    from clip_triton.exporter.cli import main

    monkeypatch.setattr(sys, "argv", ["clip-triton", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err
