"""Build stages under faults: a full disk, two runs racing for one output, an interrupted build,
file modes of what users deploy, an unreachable model hub (docs/limits.md)."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from clip_triton.exporter.base.common import ClipTritonError, staged_dir
from clip_triton.exporter.build import BuildOptions, resumable_stages
from helpers import linked_copy, run_cli


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 40 MB filesystem (tmpfs) that fills up; skips where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0].lower()


def test_full_disk_is_one_line_exit_2_and_nothing_left(vitb32_export: Path, small_disk: Path) -> None:
    # The ViT-B-32 graphs (~600 MB) cannot fit: the copy fails part way.
    result = run_cli("repository", "--export", str(vitb32_export), "--out", str(small_disk / "repo"),
                     "--runtime", "python", "--copy-files", "-q")
    line = _one_error_line(result)
    assert "no space left on device" in line
    assert list(small_disk.iterdir()) == [], list(small_disk.iterdir())


def test_full_disk_in_build_names_the_stage(small_disk: Path) -> None:
    result = run_cli("build", "--model", "ViT-B-32", "--random-weights", "--out", str(small_disk / "b"),
                     "--skip-engines", "-q")
    line = _one_error_line(result)
    assert "build failed at export" in line and "no space left on device" in line
    leftovers = [p.name for p in (small_disk / "b").iterdir()] if (small_disk / "b").exists() else []
    assert all(name == "build.json" for name in leftovers), leftovers


def _publish(dest: str, tag: str, delay: float, queue) -> None:
    try:
        with staged_dir(Path(dest)) as tmp:
            (tmp / "who").write_text(tag)
            time.sleep(delay)  # both runs are past the existence check before either publishes
        queue.put((tag, "ok"))
    except ClipTritonError as exc:
        queue.put((tag, str(exc)))


def test_two_runs_to_one_output_exactly_one_wins(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    runs = [
        ctx.Process(target=_publish, args=(str(dest), tag, delay, queue)) for tag, delay in (("a", 0.5), ("b", 1.0))
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    results = dict(queue.get(timeout=5) for _ in runs)
    assert results["a"] == "ok"
    assert "written by another run" in results["b"]
    assert (dest / "who").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the loser's staging folder is gone


def test_outputs_are_world_readable(vitb32_export: Path, tmp_path: Path) -> None:
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    old = os.umask(0o022)
    try:
        repo = write_repository(vitb32_export, tmp_path / "repo", RepositoryOptions(runtime="python"))
    finally:
        os.umask(old)
    for root in (vitb32_export, repo):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                assert mode & 0o777 == 0o755, f"{path} is {oct(mode)}"
            else:  # readable by all, writable by the owner only (bundled shared libraries keep their x bits)
                assert mode & 0o666 == 0o644, f"{path} is {oct(mode)}"


def test_interrupted_build_resumes_from_verified_stages(vitb32_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    out.mkdir()
    linked_copy(vitb32_export, out / "export", skip=(".fp16.onnx", ".fp16.onnx.data"))
    (out / ".repository.tmp-killed").mkdir()  # what a killed run leaves
    opts = BuildOptions(model="ViT-B-32", out=out, random_weights=True, seed=0)
    reuse, notes = resumable_stages(out, opts)
    assert "export" in reuse and "fp16" not in reuse, notes
    assert any("checksums verified" in n for n in notes)
    assert not (out / ".repository.tmp-killed").exists()

    # A damaged file: the export is redone, not trusted.
    graph = out / "export" / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.unlink()  # a hard link: write a new file, leave the session's export alone
    graph.write_bytes(bytes(data))
    reuse, notes = resumable_stages(out, opts)
    assert "export" not in reuse and any("differs from its recorded checksum" in n for n in notes)

    # Another model's build is refused, not overwritten.
    with pytest.raises(ClipTritonError, match="another model"):
        resumable_stages(out, BuildOptions(model="ViT-B-32", out=out, random_weights=True, seed=1))


def test_build_resumes_on_the_command_line(shapes_export: Path, tmp_path: Path) -> None:
    """An interrupted build (export done, nothing after) is resumed by the same command (on the small
    shipped model: the resume logic does not depend on the model's size). The finished export is the
    session's `clip-triton export --model ShapesCLIP-RN-T --pretrained builtin`, hard-linked in."""
    out = tmp_path / "build"
    linked_copy(shapes_export, out / "export")
    result = run_cli("build", "--model", "ShapesCLIP-RN-T", "--pretrained", "builtin", "--out", str(out),
                     "--skip-engines", "--samples", "2", "--labelled-set", "none")
    assert result.returncode == 0, result.stderr
    assert "export/ is complete (checksums verified): reusing it" in result.stderr
    assert "== export ==" not in result.stderr and "== fp16 ==" in result.stderr  # fp16 had not run
    assert (out / "repository" / "clip_image").is_dir() and (out / "parity.json").is_file()


def test_unreachable_hub_is_detected_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from clip_triton.exporter.base.common import Progress
    from clip_triton.exporter.sources import base as loading

    monkeypatch.setattr(loading, "_HUB_STATE", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    reason = loading.hub_offline_reason(Progress("test"))
    assert reason is not None and "unreachable" in reason
    assert time.perf_counter() - start < 5
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert loading.hub_offline_reason() == reason  # decided once per process

    monkeypatch.setattr(loading, "_HUB_STATE", {})
    assert loading.hub_offline_reason() == "HF_HUB_OFFLINE is set"


def test_repository_limit_defaults_are_the_preprocess_defaults() -> None:
    from clip_triton.clients.clip_preprocess import ImageLimits
    from clip_triton.exporter.stages import repository

    limits = ImageLimits()
    assert (repository.DEFAULT_MAX_BYTES, repository.DEFAULT_MAX_PIXELS) == (limits.max_bytes, limits.max_pixels)
    assert repository.DEFAULT_MAX_ASPECT_RATIO == limits.max_aspect_ratio
    assert repository.DEFAULT_MAX_RESIZED_PIXELS == limits.max_resized_pixels
