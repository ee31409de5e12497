"""Export coverage: the open_clip families users pick export both towers at ONNX-Runtime parity.

Random weights (seeded). Each case exports to a temporary folder with `export_model` (which
already gates on batch 1 and 8) and then checks, independently of that gate, a fresh batch of
other inputs against PyTorch and the manifest facts later stages rely on. Export seconds measured
here (2 shared cores) decide the tier; see benchmarks/COVERAGE.md for the full table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

MIN_COSINE = 0.99999
slow = pytest.mark.slow

# (model, expected context length). ViT-B-32 is covered by tests/test_export.py. Default tier:
# the quickest distinct families (ViT, ResNet attention pooling, SigLIP last-token pooling,
# re-parameterised MobileCLIP2), ~5-18 s each alone; the rest took 11-65 s each alone and over a
# minute each when the 2 cores were shared (benchmarks/COVERAGE.md), so they are `slow`.
CASES = [
    pytest.param("ViT-S-16", 77, id="ViT-S-16"),
    pytest.param("RN50", 77, id="RN50-attnpool"),
    pytest.param("ViT-B-16-SigLIP", 64, id="ViT-B-16-SigLIP"),
    pytest.param("MobileCLIP2-S0", 77, id="MobileCLIP2-S0"),
    pytest.param("ViT-B-16-quickgelu", 77, id="ViT-B-16-quickgelu", marks=slow),
    pytest.param("convnext_base", 77, id="convnext_base", marks=slow),
    pytest.param("EVA02-B-16", 77, id="EVA02-B-16", marks=slow),
    pytest.param("ViT-B-16-SigLIP2", 64, id="ViT-B-16-SigLIP2", marks=slow),
    pytest.param("ViT-L-14-worldwide-quickgelu", 77, id="MetaCLIP2-ViT-L-14", marks=slow),
]


def _expected_image_size(name: str) -> list[int]:
    import open_clip

    size = open_clip.get_model_config(name)["vision_cfg"].get("image_size", 224)
    return [size, size] if isinstance(size, int) else list(size)


def _export(name: str, out: Path) -> tuple[Any, Any]:
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model

    loaded = load_model(name, random_weights=True)
    return loaded, export_model(loaded, out)


@pytest.mark.parametrize(("name", "context_length"), CASES)
def test_family_exports_both_towers_at_parity(name: str, context_length: int, tmp_path: Path) -> None:
    import open_clip

    from clip_triton.exporter.parity.metrics import cosine_rows
    from clip_triton.exporter.parity.samples import sample_pixels, sample_token_ids
    from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
    from clip_triton.exporter.runtimes.torch import torch_embed
    from clip_triton.exporter.sources import tower_modules

    out = tmp_path / "export"
    loaded, manifest = _export(name, out)

    # The gate export_model applied (batch 1 and 8), as recorded for later stages.
    for tower in ("image", "text"):
        record = manifest.export_parity[tower]
        assert record["min_cosine"] >= MIN_COSINE, (tower, record)
        assert set(record["batches"]) == {"batch_1", "batch_8"}

    # Sane manifest: what the repository, tokenizer and engine stages read.
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    assert manifest.embed_dim == embed_dim
    assert manifest.image_size == _expected_image_size(name)
    h, w = manifest.image_size
    assert manifest.image.input.shape == [-1, 3, h, w] and manifest.image.input.dtype == "float32"
    assert manifest.tokenizer.context_length == context_length
    assert manifest.text.input.shape == [-1, context_length] and manifest.text.input.dtype == "int32"
    for tower in (manifest.image, manifest.text):
        assert tower.output.shape == [-1, embed_dim]
    assert {"image_encoder.onnx", "text_encoder.onnx"} <= set(manifest.files)
    assert manifest.exporter in ("torchscript", "dynamo") or manifest.exporter.startswith("image:")

    # Independent of the gate: other inputs, another batch size (3), unit-norm outputs.
    modules = tower_modules(loaded)
    pixels = sample_pixels(loaded.preprocess, 3, seed=7)
    ids = sample_token_ids(loaded, 3, seed=7)[::-1].copy()  # other rows, other order
    for tower, inputs in (("image", pixels), ("text", ids)):
        got = ort_embed(ort_session(out / f"{tower}_encoder.onnx"), inputs)
        want = torch_embed(modules[tower], inputs)
        assert got.shape == (3, embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
        assert cosine_rows(want, got).min() >= MIN_COSINE, tower
    assert ids.min() >= 0 and ids.max() < manifest.tokenizer.vocab_size  # valid for the model's vocab
    # Rows must differ: a constant (e.g. always-pad) pooling would pass cosine trivially.
    session = ort_session(out / "text_encoder.onnx")
    text = ort_embed(session, ids)
    assert np.abs(text[0] - text[1]).max() > 1e-3

    text_tower = getattr(loaded.model, "text", None)
    pool = getattr(text_tower, "pool_type", None) or getattr(loaded.model, "text_pool_type", None)
    if "SigLIP" in name:
        # SigLIP pools the last position (no mask) and has a logit bias later stages need.
        assert pool == "last" and manifest.logit_bias is not None
    if pool == "last":
        # Changing only the last id must change the embedding: the graph pools position -1.
        changed = ids.copy()
        changed[:, -1] = (changed[:, -1] + 5) % manifest.tokenizer.vocab_size
        assert np.abs(ort_embed(session, changed) - text).max() > 1e-3


def test_mobileclip_is_reparameterised_before_export() -> None:
    """The exported graph must be the fused inference form, and fusing must not change outputs."""
    import open_clip
    import torch

    from clip_triton.exporter.sources.open_clip import DEFAULT_SEED, load_model

    loaded = load_model("MobileCLIP2-S0", random_weights=True)
    blocks = [m for m in loaded.model.modules() if hasattr(m, "reparameterize")]
    assert blocks, "MobileCLIP2 trunk has no re-parameterisable blocks: the check would be vacuous"
    unfused = [type(m).__name__ for m in blocks if getattr(m, "reparam_conv", None) is None]
    assert not unfused, f"blocks left unfused: {sorted(set(unfused))}"

    torch.manual_seed(DEFAULT_SEED)  # the same random model, not re-parameterised
    raw = open_clip.create_model("MobileCLIP2-S0", pretrained=None).float().eval()
    assert any(getattr(m, "reparam_conv", 0) is None for m in raw.modules())
    pixels = torch.randn(2, 3, *loaded.preprocess.size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused, train_form = loaded.model.encode_image(pixels), raw.encode_image(pixels)
    cos = torch.nn.functional.cosine_similarity(fused, train_form, dim=-1)
    assert cos.min().item() > 0.9999, cos


@slow
@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-H-14-quickgelu"])
def test_large_families_export(name: str, tmp_path: Path) -> None:
    """OpenAI/LAION ViT-L and the DFN (ViT-H-14-quickgelu) architecture; minutes each on 2 cores."""
    _, manifest = _export(name, tmp_path / "export")
    for tower in ("image", "text"):
        assert manifest.export_parity[tower]["min_cosine"] >= MIN_COSINE


def test_transformers_rows_are_known_shapes_and_the_readme_shows_the_json() -> None:
    """Cheap (no export): each `hf:` entry names a benchmarks/hf_checkpoints.py shape with a tokenizer note, and
    the README's table and COVERAGE.md are what coverage.json renders to (rows, the peak memory column)."""
    import json

    from benchmarks import coverage
    from benchmarks.hf_checkpoints import SHAPES

    hf = [e for e in coverage.MODELS if e.hf_shape]
    assert {e.hf_shape for e in hf} == {s for s in SHAPES if not s.endswith("-tiny")}
    for entry in hf:
        assert entry.name == f"hf:{entry.hf_shape}" and "tokenizer:" in coverage.entry_notes(entry)
        assert "random weights" in coverage.entry_notes(entry)
    data = json.loads((coverage.HERE / "coverage.json").read_text())
    rendered = coverage.render_markdown(data)
    assert (coverage.HERE / "COVERAGE.md").read_text() == rendered
    readme = coverage.README.read_text()
    block = readme[readme.index(coverage.README_BEGIN) + len(coverage.README_BEGIN) : readme.index(coverage.README_END)]
    assert block.strip().splitlines() == [line for line in rendered.splitlines() if line.startswith("|")]
    for name, row in data["models"].items():
        if row.get("source") == "transformers" and row.get("status") == "ok":
            assert row["peak_memory"]["export"]["peak_gib"] > 0, name
            assert "peak memory GiB" in rendered
