"""Hugging Face Transformers checkpoints with random weights, built offline: `save_pretrained` folders of
`CLIPModel` and `SiglipModel` (SigLIP, fixed-resolution SigLIP 2) with their image processor and tokenizer.

The tests (tiny shapes) and the coverage benchmark (the real architectures' shapes) export these with
`--hf-model FOLDER`. Tokenizers are the real kinds, made here: CLIP's byte-level BPE from open_clip's
bundled vocabulary (the real 49,408-token CLIP tokenizer), SigLIP's SentencePiece (`spiece.model` only,
like google/siglip-*), and a Gemma-style byte-fallback BPE `tokenizer.json` for SigLIP 2. The last two
are trained on a few captions: small vocabularies, the real tokenizer classes and file formats.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

# Captions the small tokenizers are trained on.
_CORPUS = [
    f"a photo of a {size} {colour} {shape}"
    for size in ("small", "big", "tiny", "large")
    for colour in ("red", "green", "blue", "yellow", "purple", "white")
    for shape in ("circle", "square", "triangle", "star", "house", "cat", "dog")
]

# The towers' shapes: tiny ones for tests, then the real architectures' (config values as published).
SHAPES: dict[str, dict[str, Any]] = {
    "clip-tiny": {
        "kind": "clip", "projection_dim": 16, "image_size": 32,
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    },
    "siglip-tiny": {
        "kind": "siglip", "image_size": 32,
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64),
    },
    "siglip2-tiny": {
        "kind": "siglip2", "image_size": 32,
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=512),
    },
    # openai/clip-vit-base-patch32, openai/clip-vit-large-patch14 (CLIPConfig)
    "clip-vit-base-patch32": {
        "kind": "clip", "projection_dim": 512, "image_size": 224,
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=32),
        "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    },
    "clip-vit-large-patch14": {
        "kind": "clip", "projection_dim": 768, "image_size": 224,
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
    # google/siglip-base-patch16-224, google/siglip-so400m-patch14-384, google/siglip2-base-patch16-224
    "siglip-base-patch16-224": {
        "kind": "siglip", "image_size": 224,
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=32000),
    },
    "siglip-so400m-patch14-384": {
        "kind": "siglip", "image_size": 384,
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       patch_size=14),
        "text": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     vocab_size=32000),
    },
    "siglip2-base-patch16-224": {
        "kind": "siglip2", "image_size": 224,
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=256000),
    },
}


def clip_tokenizer() -> Any:
    """transformers' CLIPTokenizer over open_clip's bundled BPE: the real CLIP vocabulary and merges."""
    import open_clip
    from transformers import CLIPTokenizer

    from clip_triton.exporter.base.tokenization import tokenizer_module

    byte_encoder = tokenizer_module().bytes_to_unicode()
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(byte_encoder.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def siglip_tokenizer(folder: Path) -> Any:
    """SiglipTokenizer over a small SentencePiece unigram model trained here (spiece.model, as google/siglip-*)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=buffer, vocab_size=64, hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    return SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=64)


def gemma_tokenizer(vocab_size: int = 400) -> Any:
    """GemmaTokenizer (SigLIP 2's) over a byte-fallback BPE trained here."""
    import json

    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges)


def save_checkpoint(shape: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of `shape` (SHAPES) with its processor, saved with save_pretrained."""
    import torch
    import transformers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    transformers.logging.disable_progress_bar()
    spec = SHAPES[shape]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = spec["image_size"]
    vision = {**spec["vision"], "image_size": size}
    torch.manual_seed(seed)
    if spec["kind"] == "clip":
        tokenizer = clip_tokenizer()
        text = {**spec["text"], "vocab_size": 49408, "max_position_embeddings": 77,
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"]))
        images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor: Any = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    else:
        tokenizer = siglip_tokenizer(folder) if spec["kind"] == "siglip" else gemma_tokenizer()
        text = {**spec["text"], "max_position_embeddings": 64}
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        images = SiglipImageProcessor(size={"height": size, "width": size})
        processor = SiglipProcessor(image_processor=images, tokenizer=tokenizer)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
