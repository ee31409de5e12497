"""The pixels entry point (`<prefix>_image_pixels`, ClipClient(preprocess="client")) and the
preprocess model's thread pool, against real ONNX Runtime and the real embedded tritonserver."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clip_triton.clients import AsyncClipClient, ClipClient, InvalidItemError, ItemError
from clip_triton.clients.clip_preprocess import Preprocessor
from clip_triton.clients.contract import PIXELS_INPUT
from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.base.pixels import normalize_graph
from clip_triton.exporter.cli import app
from clip_triton.exporter.parity.samples import render_image
from helpers import run_cli

server = pytest.mark.server


def _photos() -> list[bytes]:
    sizes = [("shapes", 640, 480, "JPEG"), ("gradient", 300, 800, "PNG"), ("noise", 333, 222, "WEBP"),
             ("checker", 224, 224, "JPEG"), ("text", 1024, 200, "PNG")]
    return [render_image(p, w, h, "RGB", fmt, seed=i) for i, (p, w, h, fmt) in enumerate(sizes)]


def test_normalize_graph_hands_the_encoder_the_same_bits_as_the_python_preprocess(vitb32_export: Path) -> None:
    """On ViT-B-32's preprocessing (224 px, OpenAI's CLIP mean/std), checked against open_clip's own transform
    for that model; it reads only the export's manifest (no server)."""
    import onnxruntime as ort

    manifest = load_manifest(vitb32_export)
    cfg = manifest.preprocess
    pre = Preprocessor.from_config(asdict(cfg))
    crops = np.stack([pre.crop_bytes(data) for data in _photos()])
    assert crops.dtype == np.uint8 and crops.shape == (5, *cfg.size, 3)
    session = ort.InferenceSession(
        normalize_graph(cfg, "pixel_values").SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (served,) = session.run(None, {PIXELS_INPUT: crops})
    expected = np.stack([pre.from_bytes(data) for data in _photos()])
    assert served.dtype == np.float32 and np.array_equal(served, expected)  # bit for bit, not close
    # And both are open_clip's own transform.
    from types import SimpleNamespace

    from clip_triton.exporter.parity.samples import reference_pixels, reference_transform

    reference = reference_pixels(reference_transform(manifest), [SimpleNamespace(data=d) for d in _photos()])
    assert np.abs(served - reference).max() < 1e-6


@server
def test_client_side_crops_give_the_server_side_embeddings(served_shapes) -> None:
    srv, _repo, _export = served_shapes
    photos = _photos()
    with ClipClient(srv.grpc_url, batch_size=2) as on_server, ClipClient(
        srv.grpc_url, batch_size=2, preprocess="client"
    ) as on_client:
        assert on_client.model_info.image.model == "clip_image_pixels"
        assert on_client.model_info.image.input_datatype == "UINT8"
        want = on_server.embed_images(photos)
        got = on_client.embed_images(photos)
        # PIL images and arrays go the same way (via PNG, as the server would get them).
        from PIL import Image

        pil = Image.open(io.BytesIO(photos[0])).convert("RGB")
        again = on_client.embed_images([pil, np.asarray(pil)])
        assert np.array_equal(again[0], again[1])
        assert float(again[0] @ on_server.embed_images([pil])[0]) >= 0.99999
    assert got.shape == want.shape
    assert float(np.min(np.sum(got * want, axis=1))) >= 0.99999

    async def run_async() -> np.ndarray:
        async with AsyncClipClient(srv.grpc_url, preprocess="client", batch_size=3) as client:
            return await client.embed_images(photos)

    assert float(np.min(np.sum(asyncio.run(run_async()) * want, axis=1))) >= 0.99999


@server
def test_client_side_preprocess_refuses_bad_images_before_sending(served_shapes) -> None:
    srv, _repo, _export = served_shapes
    thin = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (1, 600)).save(thin, format="PNG")  # 600:1, over max_aspect_ratio 100
    with ClipClient(srv.grpc_url, preprocess="client") as client:
        with pytest.raises(InvalidItemError, match=r"item 1 .*cannot decode image"):
            client.embed_images([_photos()[0], b"not an image"])
        with pytest.raises(InvalidItemError, match="max_aspect_ratio"):
            client.embed_images([thin.getvalue()])
    # The server-side path refuses the same image with the server's message.
    with ClipClient(srv.grpc_url) as client, pytest.raises(ItemError, match="max_aspect_ratio"):
        client.embed_images([thin.getvalue()])


@server
def test_pixels_ensemble_refuses_a_wrong_shape_with_invalid_argument(served_shapes) -> None:
    import tritonclient.grpc as grpcclient

    srv, _repo, export = served_shapes
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    height, width = load_manifest(export).preprocess.size
    wrong = np.zeros((1, height + 1, width + 1, 3), dtype=np.uint8)  # not the served crop size
    tensor = grpcclient.InferInput(PIXELS_INPUT, list(wrong.shape), "UINT8")
    tensor.set_data_from_numpy(wrong)
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer("clip_image_pixels", [tensor])
    assert "INVALID_ARG" in str(info.value.status())
    assert client.is_server_live() and client.is_server_ready()


@server
def test_cli_embed_with_client_side_preprocess(served_shapes, tmp_path: Path) -> None:
    srv, _repo, _export = served_shapes
    paths = []
    for i, data in enumerate(_photos()[:3]):
        paths.append(tmp_path / f"img{i}.bin")
        paths[-1].write_bytes(data)
    outs = {}
    for where in ("server", "client"):
        out = tmp_path / f"{where}.npy"
        result = CliRunner().invoke(
            app, ["embed", *map(str, paths), "--url", srv.grpc_url, "--preprocess", where, "--out", str(out), "-q"]
        )
        assert result.exit_code == 0, result.output
        outs[where] = np.load(out)
    assert float(np.min(np.sum(outs["server"] * outs["client"], axis=1))) >= 0.99999
    bad = run_cli("embed", str(paths[0]), "--url", srv.grpc_url, "--preprocess", "gpu")
    assert bad.returncode == 2 and "preprocess must be 'server' or 'client'" in bad.stderr
    assert "Traceback" not in bad.stderr


@server
def test_preprocess_thread_pool_serves_concurrent_batches_exactly(shapes_export: Path, tmp_path: Path) -> None:
    """Two threads per instance, dynamic batches of concurrent requests with a bad item among them:
    every good request gets the single-item pixels, the bad one alone fails."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    from clip_triton.exporter.base.server import TritonServer
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    opts = RepositoryOptions(runtime="python", preprocess_threads=2, queue_delay_us=50_000)
    repo = write_repository(shapes_export, tmp_path / "repo", opts)
    config = (repo / "clip_image_preprocess" / "config.pbtxt").read_text()
    assert '"threads"' in config and 'string_value: "2"' in config
    manifest = load_manifest(shapes_export)
    pre = Preprocessor.from_config(asdict(manifest.preprocess))
    photos = _photos()
    items = [*photos, b"broken", *photos]
    with TritonServer(repo, models=["clip_image_preprocess"]) as served:  # the one model tested here
        def send(data: bytes) -> np.ndarray | str:
            client = grpcclient.InferenceServerClient(served.grpc_url)
            array = np.array([data], dtype=np.object_).reshape(1, 1)
            tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
            tensor.set_data_from_numpy(array)
            try:
                return client.infer("clip_image_preprocess", [tensor]).as_numpy(manifest.image.input.name)[0]
            except grpcclient.InferenceServerException as exc:
                return str(exc.status())

        with ThreadPoolExecutor(len(items)) as pool:
            results = list(pool.map(send, items))
        # Triton counts a request only once its response is out (late on a loaded host): wait for all.
        answered = sum(isinstance(r, np.ndarray) for r in results)
        for _ in range(100):
            stats = grpcclient.InferenceServerClient(served.grpc_url).get_inference_statistics("clip_image_preprocess")
            model_stats = stats.model_stats[0]
            if model_stats.inference_count >= answered:
                break
            time.sleep(0.05)
    assert model_stats.execution_count < model_stats.inference_count  # requests were batched together
    for data, result in zip(items, results, strict=True):
        if data == b"broken":
            assert "INVALID_ARG" in str(result)
        else:
            assert isinstance(result, np.ndarray) and np.array_equal(result, pre.from_bytes(data))
