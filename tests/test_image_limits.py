"""Image limits before decoding, for every format the preprocess model opens (docs/limits.md).

The hostile files are made here, a few KB each: containers whose header says one size and whose
decoder would make another (an ICO entry, a GIF frame, a TIFF tile, an AVIF's AV1 frames), text-chunk
bombs, a JPEG of a thousand scans. Each must be refused with ImageInputError within a second and
without decoding: the cases run in a fresh process that reports its peak RSS, since PIL's buffers are
not in tracemalloc. Valid images of every accepted format still decode to exactly PIL's pixels.
`decode` / `Preprocessor.decode` are what the server (and ClipClient(preprocess="client")) run.
"""

from __future__ import annotations

import functools
import io
import json
import re
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from clip_triton.clients import clip_preprocess
from clip_triton.clients.clip_preprocess import ImageInputError, Preprocessor, decode

ROOT = Path(__file__).resolve().parents[1]
HAVE_AVIF = "AVIF" in clip_preprocess._formats()
NOT_ACCEPTED = "not an image in a supported format"


# -- valid images -------------------------------------------------------------------------------


def _picture(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth content (so resampling differences would show) in the given mode."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray((rng.integers(0, 65535, (h, w))).astype(np.uint16))
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 4), dtype=np.uint8)
    img = Image.fromarray(base, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
    if mode == "P":
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return img.convert(mode)


def _save(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _psd(mode: str, size: tuple[int, int], rle: bool) -> bytes:
    """A flat PSD (Pillow reads PSD but does not write it): raw or PackBits planes."""
    img = _picture(mode, size)
    w, h = size
    planes = [np.asarray(band).tobytes() for band in img.split()]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, len(planes), h, w, 8, {"L": 1, "RGB": 3}[mode])
    out = header + struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers: none
    if not rle:
        return out + struct.pack(">H", 0) + b"".join(planes)
    rows = [plane[y * w : (y + 1) * w] for plane in planes for y in range(h)]
    packed = [bytes([len(r) - 1]) + r for r in rows]  # one literal run per row (w <= 128)
    return out + struct.pack(">H", 1) + b"".join(struct.pack(">H", len(p)) for p in packed) + b"".join(packed)


def _valid_images() -> dict[str, bytes]:
    def animated(fmt: str, **options) -> bytes:  # fresh frames each time: a save leaves state on an image
        frames = [_picture("RGB", (60, 40), k) for k in range(3)]
        return _save(frames[0], fmt, save_all=True, append_images=frames[1:], **options)

    cases = {
        "jpeg-rgb": _save(_picture("RGB", (640, 480)), "JPEG"),
        "jpeg-l": _save(_picture("L", (100, 300)), "JPEG"),
        "jpeg-cmyk": _save(_picture("CMYK", (333, 222)), "JPEG"),
        "jpeg-progressive": _save(_picture("RGB", (301, 203)), "JPEG", progressive=True),
        "mpo": animated("MPO"),
        "png-rgba": _save(_picture("RGBA", (300, 100)), "PNG"),
        "png-palette": _save(_picture("P", (50, 20)), "PNG"),
        "png-16bit": _save(_picture("I;16", (257, 129)), "PNG"),
        "png-la": _save(_picture("LA", (64, 65)), "PNG"),
        "apng": animated("PNG"),
        "webp-rgb": _save(_picture("RGB", (224, 224)), "WEBP"),
        "webp-rgba-lossless": _save(_picture("RGBA", (97, 401)), "WEBP", lossless=True),
        "webp-animated": animated("WEBP"),
        "gif-palette": _save(_picture("P", (120, 80)), "GIF"),
        "gif-l": _save(_picture("L", (31, 500)), "GIF"),
        "gif-animated": animated("GIF"),
        "bmp-rgb": _save(_picture("RGB", (225, 224)), "BMP"),
        "bmp-palette": _save(_picture("P", (33, 17)), "BMP"),
        "bmp-1bit": _save(_picture("1", (70, 30)), "BMP"),
        "tiff-rgb": _save(_picture("RGB", (200, 150)), "TIFF"),
        "tiff-deflate": _save(_picture("RGB", (200, 150)), "TIFF", compression="tiff_deflate"),
        "tiff-cmyk": _save(_picture("CMYK", (90, 60)), "TIFF"),
        "tiff-16bit": _save(_picture("I;16", (90, 60)), "TIFF"),
        "tiff-multiframe": animated("TIFF", compression="tiff_lzw"),
        "ico-png": _save(_picture("RGBA", (64, 64)), "ICO", sizes=[(16, 16), (32, 32), (64, 64)]),
        "ico-bmp": _save(_picture("RGBA", (48, 48)), "ICO", sizes=[(48, 48)], bitmap_format="bmp"),
        "psd-rgb": _psd("RGB", (120, 90), rle=False),
        "psd-l-rle": _psd("L", (100, 70), rle=True),
    }
    if HAVE_AVIF:
        cases["avif-rgb"] = _save(_picture("RGB", (300, 200)), "AVIF")
        cases["avif-rgba"] = _save(_picture("RGBA", (120, 77)), "AVIF")
    return cases


VALID = _valid_images()


def test_accepted_formats_are_the_ones_tested() -> None:
    formats = {Image.open(io.BytesIO(data)).format for data in VALID.values()}
    assert set(clip_preprocess._formats()) == formats - {"MPO"}  # MPO is a JPEG to Image.open
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PSD"} <= formats


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_images_decode_to_pils_own_pixels(name: str) -> None:
    data = VALID[name]
    ours = decode(data)
    reference = Image.open(io.BytesIO(data))
    reference.load()
    assert (ours.format, ours.mode, ours.size) == (reference.format, reference.mode, reference.size)
    assert ours.tobytes() == reference.tobytes()
    assert ours.getpalette() == reference.getpalette()
    pre = Preprocessor([224, 224], [0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    assert np.array_equal(pre.crop_bytes(data), pre.crop(reference))


# -- hostile files ------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _png(w: int, h: int, extra: bytes = b"") -> bytes:
    """A valid all-black 1-bit PNG: 20000x20000 is 48 KB and decodes to 400 MB (PIL keeps a byte a pixel)."""
    row = b"\0" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _icon(entries: list[tuple[int, int, bytes]], kind: int = 1) -> bytes:
    """ICO (kind 1) or CUR (kind 2): (directory width, directory height, payload) per entry."""
    offset = 6 + 16 * len(entries)
    directory, blobs = b"", b""
    for w, h, payload in entries:
        directory += struct.pack("<BBBBHHII", w % 256, h % 256, 0, 0, 1, 32, len(payload), offset + len(blobs))
        blobs += payload
    return struct.pack("<HHH", 0, kind, len(entries)) + directory + blobs


def _dib(w: int, h: int) -> bytes:
    """A BITMAPINFOHEADER as in an icon (height doubled: image and mask), RLE8, no pixels."""
    return struct.pack("<IiiHHIIiiII", 40, w, 2 * h, 1, 8, 1, 0, 0, 0, 0, 0) + b"\0" * 1024 + b"\0\1"


def _gif_with_frame(screen: tuple[int, int], frame: tuple[int, int], first: bool) -> bytes:
    """A valid 16x16 GIF with one more frame descriptor of the given size (a few bytes of data)."""
    descriptor = b"\x21\xf9\x04\x00\x00\x00\x00\x00," + struct.pack("<HHHH", 0, 0, *frame) + b"\x00\x02\x02\x4c\x01\x00"
    head = b"GIF89a" + struct.pack("<HH", *screen) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    if first:
        return head + descriptor + b";"
    valid = _save(Image.new("P", (16, 16)), "GIF")
    return valid[:-1] + descriptor + b";"


def _tiff_tile(w: int, h: int, tile: int) -> bytes:
    """A w x h deflate TIFF (8-bit grey) of one tile x tile tile (TIFF allows tiles past the edge)."""
    data = zlib.compress(b"\0" * (tile * tile), 9)
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 8 + 2 + 12 * 10 + 4), (325, 4, len(data))]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in tags
    )
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + data


def _text_bomb(kind: bytes, megabytes: int) -> bytes:
    comp = zlib.compressobj(9)
    payload = b"".join(comp.compress(b"\0" * 2**20) for _ in range(megabytes)) + comp.flush()
    return _png(16, 16, _chunk(kind, b"key\0\0" + payload))


def _webp_canvas(w: int, h: int) -> bytes:
    """VP8X declaring a w x h canvas, with one 16x16 animation frame."""
    frame = _save(Image.new("RGB", (16, 16)), "WEBP", lossless=True)[12:]  # its 'VP8L' chunk
    anmf = b"ANMF" + struct.pack("<I", 16 + len(frame)) + b"\0" * 6 + (15).to_bytes(3, "little") * 2 + b"\0" * 4
    canvas = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x02\0\0\0" + canvas
    body = b"WEBP" + vp8x + b"ANIM" + struct.pack("<I", 6) + b"\0" * 6 + anmf + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (SOS header and its entropy-coded data) of a JPEG Pillow wrote."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append((pos, end))
        pos = end
    return scans


def _jpeg_with_scans(size: int, copies: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: libjpeg warns and decodes the image again each time."""
    data = _save(Image.new("L", (size, size), 128), "JPEG", progressive=True)
    start, end = _jpeg_segments(data)[-1]
    return data[:end] + data[start:end] * copies + data[end:]


def _tiff_with_second_frame(w: int, h: int) -> bytes:
    """A valid 16x16 TIFF, then a second IFD declaring w x h (its strip is never read)."""
    base = _save(Image.new("L", (16, 16)), "TIFF")
    first = int.from_bytes(base[4:8], "little")
    next_at = first + 2 + 12 * int.from_bytes(base[first : first + 2], "little")
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (273, 4, 8),
            (278, 4, h), (279, 4, w * h)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in tags
    ) + b"\0\0\0\0"
    return base[:next_at] + struct.pack("<I", len(base)) + base[next_at + 4 :] + ifd


def _icns(payload: bytes) -> bytes:
    return b"icns" + struct.pack(">I", 16 + len(payload)) + b"ic10" + struct.pack(">I", 8 + len(payload)) + payload


@functools.cache
def _hostile() -> dict[str, tuple[bytes, str]]:
    return {
        # ICO: the directory says 256x256 (or less); Pillow decodes the entry at its own size inside Image.open.
        "ico-png-13000": (_icon([(0, 0, _png(13000, 13000))]), r"ICO entry 1 \(a PNG; its directory says 256x256\) "
                          r"too large: 13000x13000"),
        "ico-png-20000": (_icon([(0, 0, _png(20000, 20000))]), r"ICO entry 1 .* 20000x20000 = 400.0 megapixels"),
        "ico-bmp-16000": (_icon([(0, 0, _dib(16000, 16000))]), r"ICO entry 1 \(a BMP; .*16000x16000"),
        "ico-second-entry": (_icon([(16, 16, _png(16, 16)), (0, 0, _png(13000, 13000))]), r"ICO entry 2 .*13000x13000"),
        "ico-thin-entry": (_icon([(16, 16, _png(1, 60000))]), "max_aspect_ratio"),
        "cur": (_icon([(32, 32, _dib(16000, 16000))], kind=2), NOT_ACCEPTED),
        "icns": (_icns(_png(20000, 20000)), NOT_ACCEPTED),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20000 20000\nshowpage\n", NOT_ACCEPTED),
        "gif-frame-over-screen": (_gif_with_frame((16, 16), (9000, 9000), first=True), r"9000x9000 = 81.0 megapixels"),
        "tiff-huge-tile": (_tiff_tile(64, 64, 16384), r"TIFF tiles of 16384x16384 for an image of 64x64"),
        "png-ztxt-64MB": (_text_bomb(b"zTXt", 64), "Decompressed data too large"),
        "png-iccp-64MB": (_text_bomb(b"iCCP", 64), "Decompressed data too large"),
        "png-many-texts": (_png(16, 16, _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 1_000_000)) * 80),
                           "Too much memory used in text chunks"),
        "webp-canvas": (_webp_canvas(16000, 16000), r"16000x16000 = 256.0 megapixels"),
        "jpeg-1000-scans": (_jpeg_with_scans(4000, 1000),
                            r"JPEG has 1006 scans: a 4000x4000 JPEG may have at most 125"),
    }


# Containers with a huge part that decode() never decodes: accepted, at the declared size, cheaply.
@functools.cache
def _harmless() -> dict[str, tuple[bytes, tuple[int, int]]]:
    return {
        "gif-later-frame-huge": (_gif_with_frame((16, 16), (30000, 30000), first=False), (16, 16)),
        "tiff-later-frame-huge": (_tiff_with_second_frame(20000, 20000), (16, 16)),
        "mpo-later-frame-large": (_save(Image.new("RGB", (64, 64)), "MPO", save_all=True,
                                        append_images=[Image.new("RGB", (3000, 3000))]), (64, 64)),
    }


# Peak RSS per case: /proc's VmHWM, reset before each case by writing 5 to clear_refs (Linux >= 4.0).
# (ru_maxrss would not do: a child starts with its parent's peak, pytest's here.)
_RUNNER = """
import json, sys, time
sys.path.insert(0, "clients")  # as the preprocess model imports it
import clip_preprocess as cp

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

folder = sys.argv[1]
pre = cp.Preprocessor([224, 224], [0.5] * 3, [0.5] * 3)
for name in json.loads(sys.argv[2]):  # warm up: every plugin imported, the allocator's arenas made
    pre.crop(pre.decode(open(f"{folder}/valid-{name}", "rb").read()))
for name in json.loads(sys.argv[3]):
    data = open(f"{folder}/{name}", "rb").read()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
    except OSError:  # no reset here: growth of the peak so far
        before = status("VmHWM:")
    start = time.perf_counter()
    try:
        img = pre.decode(data)
        pre.crop(img)
        result = ["decoded", list(img.size)]
    except cp.ImageInputError as exc:
        result = ["refused", str(exc)]
    seconds = time.perf_counter() - start
    grown = (status("VmHWM:") - before) / 1024
    print(json.dumps({"name": name, "result": result, "seconds": seconds, "peak_growth_mib": grown}), flush=True)
"""


def test_hostile_files_are_refused_fast_without_decoding(tmp_path: Path, record_property) -> None:
    warm = ["jpeg-progressive", "png-rgba", "webp-rgb", "gif-palette", "bmp-rgb", "tiff-deflate", "ico-png",
            "ico-bmp", "psd-rgb", "mpo"]
    for name in warm:
        (tmp_path / f"valid-{name}").write_bytes(VALID[name])
    for name, (data, _) in {**_hostile(), **_harmless()}.items():
        assert len(data) < 600_000, (name, len(data))
        (tmp_path / name).write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(tmp_path), json.dumps(warm), json.dumps([*_hostile(), *_harmless()])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
    record_property("hostile_images", reports)
    for name, (_, message) in _hostile().items():
        report = reports[name]
        assert report["result"][0] == "refused", report
        assert re.search(message, report["result"][1]), report
    for name, (_, size) in _harmless().items():
        assert reports[name]["result"] == ["decoded", list(size)], reports[name]
    for report in reports.values():
        # Before: ico-png-13000 took 0.13 s and 161 MiB to refuse, tiff-huge-tile decoded 256 MiB in 0.35 s,
        # the JPEG took 8-16 s (docs/limits.md).
        assert report["seconds"] < 1.0 and report["peak_growth_mib"] < 40, report


def test_the_cap_is_local_to_decode() -> None:
    """Pillow's own check (warning at 89 MP, error at 179 MP) is unchanged outside decode(), in this
    thread and in others; inside decode() anything Pillow allocates is held to max_pixels."""
    check = Image._decompression_bomb_check
    check((9000, 9000))  # 81 MP: fine for Pillow
    with pytest.raises(Image.DecompressionBombError):
        check((20000, 20000))
    with pytest.raises(ImageInputError, match="9000x9000"):
        decode(_gif_with_frame((16, 16), (9000, 9000), first=True))
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(check((9000, 9000))))
    thread.start()
    thread.join()
    assert seen == [None]
    # max_pixels 0 turns our limit off; Pillow's hard error still stands.
    assert decode(VALID["png-rgba"], max_pixels=0).size == (300, 100)
    with pytest.raises(ImageInputError, match="image too large"):
        decode(_icon([(0, 0, _png(20000, 20000))]), max_pixels=0)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageInputError, match="corrupt PNG"):
        decode(VALID["png-rgba"][:-200])


def test_jpeg_scan_limit_scales_with_size() -> None:
    # Small images may have many scans (cheap); the count is of the first image only (MPO, thumbnails).
    assert decode(_jpeg_with_scans(500, 200)).size == (500, 500)  # 206 scans of 0.25 MP: allowed 8000
    assert clip_preprocess._jpeg_scans(_jpeg_with_scans(500, 200)) == 206
    assert clip_preprocess._jpeg_scans(VALID["mpo"]) == 1
    assert clip_preprocess._jpeg_scans(VALID["jpeg-progressive"]) == len(_jpeg_segments(VALID["jpeg-progressive"]))
    with pytest.raises(ImageInputError, match=r"JPEG has 40 scans: a 8000x8000 JPEG may have at most 32"):
        clip_preprocess._check_jpeg(_jpeg_with_scans(100, 34), 8000, 8000)


# -- AVIF: the AV1 sequence header, not the container's 'ispe', says what gets decoded -----------


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, n: int) -> _BitWriter:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def bytes(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def test_av1_sequence_header_frame_limits() -> None:
    # Reduced still-picture header: every frame is max_frame_width x max_frame_height.
    reduced = _BitWriter().put(0, 3).put(1, 1).put(1, 1).put(8, 5).put(13, 4).put(13, 4).put(8999, 14).put(4999, 14)
    assert clip_preprocess._av1_frame_limit(reduced.bytes()) == (9000, 5000)
    # Full header (timing info, a decoder model, two operating points): a frame may override its size
    # with any value of frame_width_bits, and dav1d does not hold it to the maximum.
    full = _BitWriter().put(0, 3).put(0, 1).put(0, 1)
    full.put(1, 1).put(1000, 32).put(30000, 32).put(1, 1).put(0b00101, 5)  # timing, uvlc(4)
    full.put(1, 1).put(9, 5).put(90000, 32).put(4, 5).put(4, 5)  # decoder model, delay length 10
    full.put(1, 1).put(1, 5)  # initial display delay present, 2 operating points
    full.put(0x101, 12).put(9, 5).put(1, 1).put(1, 1).put(5, 10).put(6, 10).put(0, 1).put(1, 1).put(3, 4)
    full.put(0, 12).put(4, 5).put(0, 1).put(0, 1)
    full.put(8, 4).put(7, 4).put(299, 9).put(199, 8)
    assert clip_preprocess._av1_frame_limit(full.bytes()) == (512, 256)
    with pytest.raises(IndexError):
        clip_preprocess._av1_frame_limit(reduced.bytes()[:3])


def _obus(*obus: tuple[int, bytes]) -> bytes:
    return b"".join(bytes([(kind << 3) | 2, len(payload)]) + payload for kind, payload in obus)


def test_av1_decode_cost_counts_every_frame() -> None:
    header = _BitWriter().put(0, 3).put(1, 1).put(1, 1).put(8, 5).put(9, 4).put(9, 4).put(999, 10).put(999, 10)
    one = _obus((2, b""), (1, header.bytes()), (6, b"\0" * 8))
    assert clip_preprocess._av1_decode_cost(one) == (1_000_000, (1000, 1000))
    assert clip_preprocess._av1_decode_cost(one + _obus((3, b"\0"), (4, b"\0"), (6, b"\0")))[0] == 3_000_000


def _patch_ispe(data: bytes, w: int, h: int) -> bytes:
    out = bytearray(data)
    at = out.find(b"ispe")
    struct.pack_into(">II", out, at + 8, w, h)
    return bytes(out)


@pytest.mark.skipif(not HAVE_AVIF, reason="this Pillow reads no AVIF")
def test_avif_frames_larger_than_the_container_says_are_refused() -> None:
    # Before: an AVIF claiming 64x64 with an 8000x8000 AV1 frame decoded the frame (0.3 s, 94 MiB) and
    # returned 64x64. A 1100x1000 frame against a 1 MP limit shows the same, cheaply.
    real = _save(Image.new("L", (1100, 1000)), "AVIF", quality=10, speed=10)
    lying = _patch_ispe(real, 64, 64)
    assert Image.open(io.BytesIO(lying)).size == (64, 64)
    with pytest.raises(ImageInputError, match=r"AVIF frame \(from its AV1 sequence header\) too large: 1100x1000"):
        decode(lying, max_pixels=1_000_000)
    assert decode(lying, max_pixels=2_000_000).size == (64, 64)  # within the limit: decoded as Pillow does
    animated = _save(Image.new("RGB", (64, 64)), "AVIF", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    with pytest.raises(ImageInputError, match="animated AVIF"):
        decode(animated)
    broken = bytearray(real)
    broken[broken.find(b"iinf") - 4 : broken.find(b"iinf")] = b"\xff\xff\xff\xf0"  # a box past its container
    with pytest.raises(ImageInputError, match="malformed AVIF"):
        decode(bytes(broken))
    assert decode(real, max_pixels=2_000_000).size == (1100, 1000)
    # An HEIC or MP4 (ftyp, not an AVIF brand) is not parsed as one: just not a supported format.
    with pytest.raises(ImageInputError, match=NOT_ACCEPTED):
        decode(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)


@pytest.mark.skipif(not features.check("webp"), reason="no WebP")
def test_webp_canvas_is_checked_before_the_decoder_allocates_it() -> None:
    with pytest.raises(ImageInputError, match="max_aspect_ratio"):
        Preprocessor([224, 224], [0.5] * 3, [0.5] * 3).decode(_webp_canvas(16000, 16))
