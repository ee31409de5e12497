"""Torch-free image preprocessing, pixel-identical to open_clip's eval transform.

One file, two users: `clip-triton repository` copies it into the preprocess model (Triton imports
it there as a loose module), and ClipClient(preprocess="client") runs it before sending pixels to
the `<prefix>_image_pixels` ensemble. So the client crops exactly as the server would. numpy + PIL only.

Mirrors open_clip/transform.py `image_transform(..., is_train=False)` on PIL images, step by step:
torchvision's Resize/CenterCrop/pad on PIL are PIL calls (PIL resampling, which antialiases),
so the same PIL calls in the same order give the same pixels. Order matters: open_clip resizes
and crops in the image's own mode and converts to RGB only afterwards.

  shortest, square target:  Resize(int size, interpolation) -> CenterCrop (pads with 0)
  shortest, non-square:     ResizeKeepRatio(size) (always bicubic: open_clip passes no interpolation)
                            -> CenterCrop
  longest:                  ResizeKeepRatio(size, longest=1, interpolation) -> CenterCropOrPad(fill_color)
  squash:                   Resize((h, w), interpolation)
then convert(mode)                                   -> `crop`: uint8 [H, W, 3], the pixels entry point's input
then float32 / 255 -> (x - mean) / std, CHW          -> `normalize` (the pixels path runs the same
                                                        arithmetic as an ONNX step on the server)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # decoded size (width x height), read from the header
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # encoded size: a 12 MP JPEG is ~5 MB, a 24 MP PNG ~40 MB at worst
DEFAULT_MAX_ASPECT_RATIO = 100.0  # long side / short side: banners are ~10, long screenshots ~20-40
# The resize step's output before the crop: a 1x60000 image resized to a 224 short side would be
# 224 x 13.4 M pixels (3 GB, 18 s) to keep 224x224 of it. 16 MP costs ~50 MB and ~0.1 s.
DEFAULT_MAX_RESIZED_PIXELS = 16_000_000
RESAMPLING = Image.Resampling
RESAMPLE = {"bicubic": RESAMPLING.BICUBIC, "bilinear": RESAMPLING.BILINEAR, "nearest": RESAMPLING.NEAREST}


class ImageInputError(ValueError):
    """A request's image is unusable; the message names the problem for the client."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost, all checked before any pixel is decoded (docs/limits.md).

    0 turns a limit off. Each is a model config parameter of the preprocess model, of the same name.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> ImageLimits:
        """From a model config's parameters (string values); a missing or empty one keeps its default."""
        defaults = cls()
        given = {f.name: params.get(f.name) for f in fields(cls)}
        return cls(**{k: type(getattr(defaults, k))(v) for k, v in given.items() if v not in (None, "")})


def decode(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, header_check: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Encoded bytes -> a loaded PIL image; size checked from the header before decoding.

    `header_check(width, height)` runs after the header is read and before the pixels are decoded.
    """
    if not data:
        raise ImageInputError("empty image: 0 bytes received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb warning: our max_pixels check follows
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"image too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for unknown data
        detail = "" if isinstance(exc, UnidentifiedImageError) else f": {exc}"
        raise ImageInputError(
            f"cannot decode image ({len(data)} bytes): not an image in a supported format "
            f"(JPEG, PNG, WebP, BMP, GIF, ...){detail}"
        ) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageInputError(f"image has no pixels ({width}x{height})")
    if max_pixels and width * height > max_pixels:
        raise ImageInputError(
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"over the limit of {max_pixels / 1e6:g} megapixels (model parameter max_pixels)"
        )
    if header_check is not None:
        header_check(width, height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our own limit replaces PIL's decompression-bomb warning
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise ImageInputError(f"corrupt {img.format or 'image'} data ({len(data)} bytes): {exc}") from None
    return img


def _resize(img: Image.Image, size_hw: list[int], resample: int) -> Image.Image:
    """torchvision F.resize on a PIL image with an explicit [h, w] (a no-op at that size)."""
    if [img.height, img.width] == [int(size_hw[0]), int(size_hw[1])]:
        return img
    return img.resize((int(size_hw[1]), int(size_hw[0])), resample)


def _shortest_edge_size(h: int, w: int, size: int) -> list[int]:
    """torchvision Resize(int): the shorter edge to `size`, the longer one truncated (int()); [h, w]."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return [new_h, new_w]


def _keep_ratio_size(h: int, w: int, target_hw: list[int], longest: float) -> list[int]:
    """open_clip ResizeKeepRatio.get_params without the random parts."""
    ratio_h, ratio_w = h / target_hw[0], w / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return [round(x * 1.0 / ratio) for x in (h, w)]


def _pad(img: Image.Image, ltrb: list[int], fill: int) -> Image.Image:
    """torchvision F_pil.pad, constant mode (fill broadcast over the image's own bands)."""
    bands = len(img.getbands())
    value: Any = fill
    if bands > 1:
        value = tuple([fill] * bands)
    if img.mode != "F":
        value = tuple(int(v) for v in value) if isinstance(value, tuple) else int(value)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=tuple(ltrb), fill=value)
        if palette is not None:
            out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=tuple(ltrb), fill=value)


def _center_crop_or_pad(img: Image.Image, size_hw: list[int], fill: int) -> Image.Image:
    """torchvision CenterCrop (fill 0) and open_clip's center_crop_or_pad (fill_color) on PIL."""
    crop_h, crop_w = int(size_hw[0]), int(size_hw[1])
    w, h = img.size
    if crop_w > w or crop_h > h:
        ltrb = [
            (crop_w - w) // 2 if crop_w > w else 0,
            (crop_h - h) // 2 if crop_h > h else 0,
            (crop_w - w + 1) // 2 if crop_w > w else 0,
            (crop_h - h + 1) // 2 if crop_h > h else 0,
        ]
        img = _pad(img, ltrb, fill)
        w, h = img.size
        if crop_w == w and crop_h == h:
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


class Preprocessor:
    """One image -> FP32 [3, H, W], configured from the manifest's `preprocess` section."""

    def __init__(
        self,
        size: list[int],
        mean: list[float],
        std: list[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        fill_color: int = 0,
        mode: str = "RGB",
    ) -> None:
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {resize_mode!r}")
        if interpolation not in RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}")
        self.size = [int(s) for s in size]
        self.resample = RESAMPLE[interpolation]
        self.resize_mode = resize_mode
        self.fill_color = int(fill_color)
        self.mode = mode
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocessor:
        keys = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color", "mode")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    def resize_size(self, height: int, width: int) -> list[int]:
        """[h, w] the resize step produces for an image of this size (before the crop or pad)."""
        if self.resize_mode == "longest":
            return _keep_ratio_size(height, width, self.size, 1.0)
        if self.resize_mode == "squash":
            return list(self.size)
        if self.size[0] == self.size[1]:
            return _shortest_edge_size(height, width, self.size[0])
        return _keep_ratio_size(height, width, self.size, 0.0)

    def geometry(self, img: Image.Image) -> Image.Image:
        target = self.resize_size(img.height, img.width)
        if self.resize_mode == "longest":
            return _center_crop_or_pad(_resize(img, target, self.resample), self.size, self.fill_color)
        if self.resize_mode == "squash":
            return _resize(img, target, self.resample)
        # open_clip's ResizeKeepRatio (non-square targets) gets no interpolation: always bicubic.
        resample = self.resample if self.size[0] == self.size[1] else RESAMPLING.BICUBIC
        return _center_crop_or_pad(_resize(img, target, resample), self.size, 0)

    def check_cost(self, width: int, height: int, limits: ImageLimits) -> None:
        """Refuse, from the header alone, an image whose resize would be huge (a thin strip)."""
        ratio = max(width, height) / min(width, height)
        if limits.max_aspect_ratio and ratio > limits.max_aspect_ratio:
            raise ImageInputError(
                f"image aspect ratio too extreme: {width}x{height} is {ratio:.0f}:1, over the limit of "
                f"{limits.max_aspect_ratio:g}:1 (model parameter max_aspect_ratio)"
            )
        new_h, new_w = self.resize_size(height, width)
        if limits.max_resized_pixels and new_h * new_w > limits.max_resized_pixels:
            raise ImageInputError(
                f"image would resize to {new_w}x{new_h} = {new_w * new_h / 1e6:.1f} megapixels before the crop, "
                f"over the limit of {limits.max_resized_pixels / 1e6:g} (model parameter max_resized_pixels)"
            )

    def crop(self, img: Image.Image) -> np.ndarray:
        """Resize, crop or pad, colour mode: uint8 [H, W, 3], what `<prefix>_image_pixels` takes."""
        return np.asarray(self.geometry(img).convert(self.mode), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> FP32 [3, H, W]: / 255, then (x - mean) / std, each step in float32."""
        scaled = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return ((scaled - self.mean) / self.std).astype(np.float32, copy=False)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.crop(img))

    def decode(self, data: bytes, limits: ImageLimits | None = None) -> Image.Image:
        """Encoded bytes -> a loaded PIL image, every limit checked before the pixels are decoded."""
        limits = limits or ImageLimits()
        if limits.max_bytes and len(data) > limits.max_bytes:
            raise ImageInputError(
                f"image too large: {len(data) / 2**20:.1f} MiB encoded, over the limit of "
                f"{limits.max_bytes / 2**20:g} MiB (model parameter max_bytes)"
            )
        return decode(data, limits.max_pixels, lambda w, h: self.check_cost(w, h, limits))

    def crop_bytes(self, data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
        return self.crop(self.decode(data, limits))

    def from_bytes(self, data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
        return self(self.decode(data, limits))
