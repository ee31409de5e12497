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

convention "transformers" mirrors Hugging Face image processors' PIL backend instead (CLIPImageProcessorPil,
SiglipImageProcessorPil): convert to RGB first (transparency composited over white), resize (shortest
edge or squash, the same PIL call), centre crop with floored offsets (torchvision rounds them).
"""

from __future__ import annotations

import io
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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

    0 turns a limit off. Each is a model config parameter of the preprocess model, of the same name: the
    contract's IMAGE_LIMITS (clients/contract.py; this file is copied into the preprocess model, so it
    cannot import it, and tests/test_contract.py checks that they agree).
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


# What decode() opens (Image.open's `formats`): what users send. Pillow's other readers are left out:
# EPS would run Ghostscript, WMF needs Windows, ICNS/CUR/DDS/BLP/FTEX/GBR/... are icons, textures and
# brushes nobody embeds, several decode a nested image of a size their header does not declare, and
# JPEG 2000 / QOI / plain PPM decode far slower per pixel than the limits assume (docs/limits.md).
# Each accepted format decodes only what its header says, or is checked below before its decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "ICO", "PSD")
# A progressive JPEG is decoded once per scan: a 94 KB JPEG of 4000x4000 with 1000 copies of one scan took
# 8.5 s (libjpeg warns and goes on). Real files have up to ~12 scans. Allowed: scans x pixels up to this
# budget (1-2 s of decoding), and at least MIN_JPEG_SCANS scans whatever the size.
JPEG_SCAN_PIXEL_BUDGET = 2_000_000_000
MIN_JPEG_SCANS = 32
# A TIFF is decoded one tile at a time; a tile may be larger than the image (a 64x64 image with one
# 16384x16384 deflate tile of 250 KB took 256 MB). Allowed: the image rounded up to 16, or 1 MP.
MAX_TIFF_TILE_PIXELS = 1 << 20
# Bounds on what the AVIF check below parses (in Python, so an AVIF of tiny boxes cannot make it slow):
# real files have a few items (colour, alpha, Exif; a grid has one per tile), one extent each, a few OBUs.
MAX_AVIF_ITEMS = 1024
MAX_AVIF_ENTRIES = 65536  # boxes per container, extents, references, OBUs: each at most this many

_accepted: tuple[str, ...] = ()


def _formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this Pillow can read (AVIF needs Pillow >= 11.3 built with libavif)."""
    global _accepted
    if not _accepted:
        Image.init()
        _accepted = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)
    return _accepted


def _megapixels(width: int, height: int) -> str:
    return f"{width}x{height} = {width * height / 1e6:.1f} megapixels"


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if max_pixels and width * height > max_pixels:
        raise ImageInputError(
            f"{what} too large: {_megapixels(width, height)}, over the limit of {max_pixels / 1e6:g} megapixels "
            "(model parameter max_pixels)"
        )


# -- Pillow's decompression-bomb check as a hard cap, for this thread's decode() only -------------
#
# Pillow checks the size of every image it is about to allocate: the one Image.open returns, and the
# nested or later ones (an ICO's embedded PNG or BMP, a GIF frame larger than the screen, a WebP canvas,
# a TIFF frame, an MPO frame). Its own limit is a warning at 89 MP and an error at 179 MP,
# process-wide (Image.MAX_IMAGE_PIXELS). Inside decode() the check refuses anything over this call's
# max_pixels instead; any other use of PIL in the process (any other thread) keeps Pillow's behaviour.


_cap = threading.local()


def _capped_bomb_check(size: tuple[int, int], *args: Any, **kwargs: Any) -> None:
    max_pixels = getattr(_cap, "max_pixels", None)
    if max_pixels is None:  # not inside decode(): Pillow's own check
        if _pillow_bomb_check is not None:
            _pillow_bomb_check(size, *args, **kwargs)
        return None
    width, height = max(1, int(size[0])), max(1, int(size[1]))
    if max_pixels:
        if width * height > max_pixels:
            _cap.tripped = f"{width}x{height}"
            _check_pixels(width, height, max_pixels)  # raises
    elif Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        # max_pixels 0 (off): Pillow's error, without its warning (as before)
        raise Image.DecompressionBombError(
            f"Image size ({width * height} pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
        )
    return None


_pillow_bomb_check = getattr(Image, "_decompression_bomb_check", None)
if _pillow_bomb_check is not None:
    # Once per copy of this module: a second copy wraps the first, which still applies its own decode()'s cap.
    Image._decompression_bomb_check = _capped_bomb_check


@contextmanager
def _pixel_cap(max_pixels: int) -> Iterator[None]:
    _cap.max_pixels, _cap.tripped = max_pixels, None
    try:
        yield
    finally:
        _cap.max_pixels = None


# -- containers whose header is not the size that gets decoded: read the real sizes first ---------


def _check_ico(data: bytes, max_pixels: int, header_check: Callable[[int, int], None] | None) -> None:
    """Every ICO entry's real size (the embedded PNG's IHDR, the BMP's DIB header), not the directory's.

    Pillow's ICO reader decodes the largest entry inside Image.open, at the embedded image's own size:
    a directory entry saying 256x256 can hold a 13000x13000 PNG (684 KB encoded, 700 MB decoded).
    """
    count = int.from_bytes(data[4:6], "little")
    for index in range(count):
        entry = data[6 + 16 * index : 22 + 16 * index]
        if len(entry) < 16:
            return  # Pillow refuses a truncated directory
        offset = int.from_bytes(entry[12:16], "little")
        head = data[offset : offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 24:
            width, height = struct.unpack(">II", head[16:24])
            kind = "PNG"
        elif len(head) >= 12 and int.from_bytes(head[:4], "little") == 12:
            width, height = struct.unpack("<HH", head[4:8])
            height //= 2  # the XOR image and the AND mask, one above the other
            kind = "BMP"
        elif len(head) >= 12 and int.from_bytes(head[:4], "little") >= 40:
            width, height = struct.unpack("<ii", head[4:12])
            height = abs(height) // 2
            kind = "BMP"
        else:
            continue  # Pillow cannot read this entry either
        if width < 1 or height < 1:
            continue
        declared = f"{entry[0] or 256}x{entry[1] or 256}"
        _check_pixels(width, height, max_pixels, f"ICO entry {index + 1} (a {kind}; its directory says {declared})")
        if header_check is not None:
            header_check(width, height)


def _check_webp(data: bytes, max_pixels: int, header_check: Callable[[int, int], None] | None) -> None:
    """The canvas size, before Pillow creates libwebp's decoder (which allocates the canvas)."""
    chunk, size = data[12:16], None
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        size = (int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF)
    elif chunk == b"VP8X" and len(data) >= 30:
        size = (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    elif chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if size and size[0] and size[1]:
        _check_pixels(*size, max_pixels)
        if header_check is not None:
            header_check(*size)


def _jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) of the first image of a JPEG, walking its segments as libjpeg
    does: length-prefixed segments, entropy-coded data up to the next marker (FF 00 and RSTn are data)."""
    scans, pos, end = 0, 2, len(data)
    while pos < end:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = data[found.end() - 1], found.end()
        if marker == 0xD9:  # EOI: later frames (MPO) are not decoded
            break
        if marker == 0xDA:
            scans += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # no length
        pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans


_JPEG_MARKER = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")


def _check_jpeg(data: bytes, width: int, height: int) -> None:
    allowed = max(MIN_JPEG_SCANS, JPEG_SCAN_PIXEL_BUDGET // max(1, width * height))
    if data.count(b"\xff\xda") <= allowed:  # every SOS marker is FF DA: an upper bound, in C (ms for 10 MB)
        return
    scans = _jpeg_scans(data)
    if scans > allowed:
        raise ImageInputError(
            f"JPEG has {scans} scans: a {width}x{height} JPEG may have at most {allowed} "
            "(each scan decodes the whole image again)"
        )


def _check_tiff(img: Image.Image) -> None:
    tags = getattr(img, "tag_v2", {})
    tile_w, tile_h = tags.get(322), tags.get(323)  # TileWidth, TileLength
    if not isinstance(tile_w, int) or not isinstance(tile_h, int):
        return
    width, height = (img.size[0] + 15) // 16 * 16, (img.size[1] + 15) // 16 * 16
    if tile_w * tile_h > max(width * height, MAX_TIFF_TILE_PIXELS):
        raise ImageInputError(
            f"TIFF tiles of {tile_w}x{tile_h} for an image of {img.size[0]}x{img.size[1]}: a tile may not be "
            "larger than the image"
        )


# AVIF: Pillow's size is the container's 'ispe' property; libavif hands the AV1 data to dav1d, which
# decodes frames of the size their own sequence header says (up to 16384x16384), whatever 'ispe' says: an
# AVIF claiming 64x64 decoded an 8000x8000 frame. So read every AV1 item's sequence headers first.


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]  # IndexError: truncated
            value = (value << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros >= 32:
                raise ValueError("uvlc")  # dav1d refuses this header too
        return self.read(zeros) + (1 << zeros) - 1


def _av1_frame_limit(header: bytes) -> tuple[int, int]:
    """The largest frame an AV1 sequence header lets a decoder make (AV1 spec 5.5.1, dav1d's parser).
    Frames use max_frame_width/height, or, where a frame may override its size (every header but the
    reduced still-picture one), any size that fits frame_width_bits; dav1d does not check the max."""
    bits = _Bits(header)
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    reduced = bits.read(1)
    if reduced:
        bits.read(5)  # seq_level_idx
    else:
        decoder_model, delay_length = 0, 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(64)
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model = bits.read(1)
            if decoder_model:
                delay_length = bits.read(5) + 1
                bits.read(32 + 5 + 5)
        display_delay = bits.read(1)
        for _ in range(bits.read(5) + 1):  # operating points
            bits.read(12)
            if bits.read(5) > 7:
                bits.read(1)  # seq_tier
            if decoder_model and bits.read(1):
                bits.read(2 * delay_length + 1)
            if display_delay and bits.read(1):
                bits.read(4)
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    width, height = bits.read(width_bits) + 1, bits.read(height_bits) + 1
    return (width, height) if reduced else (1 << width_bits, 1 << height_bits)


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise ValueError("leb128")


def _av1_decode_cost(data: bytes) -> tuple[int, tuple[int, int]]:
    """(frames x largest frame's pixels, largest frame) for an item's AV1 OBUs."""
    pos, frames, largest, count = 0, 0, (0, 0), 0
    while pos < len(data):
        count += 1
        if count > MAX_AVIF_ENTRIES:
            raise ValueError(f"more than {MAX_AVIF_ENTRIES} OBUs")
        header = data[pos]
        kind, extension, has_size = (header >> 3) & 15, (header >> 2) & 1, (header >> 1) & 1
        pos += 1 + extension
        size, pos = _leb128(data, pos) if has_size else (len(data) - pos, pos)
        if kind == 1:  # sequence header
            limit = _av1_frame_limit(data[pos : pos + size])
            largest = max(largest, limit, key=lambda s: s[0] * s[1])
        elif kind in (3, 6):  # frame header, frame: one decoded frame each
            frames += 1
        pos += size
    return frames * largest[0] * largest[1], largest


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISOBMFF boxes in data[start:end]: (type, payload start, payload end)."""
    pos, count = start, 0
    while pos + 8 <= end:
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        head = 8
        if size == 1:
            size, head = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"box {kind!r} overruns its container")
        count += 1
        if count > MAX_AVIF_ENTRIES:
            raise ValueError(f"more than {MAX_AVIF_ENTRIES} boxes")
        yield kind, pos + head, pos + size
        pos += size


def _uint(data: bytes, pos: int, size: int) -> tuple[int, int]:
    return int.from_bytes(data[pos : pos + size], "big"), pos + size


def _avif_items(data: bytes, meta: tuple[int, int]) -> tuple[dict[int, bytes], dict[int, list], dict[int, int], bytes]:
    """From an AVIF's meta box: item types, item extents (method, [(offset, length)]), dimg reference
    counts, the idat payload."""
    types: dict[int, bytes] = {}
    extents: dict[int, list] = {}
    refs: dict[int, int] = {}
    idat = b""
    total_extents = total_refs = 0
    seen: set[bytes] = set()
    for kind, start, end in _boxes(data, meta[0] + 4, meta[1]):
        if kind in seen and kind in (b"iinf", b"iloc", b"iref", b"idat"):
            raise ValueError(f"two {kind.decode()} boxes")  # libavif refuses them; which would it read?
        seen.add(kind)
        version = data[start]
        pos = start + 4
        if kind == b"iinf":
            count, pos = _uint(data, pos, 2 if version == 0 else 4)
            for n, (entry, e_start, _e_end) in enumerate(_boxes(data, pos, end)):
                if n >= MAX_AVIF_ITEMS:
                    raise ImageInputError(f"AVIF has more than {MAX_AVIF_ITEMS} items")
                if entry == b"infe" and data[e_start] >= 2:
                    item, p = _uint(data, e_start + 4, 2 if data[e_start] == 2 else 4)
                    if item in types:
                        raise ValueError(f"item {item} declared twice")
                    types[item] = data[p + 2 : p + 6]
        elif kind == b"iloc":
            sizes, pos = data[pos : pos + 2], pos + 2
            offset_size, length_size, base_size = sizes[0] >> 4, sizes[0] & 15, sizes[1] >> 4
            index_size = sizes[1] & 15 if version in (1, 2) else 0
            count, pos = _uint(data, pos, 2 if version < 2 else 4)
            if count > MAX_AVIF_ITEMS:
                raise ImageInputError(f"AVIF has {count} items, over {MAX_AVIF_ITEMS}")
            for _ in range(count):
                item, pos = _uint(data, pos, 2 if version < 2 else 4)
                method = 0
                if version in (1, 2):
                    method, pos = _uint(data, pos, 2)
                    method &= 15
                pos += 2  # data_reference_index
                base, pos = _uint(data, pos, base_size)
                n_extents, pos = _uint(data, pos, 2)
                total_extents += n_extents
                if total_extents > MAX_AVIF_ENTRIES:
                    raise ValueError(f"more than {MAX_AVIF_ENTRIES} extents")
                spans = []
                for _ in range(n_extents):
                    pos += index_size
                    offset, pos = _uint(data, pos, offset_size)
                    length, pos = _uint(data, pos, length_size)
                    spans.append((base + offset, length))
                if item in extents:
                    raise ValueError(f"item {item} located twice")
                extents[item] = [method, spans]
        elif kind == b"iref":
            id_size = 2 if version == 0 else 4
            for ref, r_start, _r_end in _boxes(data, pos, end):
                if ref == b"dimg":
                    _item, p = _uint(data, r_start, id_size)
                    count, p = _uint(data, p, 2)
                    total_refs += count
                    if total_refs > MAX_AVIF_ENTRIES:
                        raise ValueError(f"more than {MAX_AVIF_ENTRIES} references")
                    for _ in range(count):
                        target, p = _uint(data, p, id_size)
                        refs[target] = refs.get(target, 0) + 1
        elif kind == b"idat":
            idat = data[start:end]
    return types, extents, refs, idat


def _check_avif(data: bytes, max_pixels: int) -> None:
    """Every AV1 item's frames, from its own sequence headers: each within max_pixels, and all the
    frames decoding the file can take (items x frames x grid references) within twice that (colour and
    alpha)."""
    if not max_pixels:
        return
    try:
        boxes = [(kind, (start, end)) for kind, start, end in _boxes(data, 0, len(data))]
        top = dict(boxes)
        if [kind for kind, _ in boxes].count(b"meta") > 1:
            raise ValueError("two meta boxes")
        if b"moov" in top:
            raise ImageInputError("animated AVIF (an image sequence) is not accepted; send a still image")
        if b"meta" not in top:
            return  # libavif refuses it
        types, extents, refs, idat = _avif_items(data, top[b"meta"])
        total, largest, read = 0, (0, 0), 0
        for item, kind in types.items():
            if kind != b"av01" or item not in extents:
                continue
            method, spans = extents[item]
            if method not in (0, 1):
                raise ImageInputError(f"AVIF item {item} uses construction method {method}, which is not accepted")
            source = data if method == 0 else idat
            spans = [(o, min(len(source), o + length if length else len(source))) for o, length in spans]
            read += sum(max(0, stop - o) for o, stop in spans)
            if read > len(data):  # items sharing their data: each decoded again, for nothing
                raise ImageInputError("AVIF items overlap: their AV1 data adds up to more than the file")
            cost, frame = _av1_decode_cost(b"".join(source[o:stop] for o, stop in spans))
            total += cost * max(1, refs.get(item, 0))
            largest = max(largest, frame, key=lambda s: s[0] * s[1])
    except (IndexError, ValueError, struct.error) as exc:
        if isinstance(exc, ImageInputError):
            raise
        raise ImageInputError(f"cannot decode image ({len(data)} bytes): malformed AVIF ({exc})") from None
    _check_pixels(*largest, max_pixels, what="AVIF frame (from its AV1 sequence header)")
    if total > 2 * max_pixels:
        raise ImageInputError(
            f"AVIF too costly: decoding it takes {total / 1e6:.1f} megapixels of AV1 frames, over twice the "
            f"limit of {max_pixels / 1e6:g} megapixels (model parameter max_pixels)"
        )


def _accepts(accept: Callable[[bytes], Any] | None, prefix: bytes) -> bool:
    """A plugin's own signature test (Pillow registers None for plugins that have none)."""
    return accept is not None and accept(prefix) is True


def _check_before_open(data: bytes, max_pixels: int, header_check: Callable[[int, int], None] | None) -> None:
    if data[:4] == b"\0\0\1\0":
        _check_ico(data, max_pixels, header_check)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _check_webp(data, max_pixels, header_check)
    elif data[4:8] == b"ftyp" and "AVIF" in _formats() and _accepts(Image.OPEN["AVIF"][1], data[:16]):
        _check_avif(data, max_pixels)


def decode(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, header_check: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Encoded bytes -> a loaded PIL image; sizes checked before anything is decoded (docs/limits.md).

    Only ACCEPTED_FORMATS are opened. `header_check(width, height)` runs after the header is read and
    before the pixels are decoded, and again on the real size of what a container held (an ICO entry).
    Every image Pillow allocates on the way (nested, frames, canvases, tiles) is held to max_pixels.
    """
    if not data:
        raise ImageInputError("empty image: 0 bytes received")
    _check_before_open(data, max_pixels, header_check)
    with _pixel_cap(max_pixels):
        try:
            img = Image.open(io.BytesIO(data), formats=_formats())
        except ImageInputError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageInputError(f"image too large: {exc}") from None
        except UnidentifiedImageError:
            raise ImageInputError(
                f"cannot decode image ({len(data)} bytes): not an image in a supported format "
                f"({', '.join(_formats())})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a known format, but PIL could not read its header
            raise ImageInputError(f"cannot decode image ({len(data)} bytes): {exc}") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageInputError(f"image has no pixels ({width}x{height})")
        _check_pixels(width, height, max_pixels)
        if header_check is not None:
            header_check(width, height)
        if img.format in ("JPEG", "MPO"):
            _check_jpeg(data, width, height)
        elif img.format == "TIFF":
            _check_tiff(img)
        try:
            img.load()
        except ImageInputError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageInputError(f"image too large: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            raise ImageInputError(f"corrupt {img.format or 'image'} data ({len(data)} bytes): {exc}") from None
        if _cap.tripped:  # a plugin caught our refusal and went on
            raise ImageInputError(f"image too large: it holds an image of {_cap.tripped} (model parameter max_pixels)")
    if img.size != (width, height):  # what was decoded is not what the header said
        _check_pixels(*img.size, max_pixels)
        if header_check is not None:
            header_check(*img.size)
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


def _rgb_over_white(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: an image with transparency is composited over white, others converted."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _center_crop_floor(img: Image.Image, size_hw: list[int]) -> Image.Image:
    """transformers' center_crop for an image at least the crop's size: offsets floored, not rounded."""
    crop_h, crop_w = int(size_hw[0]), int(size_hw[1])
    top, left = (img.height - crop_h) // 2, (img.width - crop_w) // 2
    return img.crop((left, top, left + crop_w, top + crop_h))


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
        convention: str = "open_clip",
    ) -> None:
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {resize_mode!r}")
        if convention not in ("open_clip", "transformers"):
            raise ValueError(f"unknown convention {convention!r}")
        square = size[0] == size[1]
        if convention == "transformers" and (resize_mode == "longest" or (resize_mode == "shortest" and not square)):
            raise ValueError("convention 'transformers' takes resize_mode squash, or shortest with a square size")
        if interpolation not in RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}")
        self.size = [int(s) for s in size]
        self.resample = RESAMPLE[interpolation]
        self.resize_mode = resize_mode
        self.fill_color = int(fill_color)
        self.mode = mode
        self.convention = convention
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocessor:
        keys = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color", "mode", "convention")
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
        if self.convention == "transformers":
            resized = _resize(_rgb_over_white(img), target, self.resample)
            return resized if self.resize_mode == "squash" else _center_crop_floor(resized, self.size)
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
