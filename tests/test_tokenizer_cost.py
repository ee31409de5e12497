"""Tokenisation cost and the python models' per-request time budget (issue 21, "Hardening II").

A 100,000-letter word (within max_chars) took 78 s in open_clip's BPE loop, quadratic in the word's
length, and every later request waited behind it. clip_tokenizer.py now merges in O(n log n) and stops
once the context length is full; its ids must stay identical to open_clip's SimpleTokenizer.
`max_request_seconds` bounds how long one request can hold a python model instance.
docs/limits.md ("Tokenizer cost", "Per-request time budget") describes the behaviour tested here.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import random
import shutil
import string
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_repository import TEXTS

from clip_triton.exporter.base.common import REPOSITORY_SOURCES, ClipTritonError
from clip_triton.exporter.base.tokenization import clip_tokenizer

N = 100_000


def _random_word(n: int, seed: int, alphabet: str = string.ascii_lowercase) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return clip_tokenizer()


# -- identical ids --------------------------------------------------------------------------------

EDGE_TEXTS = [
    # merge-rank edge cases: runs of one symbol and overlapping pairs, odd and even lengths
    *("a" * k for k in (2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100)),
    *("ab" * k for k in (1, 2, 3, 5, 8, 20)),
    *(("ab" * k + "a") for k in (1, 2, 7)),
    "aab" * 9, "abc" * 11, "ssssss", "mississippi", "bananabanana", "eeeeeeeeeeeee", "llllll", "thththth",
    "iiiiiiiiiin", "ininininin", "oooooooooo!", "zzzzzzzzzzzzzzzzzzzzzz",
    # long runs of one character
    "a" * 1000, "a" * 10_000, "!" * 1000, "1" * 1000, "😀" * 500, "東" * 1000, "é" * 1000, "." * 10_000,
    # long words (the quadratic case), random and repeated; sized so open_clip's own loop takes ~1 s in all
    _random_word(1000, 1), _random_word(3000, 11), _random_word(10_000, 2, "etaoin"), _random_word(10_000, 10, "abcd"),
    "photograph" * 1000, "catdog" * 300, _random_word(2000, 3, "abcdefghijklmnopqrstuvwxyzéüößçñ"),
    # many short words; later words never reach the output
    "a photo of a cat " * 1000, " ".join(_random_word(random.Random(k).randint(1, 9), k) for k in range(5000)),
    # unicode: scripts, combining marks, ZWJ emoji, RTL, special-token text
    "Zürich Ærøskøbing naïve café crème brûlée",
    "東京タワー 서울 Москва القاهرة मुंबई ελληνικά",
    "e\u0301 a\u0300 n\u0303 " * 10 + "👩\u200d👩\u200d👧\u200d👦 👍🏽 🇫🇷",
    "\u202eevil\u202c <start_of_text> <end_of_text> <|endoftext|> &amp;amp; &lt;b&gt;",
    "".join(random.Random(4).choice(["a", "é", "東", "😀", "б", "ع", "\u0301", "👍🏽", "क", " "]) for _ in range(3000)),
]


@pytest.mark.parametrize("length", [77, 64])
def test_ids_equal_open_clip_simple_tokenizer(reference, ours, length: int) -> None:
    texts = TEXTS + EDGE_TEXTS
    start = time.perf_counter()
    expected = reference(texts, context_length=length).numpy()
    reference_seconds = time.perf_counter() - start
    got = ours(texts, context_length=length)
    assert got.shape == (len(texts), length) and got.dtype == np.int64
    for row, text in enumerate(texts):
        np.testing.assert_array_equal(got[row], expected[row], err_msg=repr(text[:60]))
    assert reference_seconds < 10, f"open_clip took {reference_seconds:.1f}s: keep the reference cases small"


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_tiny_context_lengths_keep_open_clip_truncation(reference, ours, length: int) -> None:
    texts = ["", "a", "a photo of a cat", "x" * 50]
    np.testing.assert_array_equal(ours(texts, context_length=length), reference(texts, context_length=length).numpy())


def test_full_encode_equals_open_clip(reference, ours) -> None:
    """encode() without a token cap is open_clip's whole encode (exporter callers may use it)."""
    for text in ["a photo of a cat " * 200, _random_word(5000, 5), "ab" * 3000, TEXTS[4] * 10]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.encode(text, max_tokens=10) == reference.encode(text)[:10]


def test_bpe_merges_equal_open_clip_on_random_words(reference, ours) -> None:
    """Seeded fuzz of the merge loop alone: words over small alphabets make many overlapping pairs."""
    rng = random.Random(2026)
    alphabets = ["ab", "aab", "abc", "th e", "ea", "in", "ssi", "a", "etaoinshrdlu", string.ascii_lowercase,
                 "0123456789,.", "éü東😀!?'"]
    for _ in range(2000):
        word = "".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.choice([2, 3, 4, 5, 8, 13, 40, 150])))
        token = "".join(ours.byte_encoder[b] for b in word.encode("utf-8"))
        expected = reference.bpe(token)
        reference.cache.pop(token, None)  # keep the reference's own cache from growing
        assert ours.bpe(token) == expected, repr(word)


# -- cost -----------------------------------------------------------------------------------------

HOSTILE = {  # built when the test runs, not at collection
    "one 100,000-letter random word": lambda: _random_word(N, 6),
    "one letter repeated": lambda: "a" * N,
    "many short words": lambda: " ".join(_random_word(random.Random(k).randint(1, 9), k) for k in range(20_000))[:N],
    "one emoji repeated (400,000 UTF-8 bytes in one word)": lambda: "😀" * N,
    "random CJK letters": lambda: _random_word(N, 7, "".join(chr(c) for c in range(0x4E00, 0x4E00 + 2000))),
    "punctuation": lambda: _random_word(N, 8, string.punctuation),
    "digits": lambda: _random_word(N, 9, string.digits),
    "&amp; entities": lambda: "&amp;" * (N // 5),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_100k_character_text_tokenizes_in_well_under_a_second(name: str) -> None:
    text = HOSTILE[name]()
    assert len(text) <= N
    tokenizer = clip_tokenizer()  # a cold cache
    start = time.perf_counter()
    ids = tokenizer([text])
    seconds = time.perf_counter() - start
    assert ids[0, 0] == tokenizer.sot_token_id and tokenizer.eot_token_id in ids[0]
    print(f"{name}: {seconds:.3f}s")
    assert seconds < 2.0, f"{name}: {seconds:.2f}s (open_clip's quadratic loop took 51-78 s on the random word)"


def test_bpe_cache_stays_bounded_and_skips_long_words() -> None:
    tokenizer = clip_tokenizer()
    tokenizer.cache_size = 50
    for k in range(300):
        tokenizer.bpe(f"word{k}")
    assert len(tokenizer.cache) == 50 and "word299" in tokenizer.cache and "word0" not in tokenizer.cache
    long_word = "b" * (tokenizer.cache_max_word + 1)
    tokenizer.bpe(long_word)
    assert long_word not in tokenizer.cache
    assert tokenizer.bpe("<start_of_text>") == "<start_of_text>"  # open_clip's special tokens are never split


# -- the per-request time budget, in the real model code with a stand-in pb_utils ------------------


class _TritonError:
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs, self.error = output_tensors, error


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


def _stub_pb_utils():
    module = type(sys)("triton_python_backend_utils")
    module.TritonError, module.InferenceResponse, module.Tensor = _TritonError, _Response, _Tensor
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    return module


def _request(name: str, items: list) -> dict:
    return {name: _Tensor(name, np.array(items, dtype=object).reshape(-1, 1))}


@pytest.fixture()
def load_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Load a python model's model.py from a folder laid out like a written repository's version folder."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_pb_utils())
    monkeypatch.setattr(sys, "path", list(sys.path))  # model.py puts its folder first
    for name in ("clip_tokenizer", "clip_preprocess", "bundled_deps", "request_budget"):  # model.py's top-level imports
        monkeypatch.delitem(sys.modules, name, raising=False)

    def load(role: str, files: list[Path], parameters: dict[str, str], inputs, outputs, instances: int = 1):
        version = tmp_path / role / "1"
        version.mkdir(parents=True)
        shutil.copy2(REPOSITORY_SOURCES / role / "model.py", version / "model.py")
        for path in files:
            shutil.copy2(path, version / path.name)
        spec = importlib.util.spec_from_file_location(f"_under_test_{role}", version / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()},
                  "input": [{"name": inputs}], "output": [{"name": outputs}],
                  "instance_group": [{"count": instances}]}
        model.initialize({"model_config": json.dumps(config)})
        return model

    yield load
    for name in ("clip_tokenizer", "clip_preprocess", "bundled_deps", "request_budget", "_under_test_text_tokenize",
                 "_under_test_image_preprocess"):
        sys.modules.pop(name, None)


def _text_model(load_model, seconds: str):
    common = REPOSITORY_SOURCES / "common"
    tokenizer = json.dumps({"kind": "clip", "context_length": 77, "clean": "lower"})
    files = [common / name for name in ("clip_tokenizer.py", "bundled_deps.py", "request_budget.py")]
    files.append(common / "bpe_simple_vocab_16e6.txt.gz")
    params = {"tokenizer": tokenizer, "output_dtype": "int32", "max_chars": "100000", "max_request_seconds": seconds}
    return load_model("text_tokenize", files, params, "text", "input_ids")


def test_text_request_over_its_budget_fails_alone(load_model) -> None:
    model = _text_model(load_model, "0.1")
    hostile = [_random_word(N, 100 + k).encode() for k in range(6)]  # ~0.2 s each, distinct: no cache help
    good = [b"a photo of a cat", "東京 café".encode()]
    responses = model.execute([_request("text", good), _request("text", hostile), _request("text", good[:1]),
                               _request("text", [("word " * 30_000).encode()])])
    assert len(responses) == 4
    for k, n in ((0, 2), (2, 1)):
        assert responses[k].error is None
        np.testing.assert_array_equal(responses[k].outputs[0].array,
                                      clip_tokenizer()([t.decode() for t in good[:n]]).astype(np.int32))
    error = responses[1].error
    assert error.code is None, "a spent budget is not the item's fault: INTERNAL, not INVALID_ARGUMENT"
    assert "over its time budget of 0.1 s (model parameter max_request_seconds)" in error.message
    assert " of 6 items tokenized" in error.message and "\n" not in error.message
    assert int(error.message.split(" of 6 items")[0].rsplit(" ", 1)[-1]) < 6
    assert responses[3].error.code == "INVALID_ARG" and "max_chars" in responses[3].error.message


def test_text_budget_zero_turns_it_off(load_model) -> None:
    model = _text_model(load_model, "0")
    hostile = [_random_word(20_000, 200 + k).encode() for k in range(3)]
    (response,) = model.execute([_request("text", hostile)])
    assert response.error is None and response.outputs[0].array.shape == (3, 77)


def test_bad_budget_refuses_to_load(load_model) -> None:
    with pytest.raises(ValueError, match="max_request_seconds must be a finite number >= 0"):
        _text_model(load_model, "nan")


@functools.lru_cache
def _png(width: int, height: int) -> bytes:
    """A flat PNG: a few KB to send, every pixel to inflate and resize (3000 x 3000: ~0.1 s)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_image_request_over_its_budget_fails_alone(load_model) -> None:
    from clip_triton.clients import clip_preprocess
    from clip_triton.clients.clip_preprocess import ImageLimits, Preprocessor
    from clip_triton.exporter.base.manifest import PreprocessConfig

    preprocess = asdict(PreprocessConfig(size=[224, 224]))
    common = REPOSITORY_SOURCES / "common"
    files = [common / "bundled_deps.py", common / "request_budget.py", Path(clip_preprocess.__file__)]
    params = {"preprocess": json.dumps(preprocess), "threads": "2", "max_request_seconds": "0.15"}
    model = load_model("image_preprocess", files, params, "image", "pixel_values")
    big = _png(3000, 3000)  # 33 KB, ~0.1 s to decode and resize
    small = _png(64, 48)
    responses = model.execute([_request("image", [big] * 12), _request("image", [small]),
                               _request("image", [small, b"not an image"])])
    error = responses[0].error
    assert error.code is None
    assert "over its time budget of 0.15 s (model parameter max_request_seconds)" in error.message
    assert int(error.message.split(" of 12 items")[0].rsplit(" ", 1)[-1]) < 12
    assert responses[1].error is None
    expected = Preprocessor.from_config(preprocess).from_bytes(small, ImageLimits())
    np.testing.assert_array_equal(responses[1].outputs[0].array[0], expected)
    assert responses[2].error.code == "INVALID_ARG" and "item 1" in responses[2].error.message
    model.finalize()


def test_repository_writes_and_checks_the_budget() -> None:
    from clip_triton.exporter.stages.repository import RepositoryOptions, _check_options

    assert RepositoryOptions().limits()["max_request_seconds"] == 10.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ClipTritonError, match="--max-request-seconds must be a finite number >= 0"):
            _check_options(RepositoryOptions(runtime="python", max_request_seconds=bad))


def test_cli_refuses_a_bad_budget_in_one_line(vitb32_export: Path, tmp_path: Path) -> None:
    from helpers import run_cli

    out = tmp_path / "repo"
    result = run_cli("repository", "--export", str(vitb32_export), "--out", str(out), "--runtime", "python",
                     "--no-python-deps", "-q", "--max-request-seconds", "nan", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors == ["error: --max-request-seconds must be a finite number >= 0 (0 turns the limit off), got nan"]
    assert not out.exists()


# -- the budget in the real embedded tritonserver ---------------------------------------------------


@pytest.mark.server
def test_served_budget_fails_the_slow_request_and_answers_its_batch(vitb32_export: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    from clip_triton.exporter.base.manifest import load_manifest
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.stages.repository import RepositoryOptions, parse_config, write_repository

    opts = RepositoryOptions(runtime="python", max_request_seconds=0.1, python_deps=False)
    repo = write_repository(vitb32_export, tmp_path / "repo", opts)
    assert load_manifest(repo).repository["limits"]["max_request_seconds"] == 0.1
    for name in ("clip_text_tokenize", "clip_image_preprocess"):
        config = parse_config((repo / name / "config.pbtxt").read_text())
        assert config.parameters["max_request_seconds"].string_value == "0.1"
    pixels = parse_config((repo / "clip_image_pixels" / "config.pbtxt").read_text())
    assert "max_request_seconds" not in pixels.parameters  # nothing runs python on the pixels path

    text, image = ("clip_text_tokenize", "text", "input_ids"), ("clip_image_preprocess", "image", "pixel_values")
    cases = [  # ((model, input, output), items): sent at once so dynamic batching puts them in one batch
        (text, [b"a photo of a cat"]),
        (text, [_random_word(N, 300 + k).encode() for k in range(8)]),  # ~0.2 s each
        (text, [b"a photo of a dog"]),
        (image, [_png(64, 48)]),
        (image, [_png(3000, 3000)] * 16),  # ~0.1 s each
        (image, [_png(48, 64)]),
    ]
    with TritonServer(repo, log_path=tmp_path / "log", models=[text[0], image[0]]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        results: list = [None] * len(cases)
        done = threading.Semaphore(0)

        def record(k: int, output: str):
            def callback(result, error) -> None:
                results[k] = ("OK", result.as_numpy(output)) if error is None else (
                    str(error.status()).rsplit(".", 1)[-1], error.message())
                done.release()

            return callback

        for k, ((model, name, output), items) in enumerate(cases):
            tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
            tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
            client.async_infer(model, [tensor], record(k, output))
        for _ in cases:
            assert done.acquire(timeout=60), "a request got no answer"
        client.close()
    for k in (0, 2, 3, 5):
        assert results[k][0] == "OK", results[k]
    np.testing.assert_array_equal(results[0][1], clip_tokenizer()(["a photo of a cat"]).astype(np.int32))
    for k, what, n in ((1, "tokenized", 8), (4, "preprocessed", 16)):
        status, message = results[k]
        assert status == "INTERNAL" and "(model parameter max_request_seconds)" in message, results[k]
        assert int(message.split(f" of {n} items {what}")[0].rsplit(" ", 1)[-1]) < n, message
