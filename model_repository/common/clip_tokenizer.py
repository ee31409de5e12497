"""Torch-free text tokenisation, identical to open_clip's tokenizers (open_clip/tokenizer.py).

ONE implementation shared by the Triton `*_text_tokenize` python model (copied into every
repository) and `clip_triton.exporter.base.tokenization.FileTokenizer`. Needs numpy, ftfy and regex; the
Hugging Face file path also needs the `tokenizers` package (not `transformers`).

- `ClipBpeTokenizer`: open_clip's `SimpleTokenizer` (OpenAI CLIP BPE, bpe_simple_vocab_16e6.txt.gz
  beside this file): [SOT] + BPE + [EOT], truncated to the context length with EOT kept last.
- `HfFileTokenizer`: open_clip's `HFTokenizer.__call__` over a tokenizer.json: clean fn,
  truncation + padding to the context length, optional removal of the SEP token. Also serves
  Hugging Face Transformers checkpoints' own tokenizers (clean "none": the file's normalizer does it
  all; "siglip": SiglipTokenizer's canonicalize_text; padding on the tokenizer's side).
"""

from __future__ import annotations

import gzip
import heapq
import html
import json
import os
import re as std_re
import string
from collections import OrderedDict
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


def siglip_canonicalize(text: str) -> str:
    """transformers' SiglipTokenizer.canonicalize_text (lower case, no punctuation, whitespace runs
    to one space; stdlib `re`, as transformers uses), without open_clip's ftfy/html clean."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return std_re.sub(r"\s+", " ", text).strip()


CLEAN_FNS = {
    "none": lambda x: x,  # a Transformers tokenizer.json normalises inside the file
    "siglip": siglip_canonicalize,
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

    def __init__(
        self,
        bpe_path: str = DEFAULT_BPE,
        context_length: int = 77,
        clean: str = "lower",
        cache_size: int = 100_000,
        cache_max_word: int = 64,
    ) -> None:
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
        self.rank_pairs = {i: m for m, i in self.bpe_ranks.items()}
        self.special = {t: t for t in special}  # open_clip's initial cache: never split
        self.cache: OrderedDict[str, str] = OrderedDict()  # LRU of short words' BPE
        self.cache_size = cache_size
        self.cache_max_word = cache_max_word
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
        """open_clip's SimpleTokenizer.bpe, same output, O(n log n) in the word's length (see _merge)."""
        special = self.special.get(token)
        if special is not None:
            return special
        cached = self.cache.get(token)
        if cached is not None:
            self.cache.move_to_end(token)
            return cached
        if len(token) < 2:
            return token + "</w>"
        result = " ".join(self._merge([*token[:-1], token[-1] + "</w>"]))
        # Bounded (a server sees unbounded distinct words; open_clip's cache grows forever) and only
        # short words: a hostile client's 100,000-letter words would otherwise fill it with megabytes.
        if len(token) <= self.cache_max_word:
            self.cache[token] = result
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)  # least recently used
        return result

    def _merge(self, word: list[str]) -> list[str]:
        """The BPE merges of open_clip's loop, with a linked list of symbols and a heap of (rank, position).

        open_clip repeats: take the lowest-rank pair present anywhere in the word, merge ALL its
        occurrences left to right (non-overlapping), recompute the pairs. That loop is quadratic in the
        word's length (78 s for one 100,000-letter word). Here each round pops every heap entry of the
        lowest rank (in position order), merges those still valid (lazy invalidation: the entry's two
        symbols are still there and not consumed by this round's merge just left of it), and only then
        pushes the pairs the merges created: a new pair of lower rank waits for the next round, as in
        open_clip. Positions are the index of a symbol's first character, so they stay in word order.
        """
        ranks, pairs = self.bpe_ranks, self.rank_pairs
        n = len(word)
        sym: list[str | None] = word  # None: merged into the symbol on its left
        nxt = list(range(1, n + 1))  # n: no next symbol
        prv = list(range(-1, n - 1))  # -1: no previous symbol
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((word[i], word[i + 1]))) is not None]
        heapq.heapify(heap)
        pop = heapq.heappop
        while heap:
            rank = heap[0][0]
            first, second = pairs[rank]
            merged = first + second
            done = []
            # Entries of one rank pop in position order (ties of a tuple heap): left to right, as open_clip.
            # A duplicate, stale or consumed entry fails the check: its symbols are no longer (first, second).
            while heap and heap[0][0] == rank:
                i = pop(heap)[1]
                j = nxt[i]
                if sym[i] != first or j >= n or sym[j] != second:
                    continue
                sym[i], sym[j] = merged, None
                k = nxt[i] = nxt[j]
                if k < n:
                    prv[k] = i
                done.append(i)
            for i in done:
                p, k = prv[i], nxt[i]
                if p >= 0 and (r := ranks.get((sym[p], sym[i]))) is not None:
                    heapq.heappush(heap, (r, p))
                if k < n and (r := ranks.get((sym[i], sym[k]))) is not None:
                    heapq.heappush(heap, (r, i))
        return [s for s in sym if s is not None]

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of `text` (open_clip's SimpleTokenizer.encode). With `max_tokens`, stops once it has
        that many (and returns only those): the words after them are never split, as their ids are unused."""
        tokens: list[int] = []
        for match in self.pat.finditer(self.clean_fn(text)):
            if max_tokens is not None and len(tokens) >= max_tokens:
                break
            token = "".join(self.byte_encoder[b] for b in match.group().encode("utf-8"))
            tokens.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return tokens if max_tokens is None else tokens[:max_tokens]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            # open_clip keeps tokens[:length] with EOT forced last: SOT + at most length - 2 BPE ids + EOT.
            tokens = [self.sot_token_id, *self.encode(text, max(length - 2, 0)), self.eot_token_id]
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
        padding_side: str = "right",
    ) -> None:
        from tokenizers import Tokenizer

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, got {padding_side!r}")

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
        self.tokenizer.enable_padding(
            length=self.context_length, pad_id=self.pad_id, pad_token=self.pad_token, direction=padding_side
        )

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
    padding_side: str = "right",
):
    """The tokenizer a manifest's `tokenizer` section describes (kind "clip" or "hf")."""
    if kind == "clip":
        return ClipBpeTokenizer(bpe_path, context_length=context_length, clean=clean)
    if kind == "hf":
        if not hf_file:
            raise ValueError("an 'hf' tokenizer needs its tokenizer.json file")
        return HfFileTokenizer(hf_file, context_length, clean, strip_sep_token, pad_id, padding_side)
    raise ValueError(f"tokenizer kind {kind!r} cannot be served (only 'clip' and 'hf')")
