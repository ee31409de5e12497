"""The Hugging Face tokenizer path served end to end (SigLIP2 / MetaCLIP2 need a tokenizer.json).

The hub is unreachable here, so the test builds the file with the `tokenizers` library
(benchmarks/hf_tokenizer.py): the model's exact vocabulary size and its special tokens at their
real ids. Export with it, write a python-runtime repository, serve it, and run parity: the served
`clip_text` ensemble (tokenize model + text encoder) must match PyTorch on the same ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from benchmarks.hf_tokenizer import text_config, write_tokenizer_json


@pytest.mark.parametrize(
    ("model", "specials"),
    [
        ("ViT-B-16-SigLIP2", {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}),  # Gemma
        ("ViT-L-14-worldwide-quickgelu", {"<pad>": 0, "</s>": 1, "<unk>": 2}),  # mT5
    ],
)
def test_stand_in_tokenizer_has_the_model_vocabulary(model: str, specials: dict[str, int], tmp_path: Path) -> None:
    cfg = text_config(model)
    tok = Tokenizer.from_file(str(write_tokenizer_json(model, tmp_path / "tokenizer.json")))
    assert tok.get_vocab_size() == cfg["vocab_size"]
    assert {name: tok.token_to_id(name) for name in specials} == specials
    ids = tok.encode("a photo of a cat").ids
    assert max(ids) < cfg["vocab_size"] and ids[-1] == cfg.get("eos_id", ids[-1])


@pytest.mark.server
def test_siglip2_text_is_served_with_a_tokenizer_file(tmp_path: Path) -> None:
    """SigLIP 2's text side (Gemma tokenizer.json, 256k vocabulary, last-token pooling, no causal mask) at a
    tiny width through a custom model config: the tokenizer path is what is tested here; the full model's
    shapes are covered by tests/test_coverage.py."""
    import open_clip

    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    real = open_clip.get_model_config("ViT-B-16-SigLIP2")
    config = {
        "embed_dim": 64, "init_logit_bias": real["init_logit_bias"], "custom_text": True,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {**real["text_cfg"], "width": 64, "heads": 2, "layers": 1},
    }
    tokenizer = write_tokenizer_json("ViT-B-16-SigLIP2", tmp_path / "tok" / "tokenizer.json")
    export = tmp_path / "export"
    loaded = load_model("Tiny-SigLIP2-text", random_weights=True, tokenizer_file=tokenizer, model_config=config)
    export_model(loaded, export, max_batch=8)
    repo = write_repository(export, tmp_path / "repo", RepositoryOptions(runtime="python"))
    result = run_parity(export, repository=repo, samples=4)
    assert result["passed"], result["stages"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["triton-tokenize"]["status"] == "pass"  # served ids equal the reference tokenizer's
    assert stages["triton"]["status"] == "pass" and stages["triton"]["towers"]["text"]["min_cosine"] >= 0.99999
