"""A non-editable install (what `pip install git+...` in a user's CI does) must carry everything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import linked_copy

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_python_backend_sources(vitb32_export: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"  # build from a copy: building in place would write build/ into the checkout
    for name in ("clip_triton", "exporter", "clients", "model_repository"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "whl").glob("clip_triton-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(installed)
    assert "clip_triton/clients/clip_preprocess.py" in names  # the preprocess model's code, shared with the client
    # One import namespace: nothing lands in site-packages beside clip_triton/ but its metadata.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"clip_triton"}
    for path in ("common/clip_tokenizer.py", "common/bpe_simple_vocab_16e6.txt.gz",
                 "image_preprocess/model.py", "text_tokenize/model.py", "onnx_encoder/model.py"):
        assert f"clip_triton/exporter/model_repository/{path}" in names

    # The unpacked wheel, away from the checkout, writes a complete python-runtime repository.
    export = linked_copy(vitb32_export, tmp_path / "export")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    code = "import clip_triton.exporter.base.common as c; print(c.REPOSITORY_SOURCES)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env=env)
    assert where.stdout.strip() == str(installed / "clip_triton" / "exporter" / "model_repository"), where.stderr
    run = subprocess.run(
        [sys.executable, "-m", "clip_triton.exporter.cli", "repository", "--export", str(export),
         "--out", str(tmp_path / "repo"), "--runtime", "python", "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stderr
    for model in ("clip_image_preprocess", "clip_text_tokenize", "clip_image_encoder"):
        assert (tmp_path / "repo" / model / "1" / "model.py").is_file()
    assert (tmp_path / "repo" / "clip_text_tokenize" / "1" / "bpe_simple_vocab_16e6.txt.gz").is_file()


@pytest.mark.slow
def test_the_package_alone_is_the_client_without_torch(tmp_path: Path) -> None:
    """`pip install clip-triton` (no extra) in a fresh venv: the client and its CLI, no torch, open_clip or
    numpy pin; a toolchain command says which extra it needs, in one line."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True,
                         timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "clip-triton")
    probe = ("import importlib.util as u, clip_triton; "
             "print([m for m in ('torch', 'open_clip', 'onnx') if u.find_spec(m)])")
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr
    assert subprocess.run([python, "-c", "from clip_triton import ClipClient, AsyncClipClient"], timeout=120,
                          cwd=tmp_path).returncode == 0
    assert subprocess.run([cli, "embed", "--help"], capture_output=True, timeout=120).returncode == 0
    export = subprocess.run([cli, "export", "--model", "ViT-B-32", "--random-weights", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert export.stderr.strip() == ("error: this command needs the `export` extra (no module 'onnx' here): "
                                     "pip install 'clip-triton[export]'"), export.stderr
