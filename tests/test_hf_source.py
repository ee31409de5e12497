"""Hugging Face Transformers checkpoints (--hf-model): tiny CLIPModel, SiglipModel (SentencePiece tokenizer)
and fixed-resolution SigLIP 2 (Gemma tokenizer.json) made offline with random weights and
`save_pretrained`, then export -> fp16 -> repository -> live parity through the embedded tritonserver.

What is served is compared with the checkpoint's own parts: pixels with the image processor's PIL
backend, ids with the tokenizer, embeddings with get_image_features / get_text_features.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hf_checkpoints import save_checkpoint
from clip_triton.exporter.base.common import ClipTritonError
from helpers import run_cli

KINDS = ["clip-tiny", "siglip-tiny", "siglip2-tiny"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_checkpoint(kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}


# ---------------------------------------------------------------- pixels


def _images() -> list:
    """Odd and even sizes (crop offsets that round and floor differently), portrait and landscape, and
    the modes that convert differently: transparency (RGBA, LA, P with a transparent index), grey, CMYK,
    16-bit."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(w: int, h: int, channels: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)

    images = [Image.fromarray(noise(w, h, 3)) for w, h in ((300, 225), (225, 301), (97, 1003), (33, 32), (640, 480))]
    rgba = noise(211, 157, 4)
    rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2], dtype=np.uint8)
    images.append(Image.fromarray(rgba))  # RGBA
    images.append(Image.fromarray(noise(180, 97, 2)))  # LA
    palette = Image.fromarray(noise(123, 77, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 3
    images.append(palette)
    images.append(Image.fromarray(noise(150, 99, 1)[..., 0]))  # L
    images.append(Image.fromarray(noise(77, 131, 3)).convert("CMYK"))
    images.append(Image.fromarray(rng.integers(0, 65535, (90, 61), dtype=np.uint16)))  # I;16
    # Through encoded bytes, as served: a PNG round trip keeps the mode and the transparency.
    decoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF" if image.mode == "CMYK" else "PNG")
        decoded.append(Image.open(io.BytesIO(buffer.getvalue())))
    return decoded


PROCESSORS = [
    pytest.param("CLIPImageProcessorPil", {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
                 224, id="clip-224-bicubic"),
    pytest.param("CLIPImageProcessorPil", {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                                           "resample": 2}, 64, id="clip-64-bilinear"),
    pytest.param("SiglipImageProcessorPil", {"size": {"height": 384, "width": 384}}, 384, id="siglip-384"),
]


@pytest.mark.parametrize(("cls", "kwargs", "size"), PROCESSORS)
def test_served_pixels_equal_the_pil_image_processor(cls: str, kwargs: dict, size: int) -> None:
    """clients/clip_preprocess.py (the preprocess model and the client) with the mapped config gives the
    processor's pixel_values; open_clip's conventions on the same config do not (the check can fail)."""
    import dataclasses

    import transformers

    from clip_triton.clients.clip_preprocess import Preprocessor
    from clip_triton.exporter.sources.hf_transformers import ProcessorPixels, preprocess_config

    processor = getattr(transformers, cls)(**kwargs)
    cfg = preprocess_config(processor, size)
    assert cfg.convention == "transformers"
    served = Preprocessor.from_config(dataclasses.asdict(cfg))
    as_open_clip = Preprocessor.from_config({**dataclasses.asdict(cfg), "convention": "open_clip"})
    reference = ProcessorPixels(processor)
    worst, open_clip_differs = 0.0, False
    for image in _images():
        want = reference(image)
        got = served(image)
        assert got.shape == want.shape == (3, size, size)
        worst = max(worst, float(np.abs(got - want).max()))
        open_clip_differs |= float(np.abs(as_open_clip(image) - want).max()) > 1e-3
    assert worst < 2e-6, worst  # float rounding of (x / 255 - mean) / std only
    assert open_clip_differs


def test_unservable_processors_are_refused_in_one_line() -> None:
    import transformers

    from clip_triton.exporter.sources.hf_transformers import preprocess_config

    cases = [
        (transformers.CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
         224, "same square size"),
        (transformers.CLIPImageProcessorPil(do_rescale=False), 224, "rescale"),
        (transformers.CLIPImageProcessorPil(resample=1), 224, "resample 1"),
        (transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224}), 384, "vision model takes 384px"),
    ]
    for processor, size, message in cases:
        with pytest.raises(ClipTritonError, match=message) as info:
            preprocess_config(processor, size)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- token ids


@pytest.mark.parametrize("kind", KINDS)
def test_served_ids_equal_the_checkpoint_tokenizer(kind: str, checkpoints: dict[str, Path]) -> None:
    """The tokenize model's code (clip_tokenizer.py over the exported tokenizer.json) gives the checkpoint
    tokenizer's ids, padding and truncation included; a wrong clean or padding side is caught."""
    import dataclasses

    from clip_triton.exporter.base.tokenization import FileTokenizer
    from clip_triton.exporter.sources.hf_transformers import check_served_ids, load_model, probe_texts

    loaded = load_model(str(checkpoints[kind]))
    cfg, reference = loaded.tokenizer_cfg, loaded.tokenizer
    texts = probe_texts()
    want = reference(texts)
    assert want.shape == (len(texts), cfg.context_length)
    assert np.array_equal(FileTokenizer(reference.path, cfg)(texts), want)
    pads = (want == cfg.pad_id).sum()
    assert pads > 0 and (want[:, 0] != want[:, -1]).any()  # padded rows: the probe exercises the padding
    wrong = dataclasses.replace(
        cfg, padding_side="left" if cfg.padding_side == "right" else "right"
    )
    with pytest.raises(ClipTritonError, match="differs from"):
        check_served_ids(reference, wrong)


# ---------------------------------------------------------------- the pipeline, live


@pytest.mark.server
@pytest.mark.parametrize("kind", KINDS)
def test_build_serves_the_checkpoint_at_parity(kind: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """build --hf-model FOLDER: export, fp16, repository (python runtime), parity through a live
    tritonserver against the Transformers model itself; the manifest records the source and folder."""
    from clip_triton.exporter.build import BuildOptions, run_build
    from clip_triton.exporter.sources.hf_transformers import folder_digest

    out = tmp_path / "build"
    run_build(BuildOptions(hf_model=str(checkpoints[kind]), out=out, runtime="python", skip_engines=True,
                           samples=4), quiet=True)
    report = json.loads((out / "parity.json").read_text())
    statuses = {s["stage"]: s["status"] for s in report["stages"]}
    assert report["passed"], statuses
    for stage in ("onnx-fp32", "onnx-fp16", "triton", "triton-pixels", "triton-preprocess", "triton-tokenize"):
        assert statuses[stage] == "pass", stage
    towers = next(s for s in report["stages"] if s["stage"] == "triton")["towers"]
    assert towers["text"]["samples"] >= 20 and towers["image"]["samples"] >= 4
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["source"] == "transformers" and manifest["pretrained"] is None
    assert manifest["checkpoint"] == {"path": str(checkpoints[kind].resolve()),
                                      "sha256": folder_digest(checkpoints[kind].resolve())}
    assert manifest["preprocess"]["convention"] == "transformers"
    assert (out / "export" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- refusals


def test_wrong_or_mixed_sources_are_one_line_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    clip = str(checkpoints["clip-tiny"])
    cases = [
        (["--hf-model", clip, "--pretrained", "openai"], "drop --pretrained"),
        (["--hf-model", clip, "--model", "ViT-B-32"], "drop --model"),
        ([], "give --model NAME"),
        (["--hf-model", str(tmp_path)], "not a save_pretrained folder"),
        (["--hf-model", "not a repo id"], "neither a folder nor a Hugging Face repo id"),
        (["--hf-model", "clip-triton-test/no-such-model"], "could not fetch clip-triton-test/no-such-model"),
    ]
    for args, message in cases:
        proc = run_cli("export", *args, "--out", str(tmp_path / "out"))  # offline: helpers.run_cli
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_naflex_and_mismatched_checkpoints_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from clip_triton.exporter.sources.hf_transformers import load_model

    naflex = tmp_path / "naflex"
    shutil.copytree(checkpoints["siglip2-tiny"], naflex)
    config = json.loads((naflex / "config.json").read_text())
    (naflex / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(ClipTritonError, match="NaFlex"):
        load_model(str(naflex))
    # Weights that do not fit the config: the mismatched keys are named, not a random init.
    wider = tmp_path / "wider"
    shutil.copytree(checkpoints["clip-tiny"], wider)
    config = json.loads((wider / "config.json").read_text())
    config["projection_dim"] = 24
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipTritonError, match="projection") as info:
        load_model(str(wider))
    assert "\n" not in str(info.value)


def test_a_changed_folder_is_not_the_exported_model(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Parity rebuilds the reference from the manifest's folder: a folder changed since export is refused."""
    import shutil

    from clip_triton.exporter.base.manifest import load_manifest
    from clip_triton.exporter.build import ExportOptions, run_export
    from clip_triton.exporter.sources import load_reference

    folder = tmp_path / "clip"
    shutil.copytree(checkpoints["clip-tiny"], folder)
    export = tmp_path / "export"
    run_export(ExportOptions(hf_model=str(folder)), export)
    manifest = load_manifest(export)
    assert load_reference(manifest, export_dir=export).source == "transformers"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "logit_scale_init_value": 1.0}))
    with pytest.raises(ClipTritonError, match="changed since export"):
        load_reference(manifest, export_dir=export)
