"""End to end through the real embedded tritonserver: raw bytes / strings in, embeddings out.

One server per model family (session/module fixtures); gRPC with BYTES inputs, as a client would.
"""

from __future__ import annotations

import io
import queue
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_repository import _image_bytes, huge_png_header

from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.parity.metrics import cosine_rows
from helpers import scratch_dir

pytestmark = pytest.mark.server

CAPTIONS = ["a photo of a cat", "", "über café ☕ 東京", "a dog " * 60, "two red cars on a bridge at night"]
IMAGES = [("RGB", (640, 480), "JPEG"), ("RGBA", (200, 300), "PNG"), ("P", (150, 90), "GIF"),
          ("L", (300, 120), "WEBP"), ("RGB", (224, 224), "BMP")]


def _client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _bytes_input(name: str, items: list[bytes]):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    return tensor


def _reference(export_dir: Path):
    """The PyTorch model and open_clip's own preprocess/tokenizer for the manifest."""
    import open_clip

    from clip_triton.exporter.parity.samples import reference_transform
    from clip_triton.exporter.runtimes.torch import torch_embed
    from clip_triton.exporter.sources import load_reference, tower_modules

    manifest = load_manifest(export_dir)
    loaded = load_reference(manifest)
    modules = tower_modules(loaded)
    preprocess = reference_transform(manifest)  # open_clip's eval transform from the manifest's config
    tokenizer = open_clip.get_tokenizer(manifest.model_name)

    def embed_images(items: list[bytes]) -> np.ndarray:
        pixels = np.stack([preprocess(Image.open(io.BytesIO(b))).numpy() for b in items])
        return torch_embed(modules["image"], pixels)

    def embed_texts(texts: list[str]) -> np.ndarray:
        return torch_embed(modules["text"], tokenizer(texts).numpy().astype(np.int32))

    return preprocess, tokenizer, embed_images, embed_texts


@pytest.fixture(scope="module")
def vitb32_reference(served_vitb32):
    return _reference(served_vitb32[2])


def test_ensembles_match_pytorch(served_vitb32, vitb32_reference) -> None:
    server, _, _ = served_vitb32
    _, _, embed_images, embed_texts = vitb32_reference
    client = _client(server)
    images = [_image_bytes(*case, seed=i) for i, case in enumerate(IMAGES)]
    got = client.infer("clip_image", [_bytes_input("image", images)]).as_numpy("embedding")
    assert got.shape == (len(images), 512) and got.dtype == np.float32
    assert cosine_rows(embed_images(images), got).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    texts = [c.encode() for c in CAPTIONS]
    got = client.infer("clip_text", [_bytes_input("text", texts)]).as_numpy("embedding")
    assert cosine_rows(embed_texts(CAPTIONS), got).min() >= 0.9999


def test_preprocess_and_tokenize_models_are_exact(served_vitb32, vitb32_reference) -> None:
    server, _, _ = served_vitb32
    preprocess, tokenizer, _, _ = vitb32_reference
    client = _client(server)
    for i, case in enumerate(IMAGES):
        data = _image_bytes(*case, seed=i)
        pixels = client.infer("clip_image_preprocess", [_bytes_input("image", [data])]).as_numpy("pixel_values")
        assert np.abs(pixels[0] - preprocess(Image.open(io.BytesIO(data))).numpy()).max() < 1e-6, case
    ids = client.infer("clip_text_tokenize", [_bytes_input("text", [c.encode() for c in CAPTIONS])])
    ids = ids.as_numpy("input_ids")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, tokenizer(CAPTIONS).numpy())


def _fire(client, model: str, name: str, items: list[bytes]) -> list:
    """One request per item, all in flight at once; results in item order (array or exception)."""
    results: queue.Queue = queue.Queue()
    for i, item in enumerate(items):
        client.async_infer(model, [_bytes_input(name, [item])], partial(results, i))
    out: list = [None] * len(items)
    for _ in items:
        i, result, error = results.get(timeout=120)
        out[i] = error if error is not None else result.as_numpy("embedding")
    return out


def partial(results: queue.Queue, index: int):
    return lambda result, error: results.put((index, result, error))


def test_concurrent_requests_are_batched(served_vitb32) -> None:
    server, _, _ = served_vitb32
    client = _client(server)
    texts = [f"caption number {i}".encode() for i in range(48)]
    out = _fire(client, "clip_text", "text", texts)
    assert all(isinstance(o, np.ndarray) and o.shape == (1, 512) for o in out)
    stats = client.get_inference_statistics("clip_text_encoder").model_stats[0]
    assert stats.execution_count < stats.inference_count, (stats.execution_count, stats.inference_count)


def test_bad_inputs_fail_alone_and_server_stays_up(served_vitb32) -> None:
    server, _, _ = served_vitb32
    client = _client(server)
    good = _image_bytes("RGB", (320, 240), "JPEG", seed=7)
    corrupt = good[: len(good) // 3]
    images = [good, b"", b"garbage bytes", huge_png_header(), corrupt, good]
    out = _fire(client, "clip_image", "image", images)
    assert isinstance(out[0], np.ndarray) and isinstance(out[5], np.ndarray)
    np.testing.assert_allclose(out[0], out[5], atol=1e-6)
    messages = [str(o) for o in out[1:5]]
    assert "empty image" in messages[0]
    assert "not an image in a supported format" in messages[1]
    assert "12000x12000" in messages[2] and "megapixels" in messages[2]
    assert "corrupt JPEG" in messages[3]
    texts = [b"fine text", b"bad \xff\xfe utf-8", b"also fine"]
    out = _fire(client, "clip_text", "text", texts)
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)
    assert "not valid UTF-8" in str(out[1])
    # A request holding a good and a bad item fails as a whole, naming the item.
    import tritonclient.utils

    with pytest.raises(tritonclient.utils.InferenceServerException, match="item 1: empty image"):
        client.infer("clip_image", [_bytes_input("image", [good, b""])])
    assert client.is_server_live() and client.is_model_ready("clip_image") and server.running()


@pytest.fixture(scope="module")
def served_squash(tmp_path_factory: pytest.TempPathFactory):
    """A second family: SigLIP-style preprocessing (mean/std 0.5, squash, bilinear) on ViT-S-32."""
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.sources.open_clip import load_model, preprocess_overrides
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    with scratch_dir(tmp_path_factory, "squash") as base:
        overrides = preprocess_overrides("0.5", "0.5", "bilinear", "squash")
        export_model(load_model("ViT-S-32", random_weights=True, preprocess=overrides), base / "export")
        repo = write_repository(base / "export", base / "repo", RepositoryOptions(runtime="python"))
        models = ["clip_image_preprocess", "clip_image_encoder", "clip_image"]
        with TritonServer(repo, log_path=base / "tritonserver.log", models=models) as server:
            yield server, base / "export"


def test_second_family_squash_preprocessing(served_squash) -> None:
    server, export_dir = served_squash
    assert load_manifest(export_dir).preprocess.resize_mode == "squash"
    _, _, embed_images, _ = _reference(export_dir)
    client = _client(server)
    images = [_image_bytes(*case, seed=10 + i) for i, case in enumerate(IMAGES)]
    got = client.infer("clip_image", [_bytes_input("image", images)]).as_numpy("embedding")
    assert cosine_rows(embed_images(images), got).min() >= 0.9999
    assert not client.is_model_ready("clip_text")  # only the selected models were loaded


def test_unchanged_onnxruntime_repository_serves_locally(vitb32_export: Path, tmp_path: Path) -> None:
    """The KIND_GPU `onnxruntime` repository for NVIDIA's container, on the embedded server (CPU)."""
    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    repo = write_repository(vitb32_export, tmp_path / "ort", RepositoryOptions(runtime="onnxruntime"))
    assert "KIND_GPU" in (repo / "clip_text_encoder" / "config.pbtxt").read_text()
    with TritonServer(repo, models=["clip_text_tokenize", "clip_text_encoder", "clip_text"]) as server:
        client = _client(server)
        got = client.infer("clip_text", [_bytes_input("text", [b"a photo of a cat"])]).as_numpy("embedding")
        config = client.get_model_config("clip_text_encoder").config
        assert config.instance_group[0].kind == 2  # overridden to KIND_CPU at load
    from clip_triton.exporter.base.tokenization import clip_tokenizer
    from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session

    expected = ort_embed(ort_session(vitb32_export / "text_encoder.onnx"),
                         clip_tokenizer()(["a photo of a cat"]).astype(np.int32))
    assert cosine_rows(expected, got).min() >= 0.99999


def test_server_start_failure_reports_the_log(tmp_path: Path) -> None:
    from clip_triton.exporter.base.common import ClipTritonError
    from clip_triton.exporter.base.server import TritonServer

    repo = tmp_path / "broken"
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "no_such_backend"\n')
    with pytest.raises(ClipTritonError, match="no_such_backend|bad"):
        TritonServer(repo).start(timeout=60)


def test_hf_tokenizer_file_is_shipped_and_served(tmp_path: Path) -> None:
    """SigLIP's tokenizer lives on the hub: a tokenizer.json given at export travels into the
    repository, and the served ids and embeddings match the exporter's (same file, same rules)."""
    import open_clip
    from test_repository import _write_hf_tokenizer

    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.runtimes.torch import torch_embed
    from clip_triton.exporter.sources import tower_modules
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import export_model
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    # SigLIP's text side (its tokenizer settings, last-token pooling) at a tiny width: what travels and is
    # served here is the tokenizer; the full model's shapes are tests/test_coverage.py's.
    real = open_clip.get_model_config("ViT-B-16-SigLIP")
    config = {"embed_dim": 64, "init_logit_bias": real["init_logit_bias"], "custom_text": True,
              "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
              "text_cfg": {**real["text_cfg"], "width": 64, "heads": 2, "layers": 1}}
    tokenizer_file = _write_hf_tokenizer(tmp_path / "tok")
    loaded = load_model("Tiny-SigLIP-text", random_weights=True, tokenizer_file=tokenizer_file, model_config=config)
    manifest = export_model(loaded, tmp_path / "export")
    assert manifest.tokenizer.kind == "hf" and manifest.tokenizer.hf_file == "tokenizer.json"
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    repo = write_repository(tmp_path / "export", tmp_path / "repo", RepositoryOptions(runtime="python"))
    tokenizer_file.unlink()  # the repository must be self-contained
    captions = ["the quick brown fox", "", "THE LAZY dog jumps " * 20, "über ☕"]
    with TritonServer(repo, models=["clip_text_tokenize", "clip_text_encoder", "clip_text"]) as server:
        client = _client(server)
        ids = client.infer("clip_text_tokenize", [_bytes_input("text", [c.encode() for c in captions])])
        got_ids = ids.as_numpy("input_ids")
        got = client.infer("clip_text", [_bytes_input("text", [c.encode() for c in captions])]).as_numpy("embedding")
    want_ids = np.asarray(loaded.tokenizer(captions)).astype(np.int32)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert got_ids.shape == (4, 64) and len({tuple(r) for r in got_ids}) == 4
    want = torch_embed(tower_modules(loaded)["text"], want_ids)
    assert cosine_rows(want, got).min() >= 0.9999
