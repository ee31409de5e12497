"""Built-in, license-clean samples: images drawn with PIL/numpy, captions, zero-shot labels, and
the synthetic encoder inputs (pixels, token ids) every stage checks its graphs with.

Everything is generated deterministically (fixed seeds), so two runs compare the same bytes.
The images cover what breaks preprocessing in practice: 1x1 and very wide/tall sizes, odd
dimensions, every common mode (RGB, L, RGBA, P, CMYK) and format (JPEG, PNG, WebP, BMP, GIF).
The captions cover empty, unicode, HTML-escaped and over-length text.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.runtimes.base import TowerBatch

if TYPE_CHECKING:
    from clip_triton.exporter.base.manifest import Manifest, PreprocessConfig, TokenizerConfig

TOKEN_DTYPE = "int32"  # why not int64: docs/engines.md, "Token ids"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageSample:
    name: str
    data: bytes  # encoded file bytes: what a client sends to Triton


# (pattern, width, height, mode, format): the curated set, in the order --samples takes them.
_IMAGE_SPECS: list[tuple[str, int, int, str, str]] = [
    ("gradient", 224, 224, "RGB", "JPEG"),
    ("shapes", 640, 480, "RGB", "PNG"),
    ("pixel", 1, 1, "RGB", "PNG"),
    ("stripes", 1500, 300, "RGB", "JPEG"),
    ("text", 300, 900, "L", "PNG"),
    ("checker", 320, 240, "RGBA", "PNG"),
    ("noise", 256, 256, "P", "GIF"),
    ("shapes", 400, 300, "CMYK", "JPEG"),
    ("gradient", 97, 311, "RGBA", "WEBP"),
    ("text", 123, 77, "RGB", "BMP"),
    ("noise", 500, 500, "L", "JPEG"),
    ("shapes", 2, 3, "P", "BMP"),
    ("checker", 64, 640, "L", "GIF"),
    ("stripes", 333, 333, "RGB", "WEBP"),
    ("text", 800, 200, "P", "PNG"),
    ("gradient", 1024, 768, "RGB", "JPEG"),
]
_PATTERNS = ("gradient", "shapes", "stripes", "checker", "noise", "text")
_MODES_FOR_FORMAT = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "RGBA", "P"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("RGB", "L", "P"),
    "GIF": ("P", "L"),
}

SAMPLE_TEXTS = [
    "a photo of a cat",
    "",
    "a red circle on a blue background",
    "A very long caption " + "that keeps going and going " * 14 + "until the tokenizer truncates it.",
    "un chien qui court sur la plage à Zürich ☀️",
    "東京の夜景、ネオンが光る街",
    "صورة لقطة على الأريكة",
    "black and white stripes",
    "   leading and trailing spaces   ",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt;",
    "x",
    "!!! ??? ...",
    "a diagram with lines of small text",
    "TWO DOGS PLAYING IN THE SNOW next to a red wooden house",
    "emoji only 🐱🐶🦊",
    "a checkerboard pattern, noisy, low resolution",
]

# A small zero-shot label set that matches what the built-in images show.
LABELS = [
    "gradient", "circle", "square", "triangle", "stripes", "checkerboard", "noise", "text",
    "cat", "dog", "car", "tree",
]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a blurry image of the {}."]


def _rgb_canvas(pattern: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx = x / max(width - 1, 1)
    fy = y / max(height - 1, 1)
    if pattern == "gradient":
        img = np.stack([fx, fy, 1.0 - (fx + fy) / 2], axis=-1)
    elif pattern == "stripes":
        period = max(2.0, width / 23.0)
        band = (np.floor(x / period) % 2).astype(np.float32)
        img = np.stack([band, band * 0.5 + fy * 0.5, 1.0 - band], axis=-1)
    elif pattern == "checker":
        cell = max(1, min(width, height) // 8)
        board = ((x // cell + y // cell) % 2).astype(np.float32)
        img = np.stack([board, board * fx, 1.0 - board * fy], axis=-1)
    elif pattern == "noise":
        img = rng.random((height, width, 3), dtype=np.float32)
    else:  # shapes and text start from a soft background; PIL draws on top
        base = rng.random(3).astype(np.float32)
        img = np.broadcast_to(base, (height, width, 3)) * (0.6 + 0.4 * fy[..., None])
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _draw(pattern: str, image, rng: np.random.Generator):  # noqa: ANN001, ANN202 - PIL types
    from PIL import ImageDraw

    width, height = image.size
    draw = ImageDraw.Draw(image)
    if pattern == "shapes":
        for _ in range(6):
            x0, y0 = rng.integers(0, max(width, 1)), rng.integers(0, max(height, 1))
            w, h = rng.integers(1, max(width // 2, 2)), rng.integers(1, max(height // 2, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse(box, fill=colour)
            elif kind == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    elif pattern == "text":
        # Text-like rows of "glyphs" (small dark boxes) instead of a font: no font licence, no
        # dependency on which fonts a machine has.
        line = max(4, height // 12)
        for row in range(line, height - line, int(line * 1.6)):
            x = line
            while x < width - line:
                word = int(rng.integers(2, 9))
                for _ in range(word):
                    gw = max(1, int(line * rng.uniform(0.4, 0.8)))
                    draw.rectangle([x, row, x + gw, row + line], fill=(20, 20, 30))
                    x += gw + max(1, line // 4)
                x += line
    return image


def render_image(pattern: str, width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    """One synthetic image, encoded in `fmt` with colour mode `mode`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(_rgb_canvas(pattern, width, height, rng), "RGB")
    image = _draw(pattern, image, rng)
    if mode == "RGBA":
        alpha = (np.linspace(40, 255, width, dtype=np.float32)[None, :].repeat(height, 0)).astype(np.uint8)
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def builtin_images(count: int) -> list[ImageSample]:
    """The first `count` built-in images; beyond the curated set, seeded random specs."""
    samples = []
    for index in range(count):
        if index < len(_IMAGE_SPECS):
            pattern, width, height, mode, fmt = _IMAGE_SPECS[index]
        else:
            rng = np.random.default_rng(1000 + index)
            pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
            fmt = sorted(_MODES_FOR_FORMAT)[int(rng.integers(len(_MODES_FOR_FORMAT)))]
            modes = _MODES_FOR_FORMAT[fmt]
            mode = modes[int(rng.integers(len(modes)))]
            width, height = (int(v) for v in rng.integers(8, 900, 2))
        data = render_image(pattern, width, height, mode, fmt, seed=index)
        samples.append(ImageSample(f"builtin-{index:02d}-{pattern}-{width}x{height}-{mode}.{fmt.lower()}", data))
    return samples


def builtin_texts(count: int) -> list[str]:
    texts = list(SAMPLE_TEXTS[:count])
    rng = np.random.default_rng(7)
    words = " ".join(SAMPLE_TEXTS).split()
    while len(texts) < count:
        texts.append(" ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 30)))))
    return texts


def zero_shot_prompts() -> list[str]:
    """Prompts in label-major order: LABELS[i] owns prompts [i*T, (i+1)*T)."""
    return [template.format(label) for label in LABELS for template in TEMPLATES]


def user_images(folder: Path) -> list[ImageSample]:
    """Every readable image in `folder` (sorted by name); an unreadable one is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipTritonError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClipTritonError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [read_image(path, "--images") for path in files]


def read_image(path: Path, flag: str) -> ImageSample:
    """One user image file, decoded once to check it; an unreadable one is an error naming `flag`."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ClipTritonError(f"{flag}: {path} is not a readable image ({exc})") from None
    return ImageSample(path.name, data)


def user_texts(path: Path) -> list[str]:
    """One caption per line (blank lines kept out; use the built-in set for the empty caption)."""
    path = Path(path)
    if not path.is_file():
        raise ClipTritonError(f"--texts {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ClipTritonError(f"--texts {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ClipTritonError(f"--texts {path} has no captions (one per line)")
    return texts


# ---------------------------------------------------------------------------------------------
# Synthetic encoder inputs: what export, fp16, engines and the encoder benchmark feed a tower.
# ---------------------------------------------------------------------------------------------


def synthetic_token_ids(texts: list[str], cfg: TokenizerConfig, seed: int = 0) -> np.ndarray:
    """Token ids shaped like real ones (length from the word count, eot where the tower pools) for
    hosts without the model's tokenizer; int64 [len(texts), context_length]."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(texts), cfg.context_length), cfg.pad_id, dtype=np.int64)
    for row, text in enumerate(texts):
        length = max(1, min(cfg.context_length, 2 + len(text.split())))
        ids[row, :length] = rng.integers(2, cfg.vocab_size - 2, size=length)
        if cfg.eot_id is not None:  # eos-pooled towers pool where eos is (MetaCLIP2)
            ids[row, length - 1] = cfg.eot_id
    return ids


def sample_pixels(preprocess: PreprocessConfig, batch: int, seed: int = 0) -> np.ndarray:
    """Normalised pixel tensors in the range real images produce (not unit Gaussians)."""
    h, w = preprocess.size
    rng = np.random.default_rng(seed)
    raw = rng.random((batch, 3, h, w), dtype=np.float32)
    # Smooth a little, like natural images, then normalise exactly as preprocessing does.
    raw = (raw + np.roll(raw, 1, axis=2) + np.roll(raw, 1, axis=3)) / 3.0
    mean = np.asarray(preprocess.mean, np.float32)[None, :, None, None]
    std = np.asarray(preprocess.std, np.float32)[None, :, None, None]
    return ((raw - mean) / std).astype(np.float32)


def sample_token_ids(loaded: Any, batch: int, seed: int = 0) -> np.ndarray:
    """Token ids of built-in captions of very different lengths (a dropped mask or wrong pooling
    shows): real ones from the model's tokenizer, synthetic ones without it."""
    captions = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(batch)]
    if loaded.tokenizer is not None:
        ids = np.asarray(loaded.tokenizer(captions))
    else:
        ids = synthetic_token_ids(captions, loaded.tokenizer_cfg, seed)
    return ids.astype(TOKEN_DTYPE)


def sample_inputs(loaded: Any, tower: str, batch: int) -> np.ndarray:
    """`batch` inputs for one tower of a loaded model (clip_triton.exporter.sources.open_clip.LoadedModel)."""
    return sample_pixels(loaded.preprocess, batch) if tower == "image" else sample_token_ids(loaded, batch)


# ---------------------------------------------------------------------------------------------
# The parity sample set: built-in (and the user's) images and captions, with open_clip's own
# preprocessing and tokenisation as the reference inputs.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSet:
    """One way of labelling the images: classes, their prompts, and each image's class."""

    name: str
    labels: list[str]
    prompts: list[list[str]]  # per label, the prompts whose embeddings are averaged
    truth: list[int]  # per image: index into labels


@dataclass
class LabelledSet:
    """A labelled set for parity's accuracy rows (loaded by clip_triton.exporter.parity.labelled)."""

    name: str  # "shapes", or the user folder's name
    source: str  # where it came from, for the report
    images: list[ImageSample]
    label_sets: list[LabelSet] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # distinct caption texts
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (image index, caption index)

    def texts(self) -> list[str]:
        """Every distinct text the set needs embedded: the label sets' prompts, then the captions."""
        seen: dict[str, None] = {}
        for label_set in self.label_sets:
            for prompts in label_set.prompts:
                seen.update(dict.fromkeys(prompts))
        seen.update(dict.fromkeys(self.captions))
        return list(seen)


@dataclass
class SampleSet:
    image_names: list[str]
    images: TowerBatch  # pixels from open_clip's transform; raw = encoded bytes
    captions: list[str]
    prompts: list[str]  # zero-shot prompts, label-major
    texts: TowerBatch  # captions + prompts; ids from open_clip's tokenizer; raw = strings
    labels: list[str]
    templates: int
    # The labelled set (parity's accuracy rows), when one is used: its images are the last rows of
    # `images` (from labelled_image_start), its distinct texts the last rows of `texts`.
    labelled: LabelledSet | None = None
    labelled_image_start: int = 0
    labelled_text_start: int = 0

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def reference_transform(manifest: Manifest) -> Any:
    """open_clip's eval transform, built from the manifest's PreprocessCfg."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre = manifest.preprocess
    try:
        cfg = PreprocessCfg(
            size=tuple(pre.size),
            mode=pre.mode,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
            interpolation=pre.interpolation,
            resize_mode=pre.resize_mode,
            fill_color=pre.fill_color,
        )
        return image_transform_v2(cfg, is_train=False)
    except AssertionError:
        raise ClipTritonError(f"open_clip cannot build the manifest's preprocessing config: {pre}") from None


def reference_pixels(transform: Any, images: list[Any]) -> np.ndarray:
    from PIL import Image

    rows = []
    for sample in images:
        with Image.open(io.BytesIO(sample.data)) as image:
            rows.append(np.asarray(transform(image)))  # a torch tensor (open_clip) or an array
    return np.stack(rows).astype(np.float32)


def build_samples(
    manifest: Manifest,
    loaded: Any,
    count: int,
    images_dir: Path | None = None,
    texts_file: Path | None = None,
    labelled: LabelledSet | None = None,
) -> tuple[SampleSet, bool]:
    """The parity sample set and whether its token ids are real (False: synthetic, no tokenizer here).

    `labelled`: a labelled set (clip_triton.exporter.parity.labelled) whose images and texts every
    stage embeds too, after the others."""
    if count < 0:
        raise ClipTritonError("--samples must be 0 or more")
    images = (user_images(images_dir) if images_dir else []) + builtin_images(count)
    captions = (user_texts(texts_file) if texts_file else []) + builtin_texts(count)
    if not images and labelled is None:
        raise ClipTritonError("no images to compare: give --samples 1 or more, or --images FOLDER")
    prompts = zero_shot_prompts()
    texts = captions + prompts
    image_start, text_start = len(images), len(texts)
    if labelled is not None:
        images = images + labelled.images
        texts = texts + labelled.texts()
    transform = getattr(loaded, "image_reference", None) or reference_transform(manifest)
    pixels = reference_pixels(transform, images)
    tokenizer = loaded.tokenizer
    if tokenizer is not None:
        ids = np.asarray(tokenizer(texts)).astype(manifest.text.input.dtype)
    else:
        ids = synthetic_token_ids(texts, manifest.tokenizer).astype(manifest.text.input.dtype)
    sample_set = SampleSet(
        image_names=[s.name for s in images],
        images=TowerBatch(pixels, [s.data for s in images]),
        captions=captions,
        prompts=prompts,
        texts=TowerBatch(ids, texts),
        labels=list(LABELS),
        templates=len(TEMPLATES),
        labelled=labelled,
        labelled_image_start=image_start,
        labelled_text_start=text_start,
    )
    return sample_set, tokenizer is not None
