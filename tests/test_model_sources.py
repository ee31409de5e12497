"""Where an open_clip model comes from besides open_clip's own list (issue 23): a custom architecture
(`--model-config FILE.json`, named by `--model`) and the models shipped with clip-triton
(`--pretrained builtin`). Tiny models only: a few seconds each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import Manifest, load_manifest, sha256_file
from clip_triton.exporter.sources import load_reference, tower_modules
from clip_triton.exporter.sources import open_clip as source
from clip_triton.exporter.sources.open_clip import check_model_config, load_model
from clip_triton.exporter.stages.export import export_model
from helpers import run_cli

NAME = "TinyNet-Test"
BUILTIN = "TinyBuiltin-Test"
TINY: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _write(path: Path, config: Any) -> Path:
    path.write_text(json.dumps(config))
    return path


def _embeddings(loaded: Any) -> dict[str, np.ndarray]:
    import torch

    rng = np.random.default_rng(0)
    inputs = {
        "image": torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32)),
        "text": torch.from_numpy(rng.integers(1, 49407, (2, 16)).astype(np.int64)),
    }
    modules = tower_modules(loaded)
    with torch.no_grad():
        return {tower: modules[tower](inputs[tower]).numpy() for tower in inputs}


def _state(loaded: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_custom_config_exports_and_rebuilds_from_the_manifest_alone(tmp_path: Path) -> None:
    import open_clip

    path = _write(tmp_path / "whatever-the-file-is-called.json", TINY)
    loaded = load_model(NAME, model_config=path, random_weights=True, seed=3)
    assert NAME not in open_clip.list_models(), "the custom config leaked into open_clip's registry"
    assert loaded.embed_dim == 32 and loaded.preprocess.size == [32, 32]
    assert loaded.tokenizer_cfg.context_length == 16 and loaded.model_config == TINY
    want = _embeddings(loaded)
    export_model(loaded, tmp_path / "export", max_batch=4)
    path.unlink()  # later stages need only the manifest

    m = load_manifest(tmp_path / "export")
    assert m.model_name == NAME and m.model_config == TINY and m.builtin_sha256 is None
    assert m.image.input.shape == [-1, 3, 32, 32] and m.text.input.shape == [-1, 16]
    rebuilt = load_reference(m)
    got = _embeddings(rebuilt)
    assert all(np.array_equal(want[t], got[t]) for t in want)
    assert NAME not in open_clip.list_models()

    # The manifest's record is checked like the rest of it.
    data = json.loads(m.to_json())
    for key, value, message in (
        ("model_config", [1], "model_config must be null or"),
        ("model_config", {**TINY, "embed_dim": 64}, "differs from embed_dim"),
        ("builtin_sha256", "ab" * 32, "must be null unless"),
    ):
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict({**data, key: value})
    older = {k: v for k, v in data.items() if k not in ("model_config", "builtin_sha256")}
    assert Manifest.from_dict(older).model_config is None  # manifests from before these fields still load


def _huge(path: Path) -> None:
    path.write_text(json.dumps({**TINY, "padding": "x" * (1 << 20)}))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "does not exist"),
        (lambda p: p.write_text("{embed_dim: 32"), "is not JSON"),
        (lambda p: _write(p, [TINY]), "must be a JSON object (an open_clip model config), not an array"),
        (lambda p: _write(p, {k: v for k, v in TINY.items() if k != "vision_cfg"}), "lacks vision_cfg"),
        (lambda p: _write(p, {"model_cfg": TINY}), "pass its model_cfg object"),
        (lambda p: _write(p, {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": "64"}}),
         'vision_cfg.width must be a positive integer, got "64"'),
        (lambda p: _write(p, {**TINY, "embed_dim": True}), "embed_dim must be a positive integer"),
        (lambda p: _write(p, {**TINY, "text_cfg": {**TINY["text_cfg"], "heads": 3}}), "open_clip cannot build"),
        (lambda p: _write(p, {**TINY, "text_cfg": {**TINY["text_cfg"], "bogus": 1}}), "open_clip cannot build"),
        (_huge, "is over 1 MiB"),
    ],
    ids=["missing", "not-json", "array", "no-vision-cfg", "wrapped", "wrong-type", "bool-dim", "unbuildable",
         "unknown-key", "huge"],
)
def test_a_bad_model_config_is_one_line_naming_the_file(tmp_path: Path, make: Any, message: str) -> None:
    import open_clip

    path = tmp_path / "bad.json"
    if make is not None:
        make(path)
    with pytest.raises(ClipTritonError) as caught:
        load_model(NAME, model_config=path, random_weights=True)
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text, text
    assert NAME not in open_clip.list_models()


def test_a_model_config_cannot_take_a_known_name_or_a_pretrained_tag(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny.json", TINY)
    with pytest.raises(ClipTritonError, match="already names an open_clip architecture"):
        load_model("ViT-B-32", model_config=path, random_weights=True)
    with pytest.raises(ClipTritonError, match="pass --checkpoint FILE or --random-weights"):
        load_model(NAME, model_config=path, pretrained="openai")
    with pytest.raises(ClipTritonError, match="cannot name a --model-config architecture"):
        load_model("hf-hub:org/x", model_config=path, random_weights=True)


def test_open_clips_own_configs_pass_the_check() -> None:
    import open_clip

    for name in open_clip.list_models():
        check_model_config(open_clip.get_model_config(name), name)


@pytest.mark.parametrize("command", ["export", "build"])
def test_cli_bad_model_config_exits_2_with_one_line_and_no_output(tmp_path: Path, command: str) -> None:
    bad = _write(tmp_path / "bad.json", {"embed_dim": 32})
    out = tmp_path / "out"
    result = run_cli(command, "--model", NAME, "--model-config", str(bad), "--random-weights", "--out", str(out), "-q")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "lacks vision_cfg, text_cfg" in errors[0], errors
    assert not out.exists()


# ---------------------------------------------------------------- --pretrained builtin


@pytest.fixture
def builtin_dir(tmp_path: Path) -> Iterator[Path]:
    """A builtin folder holding BUILTIN (config and seeded weights) in place of the package's."""
    folder = tmp_path / "builtin"
    folder.mkdir()
    _write(folder / f"{BUILTIN}.json", TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(source, "BUILTIN_DIR", folder)
        yield folder
    source._import_open_clip()  # registered builtins follow the real folder again


def _save_weights(folder: Path, seed: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    # A builtin architecture is registered with open_clip: it takes --random-weights like any other.
    loaded = load_model(BUILTIN, random_weights=True, seed=seed)
    state = {k: v.contiguous() for k, v in _state(loaded).items()}
    save_file(state, str(folder / f"{BUILTIN}.safetensors"))
    return state


def test_builtin_weights_load_exactly_and_a_tampered_file_is_refused(
    builtin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _save_weights(builtin_dir, seed=7)

    def no_hub(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the hub was consulted for builtin weights")

    monkeypatch.setattr(source, "hub_offline_reason", no_hub)
    loaded = load_model(BUILTIN, pretrained="builtin")
    assert _same_state(_state(loaded), saved)
    weights = builtin_dir / f"{BUILTIN}.safetensors"
    assert loaded.pretrained == "builtin" and loaded.builtin_sha256 == sha256_file(weights)
    assert loaded.model_config is None and not loaded.random_weights

    export_model(loaded, tmp_path / "export", max_batch=4)
    m = load_manifest(tmp_path / "export")
    assert m.pretrained == "builtin" and m.builtin_sha256 == sha256_file(weights) and m.model_config is None
    assert _same_state(_state(load_reference(m)), saved)

    _save_weights(builtin_dir, seed=8)  # other weights under the same name
    with pytest.raises(ClipTritonError, match="changed since export") as caught:
        load_reference(m)
    assert "\n" not in str(caught.value)


def test_builtin_weights_that_do_not_fit_name_the_keys(builtin_dir: Path) -> None:
    from safetensors.torch import save_file

    state = _save_weights(builtin_dir, seed=1)
    state.pop("logit_scale")
    state["text_projection"] = state["text_projection"][:, :16].contiguous()
    save_file(state, str(builtin_dir / f"{BUILTIN}.safetensors"))
    with pytest.raises(ClipTritonError) as caught:
        load_model(BUILTIN, pretrained="builtin")
    text = str(caught.value)
    assert "text_projection [64, 16] vs [64, 32]" in text and "missing keys: logit_scale" in text, text


def test_an_unknown_builtin_lists_the_builtin_models(builtin_dir: Path) -> None:
    _save_weights(builtin_dir, seed=0)
    with pytest.raises(ClipTritonError, match=f"ViT-B-32 has no builtin weights \\(builtin models: {BUILTIN}\\)"):
        load_model("ViT-B-32", pretrained="builtin")
    (builtin_dir / f"{BUILTIN}.safetensors").unlink()
    with pytest.raises(ClipTritonError, match="none ship with this installation"):
        load_model(BUILTIN, pretrained="builtin")
