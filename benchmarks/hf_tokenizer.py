"""A stand-in tokenizer.json for a model whose text tower needs a Hugging Face tokenizer.

SigLIP/SigLIP2 (Gemma's 256,000 pieces) and MetaCLIP2 (XLM-V's 901,629, or mT5's 250,100) are
served with their tokenizer.json (`clip-triton export --tokenizer-file`), which comes from the hub,
unreachable here. This builds one with the `tokenizers` library that has what the served path
depends on: exactly the model's vocabulary size (open_clip's text_cfg.vocab_size, so every id is a
valid embedding row), the tokenizer family's special tokens at their real ids, and the end token the
text tower pools on (`eos_id`) appended. The other pieces are the built-in captions' words, then
filler. Random-weight rows only: a real model needs its real file.

    python -m benchmarks.hf_tokenizer --model ViT-SO400M-14-SigLIP2-378 --out build/tok/tokenizer.json
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any


# Special tokens by tokenizer family, in id order from 0, and the template around a text.
def _family(specials: list[str], template: str) -> dict[str, Any]:
    return {"specials": specials, "unk": "<unk>", "pad": "<pad>", "template": template}


FAMILIES: dict[str, dict[str, Any]] = {
    "gemma": _family(["<pad>", "<eos>", "<bos>", "<unk>"], "$A <eos>"),
    "xlm-roberta": _family(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>"),
    "t5": _family(["<pad>", "</s>", "<unk>"], "$A </s>"),
}


def family_of(hf_tokenizer_name: str) -> str:
    name = hf_tokenizer_name.lower()
    if "xlm" in name:
        return "xlm-roberta"
    if "mt5" in name or "t5" in name:
        return "t5"
    return "gemma"  # timm/*SigLIP2* and the SigLIP tokenizers open_clip names


def text_config(model_name: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    text = dict(cfg.get("text_cfg", {}))
    if not text.get("hf_tokenizer_name"):
        raise ValueError(f"{model_name} uses open_clip's own BPE tokenizer, not a Hugging Face one")
    return text


def write_tokenizer_json(model_name: str, dest: Path) -> Path:
    """Write the stand-in tokenizer.json for `model_name` to `dest`; returns `dest`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from clip_triton.exporter.parity.samples import SAMPLE_TEXTS

    text = text_config(model_name)
    family = FAMILIES[family_of(str(text["hf_tokenizer_name"]))]
    size = int(text["vocab_size"])
    vocab: dict[str, int] = {}
    for token in family["specials"]:
        vocab[token] = len(vocab)
    for word in sorted({w for t in SAMPLE_TEXTS for w in re.findall(r"\w+|[^\w\s]", t.lower())}):
        if len(vocab) < size:
            vocab.setdefault(word, len(vocab))
    filler = 0
    while len(vocab) < size:
        vocab.setdefault(f"▁piece{filler}", len(vocab))
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=family["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = [(t, vocab[t]) for t in family["specials"] if t in family["template"]]
    tok.post_processor = processors.TemplateProcessing(single=family["template"], special_tokens=specials)
    tok.add_special_tokens(family["specials"])
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    path = write_tokenizer_json(args.model, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
