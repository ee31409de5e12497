"""A repository that carries its python models' wheels (issue 14, docs/deploy.md).

The served test is the point: a stock Triton container has numpy and nothing else our python
models import, so the repository is served here from an interpreter environment that has only
numpy, and must answer exactly as the same repository served from the full environment.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import platform
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter.base.common import REPOSITORY_SOURCES, ClipTritonError
from clip_triton.exporter.base.manifest import load_manifest, repository_manifest
from clip_triton.exporter.base.python_deps import DEPS_DIR, DEPS_RECORD
from clip_triton.exporter.base.releases import get_release
from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository
from helpers import linked_copy, run_cli

LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# The imports each python model needs beyond numpy, by model (python runtime, CLIP BPE tokenizer).
NEEDS = {
    "clip_image_preprocess": ["PIL"],
    "clip_text_tokenize": ["ftfy", "regex"],
    "clip_image_encoder": ["onnxruntime"],
    "clip_text_encoder": ["onnxruntime"],
}


def _glibc_minor() -> int:
    libc, version = platform.libc_ver()
    return int(version.split(".")[1]) if libc == "glibc" and version else 0


def _numpy_only_env(dest: Path) -> Path:
    """A venv of this interpreter with numpy (linked from this environment) and no other package."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
    python = dest / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    numpy_dir = Path(np.__file__).parent
    for entry in numpy_dir.parent.iterdir():
        if entry.name == "numpy" or entry.name.startswith(("numpy.libs", "numpy-")):
            (site / entry.name).symlink_to(entry)
    return python


def test_repository_carries_pinned_wheels_for_the_release_python(shapes_export: Path, tmp_path: Path) -> None:
    release = get_release("24.12")  # Ubuntu 24.04, Python 3.12 (docs/releases.md)
    repo = write_repository(
        shapes_export, tmp_path / "repo", RepositoryOptions(runtime="python", triton_release="24.12")
    )
    tag = "cpython-" + release.python.replace(".", "")
    for model, imports in NEEDS.items():
        deps = repo / model / "1" / DEPS_DIR
        record = json.loads((deps / DEPS_RECORD).read_text())
        assert record["python"] == release.python == "3.12"
        for name in imports:
            assert (deps / name).is_dir(), f"{model} lacks {name}"
        # Pinned to the versions this environment ran its parity tests with.
        for requirement in record["requirements"]:
            name, version = requirement.split("==")
            assert md.version(name) == version and record["packages"][name] == version
        assert not (deps / "numpy").exists(), "numpy is the container's: a second copy would shadow it"
        assert (repo / model / "1" / "bundled_deps.py").is_file()
    compiled = list((repo / "clip_image_preprocess" / "1" / DEPS_DIR / "PIL").glob("_imaging.*.so"))
    assert compiled and all(tag in so.name for so in compiled), compiled  # built for the container's Python
    recorded = (repository_manifest(repo).repository or {})
    assert recorded["triton_release"] == "24.12" and recorded["triton_image"] == release.image
    assert recorded["python_deps"]["python"] == "3.12"
    readme = (repo / "README.md").read_text()
    assert release.image in readme and "pip install" not in readme


def test_wheels_for_another_python_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bundled_deps", REPOSITORY_SOURCES / "common" / "bundled_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / "DEPS.json").write_text(json.dumps({"python": "3.9"}))
    monkeypatch.delenv("CLIP_TRITON_EMBEDDED_SERVER", raising=False)
    refused = rf"for Python 3.9, but this Triton's python backend runs Python {LOCAL_PYTHON}"
    with pytest.raises(RuntimeError, match=refused):
        module.use_bundled_deps(str(tmp_path))
    # The embedded server runs this machine's Python: it uses its own packages instead.
    monkeypatch.setenv("CLIP_TRITON_EMBEDDED_SERVER", "1")
    assert module.use_bundled_deps(str(tmp_path)) is None
    (tmp_path / "deps" / "DEPS.json").write_text(json.dumps({"python": LOCAL_PYTHON}))
    assert module.use_bundled_deps(str(tmp_path))["python"] == LOCAL_PYTHON
    assert str(tmp_path / "deps") in sys.path
    sys.path.remove(str(tmp_path / "deps"))


def test_the_release_follows_the_engines(shapes_export: Path, tmp_path: Path) -> None:
    export = linked_copy(shapes_export, tmp_path / "export")
    manifest = load_manifest(export)
    manifest.engines = {"tensorrt": "10.9.0.34", "profile": {"min": 1, "opt": 8, "max": 32}}
    manifest.save(export)
    for name in ("image_encoder.plan", "text_encoder.plan"):
        (export / name).write_bytes(b"not read by this stage")
    opts = {"python_deps": False}
    repo = write_repository(export, tmp_path / "r1", RepositoryOptions(**opts))
    assert (repository_manifest(repo).repository or {})["triton_release"] == "25.03"
    refused = "ships TensorRT 10.7.0.23, but the engines were built with TensorRT 10.9"
    with pytest.raises(ClipTritonError, match=refused):
        write_repository(export, tmp_path / "r2", RepositoryOptions(triton_release="24.12", **opts))
    manifest.engines["tensorrt"] = "10.13.0.35"  # no release confirmed to ship it: the user must say
    manifest.save(export)
    with pytest.raises(ClipTritonError, match="pass --triton-release"):
        write_repository(export, tmp_path / "r3", RepositoryOptions(**opts))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_unfetchable_wheels_are_one_line_and_leave_nothing(shapes_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    run = run_cli(
        "repository", "--export", str(shapes_export), "--out", str(out), "--runtime", "python",
        "--deps-python", "2.7", timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "could not fetch the python models' wheels" in run.stderr and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pillow==" in errors[0] and not out.exists()


@pytest.mark.server
def test_served_from_an_environment_with_only_numpy(served_shapes, tmp_path: Path) -> None:
    from clip_triton.clients import ClipClient
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.parity.samples import builtin_images, builtin_texts

    if _glibc_minor() < 35:
        pytest.skip("the bundled wheels target Ubuntu 22.04's glibc 2.35; this host's glibc is older")
    full_server, _, export = served_shapes
    bare = _numpy_only_env(tmp_path / "bare")
    for module in ("PIL", "ftfy", "regex", "tokenizers", "onnxruntime"):
        probe = subprocess.run([str(bare), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the bare environment must not have {module}"
    assert subprocess.run([str(bare), "-c", "import numpy"]).returncode == 0

    # Control: the same repository without its wheels cannot load there.
    plain = write_repository(export, tmp_path / "plain", RepositoryOptions(runtime="python", python_deps=False))
    with pytest.raises(ClipTritonError):
        TritonServer(plain, python=bare, log_path=tmp_path / "plain.log").start(timeout=120, attempts=1)
    assert "No module named" in (tmp_path / "plain.log").read_text()

    # 24.10: Ubuntu 22.04's manylinux platform, wheels for this interpreter's Python.
    opts = RepositoryOptions(runtime="python", triton_release="24.10", deps_python=LOCAL_PYTHON)
    repo = write_repository(export, tmp_path / "repo", opts)
    images = [s.data for s in builtin_images(12)]
    texts = builtin_texts(12)
    with TritonServer(repo, python=bare, log_path=tmp_path / "bare.log") as server:
        with ClipClient(server.grpc_url) as client, ClipClient(full_server.grpc_url) as reference:
            assert np.array_equal(client.embed_images(images), reference.embed_images(images))
            assert np.array_equal(client.embed_texts(texts), reference.embed_texts(texts))
        copy = linked_copy(export, tmp_path / "export")
        result = run_parity(copy, url=server.grpc_url, samples=8, report=tmp_path / "parity.json")
    assert result["passed"], result
