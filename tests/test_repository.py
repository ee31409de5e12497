"""The repository stage and the python models' logic, without a server: real open_clip, real PIL."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_triton.clients.clip_preprocess import ImageInputError, Preprocessor, decode
from clip_triton.exporter.base.common import ClipTritonError, staged_file
from clip_triton.exporter.base.manifest import load_manifest, sha256_file
from clip_triton.exporter.base.tokenization import clip_tokenizer, tokenizer_module
from clip_triton.exporter.stages.repository import RepositoryOptions, parse_config, write_repository
from helpers import linked_copy, run_cli, scratch_dir

TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "A very long caption " + "that keeps going and going " * 20,
    "un chien qui court sur la plage à Zürich ☀️ 東京 café",
    "HTML &amp;amp; entities &lt;b&gt; and mojibake â€™",
    "Don't won't I'll we've it's",
    "😀" * 80,
    "numbers 1234567 and symbols !!!???",
    "x",
]


def test_clip_bpe_ids_equal_open_clip() -> None:
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    ours = clip_tokenizer()(TEXTS)
    np.testing.assert_array_equal(ours, ref)
    assert ours[3, -1] == 49407 and ours[7, -1] == 49407  # truncated: EOT stays last
    assert ours[1, :3].tolist() == [49406, 49407, 0]  # empty string: SOT, EOT, padding


def _write_hf_tokenizer(directory: Path) -> Path:
    """A tiny WordPiece tokenizer.json with BERT-style [CLS] ... [SEP] post-processing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(TEXTS * 5 + ["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "sep_token": "[SEP]",
              "cls_token": "[CLS]", "unk_token": "[UNK]", "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


@pytest.mark.parametrize("clean,strip_sep", [("whitespace", False), ("lower", True), ("canonicalize", False)])
def test_hf_file_tokenizer_equals_open_clip_hftokenizer(tmp_path: Path, clean: str, strip_sep: bool) -> None:
    """open_clip's own HFTokenizer (transformers) on the same local files is the reference."""
    pytest.importorskip("transformers")
    from open_clip.tokenizer import HFTokenizer

    from clip_triton.exporter.base.manifest import TokenizerConfig
    from clip_triton.exporter.base.tokenization import FileTokenizer

    path = _write_hf_tokenizer(tmp_path / "tok")
    ref = HFTokenizer(str(tmp_path / "tok"), context_length=12, clean=clean, strip_sep_token=strip_sep)
    cfg = TokenizerConfig(kind="hf", context_length=12, vocab_size=200, clean=clean, strip_sep_token=strip_sep,
                          pad_id=0)
    ours = FileTokenizer(path, cfg)
    assert ours.path == path
    np.testing.assert_array_equal(ours(TEXTS), ref(TEXTS).numpy())


def test_bad_tokenizer_file_is_a_one_line_error(tmp_path: Path) -> None:
    from clip_triton.exporter.base.manifest import TokenizerConfig
    from clip_triton.exporter.base.tokenization import FileTokenizer

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ClipTritonError, match="not a usable tokenizer.json"):
        FileTokenizer(bad, TokenizerConfig(kind="hf", context_length=8, vocab_size=10))


def test_exporter_and_server_share_one_tokenizer_module() -> None:
    module = tokenizer_module()
    assert Path(module.__file__).parent.name == "common"
    assert "import torch" not in Path(module.__file__).read_text()


def _image_bytes(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w)).astype(np.uint16))
    else:
        # Smooth content (not pure noise) so resampling differences would show.
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base, "RGB").resize((w, h), Image.BILINEAR)
        img = img.convert("P", palette=Image.ADAPTIVE) if mode == "P" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


CASES = [
    ("RGB", (640, 480), "JPEG"),
    ("L", (100, 300), "JPEG"),
    ("CMYK", (333, 222), "JPEG"),
    ("RGBA", (300, 100), "PNG"),
    ("P", (50, 20), "PNG"),
    ("I;16", (257, 129), "PNG"),
    ("RGB", (224, 224), "WEBP"),
    ("RGBA", (97, 401), "WEBP"),
    ("RGB", (225, 224), "BMP"),
    ("P", (120, 80), "GIF"),
    ("L", (31, 500), "GIF"),
]
PREPROCESS = [
    {},  # open_clip default: shortest + centre crop, bicubic
    {"resize_mode": "squash", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"},
    {"resize_mode": "longest", "fill_color": 127},
    {"size": (192, 256)},  # non-square: open_clip's ResizeKeepRatio path
]


@pytest.mark.parametrize("overrides", PREPROCESS, ids=["shortest", "squash", "longest", "nonsquare"])
def test_preprocess_pixels_equal_open_clip(overrides: dict) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**{"size": 224, **overrides})
    reference = image_transform_v2(cfg, is_train=False)
    size = list(cfg.size) if isinstance(cfg.size, tuple) else [cfg.size, cfg.size]
    ours = Preprocessor(size, list(cfg.mean), list(cfg.std), cfg.interpolation, cfg.resize_mode, cfg.fill_color)
    for i, (mode, dims, fmt) in enumerate(CASES):
        data = _image_bytes(mode, dims, fmt, i)
        expected = reference(Image.open(io.BytesIO(data))).numpy()
        got = ours.from_bytes(data)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, *size)
        assert np.abs(got - expected).max() < 1e-6, (mode, dims, fmt)


def huge_png_header(width: int = 12000, height: int = 12000) -> bytes:
    """A PNG whose header claims width x height (its data is a few bytes): tests the size check."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b""
    )


def test_bad_images_are_clear_errors() -> None:
    good = _image_bytes("RGB", (64, 48), "JPEG", 0)
    cases = {
        b"": "empty image",
        b"definitely not an image": "not an image in a supported format",
        good[: len(good) // 2]: "corrupt JPEG",
        huge_png_header(): "12000x12000 = 144.0 megapixels, over the limit of 64 megapixels",
    }
    for data, message in cases.items():
        with pytest.raises(ImageInputError, match=message):
            decode(data)
    assert decode(good).size == (64, 48)


@pytest.fixture(scope="module")
def python_repo(vitb32_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with scratch_dir(tmp_path_factory, "repo") as base:
        opts = RepositoryOptions(runtime="python", max_batch=16, instances=2)
        yield write_repository(vitb32_export, base / "repo", opts)


def test_repository_layout_and_configs_parse_back(python_repo: Path, vitb32_export: Path) -> None:
    names = ["clip_image", "clip_image_encoder", "clip_image_normalize", "clip_image_pixels", "clip_image_preprocess",
             "clip_text", "clip_text_encoder", "clip_text_tokenize"]
    assert sorted(p.name for p in python_repo.iterdir() if p.is_dir()) == names
    configs = {n: parse_config((python_repo / n / "config.pbtxt").read_text()) for n in names}
    steps = {"clip_image": ["clip_image_preprocess", "clip_image_encoder"],
             "clip_image_pixels": ["clip_image_normalize", "clip_image_encoder"],
             "clip_text": ["clip_text_tokenize", "clip_text_encoder"]}
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size == 16
        if name in steps:
            assert config.platform == "ensemble" and not config.instance_group
            assert [s.model_name for s in config.ensemble_scheduling.step] == steps[name]
            assert config.output[0].name == "embedding" and list(config.output[0].dims) == [512]
            assert config.input[0].data_type == (2 if name == "clip_image_pixels" else 13)  # TYPE_UINT8, TYPE_STRING
            continue
        assert config.backend == ("onnxruntime" if name == "clip_image_normalize" else "python")
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        # --instances 2 for the encoders and the tokenizer; the preprocess model's threads do its scaling.
        count = 1 if name == "clip_image_preprocess" else 2
        assert [(g.count, g.kind) for g in config.instance_group] == [(count, 2)]  # KIND_CPU
    pixels = configs["clip_image_pixels"]
    assert pixels.input[0].name == "pixels" and list(pixels.input[0].dims) == [224, 224, 3]
    assert json.loads(pixels.parameters["preprocess"].string_value)["size"] == [224, 224]
    assert pixels.parameters["max_bytes"].string_value == str(32 * 1024 * 1024)
    assert configs["clip_image_preprocess"].parameters["threads"].string_value == "0"
    assert configs["clip_image_normalize"].parameters["intra_op_thread_count"].string_value == "1"
    assert sorted(load_manifest(python_repo).repository["entry_points"]) == ["clip_image", "clip_image_pixels",
                                                                              "clip_text"]
    tok = configs["clip_text_tokenize"]
    assert tok.output[0].data_type == 8 and list(tok.output[0].dims) == [77]  # TYPE_INT32
    pre = json.loads(configs["clip_image_preprocess"].parameters["preprocess"].string_value)
    assert pre["size"] == [224, 224] and pre["resize_mode"] == "shortest"
    assert (python_repo / "clip_text_tokenize" / "1" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert (python_repo / "clip_image_encoder" / "1" / "model.onnx").is_file()
    readme = (python_repo / "README.md").read_text()
    assert "ViT-B-32" in readme and "INT32" in readme and "docker run" in readme and "clip-triton serve" in readme
    assert load_manifest(python_repo).repository["runtime"] == "python"
    recorded = load_manifest(python_repo).repository
    assert recorded["path"] == str(python_repo.resolve()) and recorded["prefix"] == "clip"
    assert load_manifest(vitb32_export).repository is None  # the export is left as it was


def test_onnxruntime_configs(vitb32_export: Path, tmp_path: Path) -> None:
    repo = write_repository(vitb32_export, tmp_path / "ort", RepositoryOptions(runtime="onnxruntime", prefix="m"))
    enc = parse_config((repo / "m_text_encoder" / "config.pbtxt").read_text())
    assert enc.backend == "onnxruntime" and enc.instance_group[0].kind == 1  # KIND_GPU
    assert enc.input[0].name == "input_ids" and enc.input[0].data_type == 8
    assert enc.max_batch_size == load_manifest(vitb32_export).max_batch


def test_encoder_files_are_hard_linked_unless_copy_files(vitb32_export: Path, tmp_path: Path) -> None:
    export = linked_copy(vitb32_export, tmp_path / "export")  # write_repository records itself in the export
    source = export / "image_encoder.onnx"
    linked = write_repository(export, tmp_path / "linked", RepositoryOptions(runtime="onnxruntime"))
    placed = linked / "clip_image_encoder" / "1" / "model.onnx"
    assert placed.stat().st_ino == source.stat().st_ino
    run = run_cli("repository", "--export", str(export), "--out", str(tmp_path / "copied"),
                  "--runtime", "onnxruntime", "--copy-files", "--no-dynamic-batching", "-q")
    assert run.returncode == 0, run.stderr
    encoder = parse_config((tmp_path / "copied" / "clip_image_encoder" / "config.pbtxt").read_text())
    assert not encoder.HasField("dynamic_batching")
    assert load_manifest(tmp_path / "copied").repository["dynamic_batching"] is False
    copied = tmp_path / "copied" / "clip_image_encoder" / "1" / "model.onnx"
    assert copied.stat().st_ino != source.stat().st_ino and sha256_file(copied) == sha256_file(source)
    # Stages replace files, never edit them: replacing the export's graph leaves the repository's intact.
    before = sha256_file(placed)
    with staged_file(source) as tmp:
        tmp.write_bytes(b"a newer graph")
    assert sha256_file(placed) == before != sha256_file(source)


def test_tensorrt_needs_plans_and_caps_max_batch(vitb32_export: Path, tmp_path: Path) -> None:
    run = run_cli("repository", "--export", str(vitb32_export), "--out", str(tmp_path / "r"), timeout=300)
    assert run.returncode == 2 and "clip-triton engines" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()
    # An export folder that has plans: the config follows the engine profile's max batch.
    fake = tmp_path / "with_plans"
    fake.mkdir()
    manifest = load_manifest(vitb32_export)
    # The section as clip_triton.exporter.stages.engines.build_engines records it.
    manifest.engines = {"tensorrt": "10.5.0", "profile": {"min": 1, "opt": 16, "max": 32}}
    manifest.save(fake)
    for name in ("image_encoder.plan", "text_encoder.plan"):
        (fake / name).write_bytes(b"plan bytes are not read by this stage")
    repo = write_repository(fake, tmp_path / "trt", RepositoryOptions(python_deps=False))
    enc = parse_config((repo / "clip_image_encoder" / "config.pbtxt").read_text())
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 32
    assert (repo / "clip_image_encoder" / "1" / "model.plan").is_file()
    assert "tritonserver:24.10-py3" in (repo / "README.md").read_text()
    with pytest.raises(ClipTritonError, match="exceeds the engines' profile max batch 32"):
        write_repository(fake, tmp_path / "trt2", RepositoryOptions(max_batch=64))


def test_readme_and_record_name_the_release_its_driver_and_the_docker_command(
    python_repo: Path, vitb32_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27: the release comes from the driver rule (default R570: 25.03) and is recorded with its driver
    floor; `docker run --gpus all` only for GPU instances; /dev/shm as deploy's manifests size it."""
    from clip_triton.exporter.base.common import Progress
    from clip_triton.exporter.stages.deploy import DeployOptions

    assert DeployOptions().shm_size == "2Gi"  # the README's --shm-size=2g below
    record = load_manifest(python_repo).repository
    assert record["triton_release"] == "25.03" and record["triton_image"] == "nvcr.io/nvidia/tritonserver:25.03-py3"
    assert record["triton_min_driver"] == 570 and record["triton_cuda"] == "12.8.1.012"
    assert "default --min-driver" in record["triton_release_reason"]
    cpu = (python_repo / "README.md").read_text()  # python runtime: CPU instances
    assert "docker run --rm --shm-size=2g " in cpu and "--gpus" not in cpu and "--shm-size=1g" not in cpu
    assert "tritonserver:25.03-py3" in cpu and "no GPU or driver needed" in cpu
    # A GPU repository for nodes on R580: the newest release with a known floor at most R580, printed once.
    opts = RepositoryOptions(runtime="onnxruntime", min_driver="580.65.06", python_deps=False)
    repo = write_repository(vitb32_export, tmp_path / "gpu", opts, progress=Progress("repository", quiet=False))
    err = capsys.readouterr().err
    assert "Triton 25.10 (nvcr.io/nvidia/tritonserver:25.10-py3; the newest release for driver R580" in err
    assert "NVIDIA driver R580 or newer (CUDA 13.0.2.006)" in err
    gpu = (repo / "README.md").read_text()
    assert "docker run --gpus all --rm --shm-size=2g " in gpu and "tritonserver:25.10-py3" in gpu
    assert "The GPU nodes need NVIDIA driver R580 or newer" in gpu and "forward-compatibility" in gpu
    assert load_manifest(repo).repository["triton_min_driver"] == 580
    # --quiet silences the line; an explicit release that needs a newer driver than --min-driver is refused.
    write_repository(vitb32_export, tmp_path / "q", RepositoryOptions(runtime="python", python_deps=False))
    assert "Triton 25.03" not in capsys.readouterr().err
    with pytest.raises(ClipTritonError, match=r"--triton-release 25\.08 needs NVIDIA driver R580"):
        write_repository(vitb32_export, tmp_path / "x", RepositoryOptions(triton_release="25.08", min_driver="570",
                                                                          runtime="python", python_deps=False))
    assert not (tmp_path / "x").exists()


def test_bad_options_leave_nothing(vitb32_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipTritonError, match="clip-triton fp16"):
        write_repository(vitb32_export, tmp_path / "a", RepositoryOptions(runtime="onnxruntime", precision="fp16"))
    with pytest.raises(ClipTritonError, match="--device cpu"):
        write_repository(vitb32_export, tmp_path / "b", RepositoryOptions(runtime="python", device="gpu"))
    with pytest.raises(ClipTritonError, match="no manifest.json"):
        write_repository(tmp_path, tmp_path / "c", RepositoryOptions(runtime="python"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
