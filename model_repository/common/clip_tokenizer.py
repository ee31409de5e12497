"""Torch-free text tokenisation, identical to open_clip's tokenizers (open_clip/tokenizer.py).

ONE implementation shared by the Triton `*_text_tokenize` python model (copied into every
repository) and `exporter.tokenization.FileTokenizer`. Needs numpy, ftfy and regex; the
Hugging Face file path also needs the `tokenizers` package (not `transformers`).

- `ClipBpeTokenizer`: open_clip's `SimpleTokenizer` (OpenAI CLIP BPE, bpe_simple_vocab_16e6.txt.gz
  beside this file): [SOT] + BPE + [EOT], truncated to the context length with EOT kept last.
- `HfFileTokenizer`: open_clip's `HFTokenizer.__call__` over a tokenizer.json: clean fn,
  truncation + padding to the context length, optional removal of the SEP token.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import string
from functools import lru_cache

import ftfy
import numpy as np
import regex as re

DEFAULT_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map of the CLIP BPE (avoids whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:], strict=True)}


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize_text(text: str) -> str:
    """big_vision's canonicalisation, as open_clip applies it: no punctuation, lower case."""
    text = text.replace("_", " ")
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = text.lower()
    return " ".join(text.split()).strip()


CLEAN_FNS = {
    "lower": lambda x: whitespace_clean(basic_clean(x)).lower(),
    "whitespace": lambda x: whitespace_clean(basic_clean(x)),
    "canonicalize": lambda x: canonicalize_text(basic_clean(x)),
}


def clean_fn(kind: str):
    if kind not in CLEAN_FNS:
        raise ValueError(f"unknown text cleaning {kind!r}; expected one of {sorted(CLEAN_FNS)}")
    return CLEAN_FNS[kind]


class ClipBpeTokenizer:
    """open_clip.tokenizer.SimpleTokenizer without torch: returns an int64 array [N, context_length]."""

    def __init__(self, bpe_path: str = DEFAULT_BPE, context_length: int = 77, clean: str = "lower") -> None:
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(bpe_path) as handle:
            merges_text = handle.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        special = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in special}
        self.pat = re.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.context_length = int(context_length)
        self.clean_fn = clean_fn(clean)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        result = " ".join(word)
        # Bounded: a server sees unbounded distinct words; open_clip's cache grows forever.
        if len(self.cache) < 200_000:
            self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        tokens: list[int] = []
        for token in re.findall(self.pat, self.clean_fn(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            tokens.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return tokens

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result


def _special_id(tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return int(tid)
    return None


class HfFileTokenizer:
    """open_clip.tokenizer.HFTokenizer semantics over a local tokenizer.json (the `tokenizers` package).

    transformers' fast tokenizer with padding='max_length', truncation=True, max_length=L does:
    enable_truncation(L), enable_padding(length=L, pad_id=pad), encode_batch(add_special_tokens=True).
    The pad token is the file's own padding setting when it has one, else `pad_id`.
    """

    def __init__(
        self,
        path: str,
        context_length: int,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        pad_id: int = 0,
    ) -> None:
        from tokenizers import Tokenizer

        self.path = str(path)
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        self.tokenizer = Tokenizer.from_file(str(path))
        self.context_length = int(context_length)
        self.clean_fn = clean_fn(clean)
        self.strip_sep_token = bool(strip_sep_token)
        padding = data.get("padding") or {}
        self.pad_id = int(padding.get("pad_id", pad_id))
        self.pad_token = padding.get("pad_token") or self.tokenizer.id_to_token(self.pad_id) or "[PAD]"
        self.sep_id = _special_id(self.tokenizer, ("[SEP]", "</s>", "<sep>"))
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer.enable_padding(length=self.context_length, pad_id=self.pad_id, pad_token=self.pad_token)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if context_length is not None and int(context_length) != self.context_length:
            raise ValueError(f"this tokenizer pads to {self.context_length}, not {context_length}")
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        encodings = self.tokenizer.encode_batch([self.clean_fn(t) for t in texts], add_special_tokens=True)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        if self.strip_sep_token and self.sep_id is not None:
            ids[ids == self.sep_id] = 0  # open_clip replaces SEP with 0, not with the pad id
        return ids


def make_tokenizer(
    kind: str,
    context_length: int,
    clean: str = "lower",
    hf_file: str | None = None,
    strip_sep_token: bool = False,
    pad_id: int = 0,
    bpe_path: str = DEFAULT_BPE,
):
    """The tokenizer a manifest's `tokenizer` section describes (kind "clip" or "hf")."""
    if kind == "clip":
        return ClipBpeTokenizer(bpe_path, context_length=context_length, clean=clean)
    if kind == "hf":
        if not hf_file:
            raise ValueError("an 'hf' tokenizer needs its tokenizer.json file")
        return HfFileTokenizer(hf_file, context_length, clean, strip_sep_token, pad_id)
    raise ValueError(f"tokenizer kind {kind!r} cannot be served (only 'clip' and 'hf')")
