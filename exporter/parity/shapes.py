"""Synthetic, labelled shape images and captions: the data the built-in ShapesCLIP model is trained on
(training/train_shapes.py) and the held-out set parity scores zero-shot decisions on.

numpy and PIL only (no torch). Every sample is a pure function of (generator, split, index, size):
its random parameters come from `numpy.random.SeedSequence([crc32("<generator>:<split>"), index])`,
so "train" and "heldout" draw from disjoint seed streams and two runs (or two machines) render the same
pixels. The scene is drawn at 2x `size` and downsampled with LANCZOS (anti-aliasing); the scene's
parameters are fractions of the image, so one index gives the same scene at every size.

Three generators:

* `sample`       one object: 8 shapes x 8 colours, small/large, at left/right/top/bottom/center, rotated
                 by at most 15 degrees, on a solid, gradient or noise-texture background whose colours
                 stay far from the object's. Caption e.g. "a photo of a small blue square on the left"
                 (one in four captions names no colour: "a large square at the top").
* `pair_sample`  two objects of different shapes and colours side by side (or one above the other).
                 Label "relation", e.g. "red circle left of blue square" (the left/top object first).
* `count_sample` one, two or three objects of one shape and colour. Label "count" ("one"/"two"/"three"),
                 caption e.g. "two blue squares".

Zero-shot scoring, for every label set (`label_sets()`): for one image, take its candidate classes
`candidates(sample, label_set)`; embed each candidate's prompts `prompts(label_set, label)`,
L2-normalise each, average and normalise again (prompt ensembling); the prediction is the candidate whose
text embedding has the largest cosine with the image embedding, and it is right when it equals
`label_of(sample, label_set)`. The global sets (`LABEL_SETS`: shape, colour, shape_colour, size,
position, count) give every image the same candidates; "relation" is scored per image over six
candidates: the true relation, the two objects swapped (order), their colours swapped (binding), both
swapped, and the two vertical (horizontal) readings of a horizontal (vertical) pair (axis).
`samples_for(label_set, ...)` draws images from the generator a label set is scored on.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "heldout")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "orange": (250, 135, 20),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = ("one", "two", "three")
BACKGROUNDS = ("plain", "gradient", "texture")

_PLURAL = {shape: shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s") for shape in SHAPES}
_POSITION_PHRASE = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}
_SUPERSAMPLE = 2
_MAX_ROTATION = 15.0  # degrees: a square never turns into a diamond
_MIN_CONTRAST = 110.0  # smallest RGB distance between an object's colour and any background pixel

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "shape_colour": tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES),
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
}
_PER_IMAGE_SETS = ("relation",)  # candidates differ per image: see candidates()
_GENERATOR = {"shape": "single", "colour": "single", "shape_colour": "single", "size": "single",
              "position": "single", "count": "count", "relation": "pair"}


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    caption: str
    labels: dict[str, str]


# --------------------------------------------------------------------------------------------- seeds

def _rng(generator: str, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    stream = zlib.crc32(f"{generator}:{split}".encode())
    return np.random.default_rng(np.random.SeedSequence([stream, int(index)]))


# ---------------------------------------------------------------------------------------- geometry

def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(sides: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(sides) * 2 * np.pi / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y + 2.5], axis=1)  # centre the bounding box vertically
    return pts / np.abs(pts).max()


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, 1), (a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a),
                     (-1, a), (-a, a)], dtype=float)


# Outlines in unit coordinates, y up, roughly filling [-1, 1]^2.
_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(72, 0.0),
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _regular(3, np.pi / 2) + np.array([0.0, -0.15]),
    "star": _star(),
    "hexagon": _regular(6, 0.0),
    "cross": _cross(),
    "diamond": np.array([(0.0, 1.0), (0.62, 0.0), (0.0, -1.0), (-0.62, 0.0)]),
    "heart": _heart(),
}
assert set(_OUTLINES) == set(SHAPES)


def _polygon(shape: str, cx: float, cy: float, radius: float, rotation: float,
             canvas: int) -> list[tuple[float, float]]:
    """The outline of `shape` centred at (cx, cy) (fractions of the image, y down), `radius` a fraction
    of the image side, rotated by `rotation` degrees, in canvas pixels."""
    theta = math.radians(rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = _OUTLINES[shape] @ rot.T * radius
    xs = (cx + pts[:, 0]) * canvas
    ys = (cy - pts[:, 1]) * canvas
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


# ------------------------------------------------------------------------------------- backgrounds

def _distance(a: Any, b: Any) -> np.ndarray:
    return np.sqrt(((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) ** 2).sum(axis=-1))


def _far_colour(rng: np.random.Generator, avoid: list[tuple[int, int, int]], margin: float) -> np.ndarray:
    for _ in range(1000):
        colour = rng.integers(0, 256, size=3).astype(float)
        if all(_distance(colour, a) >= margin for a in avoid):
            return colour
    raise RuntimeError("no background colour far enough from the objects")  # pragma: no cover


def _background(rng: np.random.Generator, avoid: list[tuple[int, int, int]], canvas: int) -> tuple[str, np.ndarray]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "plain":
        colour = _far_colour(rng, avoid, _MIN_CONTRAST)
        return kind, np.broadcast_to(colour, (canvas, canvas, 3)).copy()
    if kind == "gradient":
        for _ in range(1000):
            a, b = _far_colour(rng, avoid, _MIN_CONTRAST), _far_colour(rng, avoid, _MIN_CONTRAST)
            line = a[None, :] + np.linspace(0, 1, 9)[:, None] * (b - a)[None, :]
            if all(_distance(line, c).min() >= _MIN_CONTRAST for c in avoid):
                break
        angle = rng.uniform(0, 2 * np.pi)
        grid = (np.arange(canvas) + 0.5) / canvas - 0.5
        t = grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        return kind, a + t[..., None] * (b - a)
    amplitude = float(rng.uniform(15, 40))
    base = _far_colour(rng, avoid, _MIN_CONTRAST + amplitude * math.sqrt(3))
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(-1, 1, size=(cells, cells, 3))
    blobs = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32))
                                 .resize((canvas, canvas), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    grain = rng.uniform(-1, 1, size=(canvas, canvas, 3)) * 0.35
    return kind, base + amplitude * np.clip(0.75 * blobs + grain, -1, 1)


def _render(objects: list[tuple[str, str, float, float, float, float]], background: np.ndarray,
            size: int) -> Image.Image:
    canvas = background.shape[0]
    image = Image.fromarray(np.clip(background, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for shape, colour, cx, cy, radius, rotation in objects:
        draw.polygon(_polygon(shape, cx, cy, radius, rotation, canvas), fill=COLOURS[colour])
    return image if canvas == size else image.resize((size, size), Image.Resampling.LANCZOS)


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange star"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _check_size(size: int) -> int:
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    return int(size)


# ------------------------------------------------------------------------------------------ single

def sample(split: str, index: int, size: int = 64) -> ShapeSample:
    """One object on a background: labels shape, colour, shape_colour, size, position, background."""
    size = _check_size(size)
    rng = _rng("single", split, index)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    big = SIZES[int(rng.integers(len(SIZES)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    radius = float(rng.uniform(0.21, 0.27) if big == "large" else rng.uniform(0.11, 0.15))
    rotation = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    edge = radius + float(rng.uniform(0.03, 0.07))  # off-centre objects sit near their edge
    along = float(rng.uniform(-0.05, 0.05))  # jitter along the other axis
    cx, cy = {"left": (edge, 0.5 + along), "right": (1 - edge, 0.5 + along), "top": (0.5 + along, edge),
              "bottom": (0.5 + along, 1 - edge),
              "center": (0.5 + along, 0.5 + float(rng.uniform(-0.05, 0.05)))}[position]
    kind, background = _background(rng, [COLOURS[colour]], size * _SUPERSAMPLE)
    image = _render([(shape, colour, cx, cy, radius, rotation)], background, size)

    obj = f"{colour} {shape}"
    where = _POSITION_PHRASE[position]
    templates = (
        _a(obj),
        f"a photo of {_a(obj)}",
        f"a {big} {obj}",
        f"a photo of a {big} {obj}",
        f"{_a(obj)} {where}",
        f"a {big} {obj} {where}",
        f"a photo of a {big} {obj} {where}",
        f"{_a(obj)} on a {kind} background",
        f"a drawing of a {big} {obj}",
        # A quarter of the captions leave the colour out: they tie every colour of a shape to one text
        # (and are what zero-shot "shape" prompts say).
        _a(shape),
        f"a {big} {shape}",
        f"a {big} {shape} {where}",
    )
    caption = templates[int(rng.integers(len(templates)))]
    labels = {"shape": shape, "colour": colour, "shape_colour": obj, "size": big, "position": position,
              "background": kind}
    return ShapeSample(image=image, caption=caption, labels=labels)


def samples(split: str, n: int, size: int = 64, start: int = 0) -> list[ShapeSample]:
    return [sample(split, i, size) for i in range(start, start + n)]


# -------------------------------------------------------------------------------------------- pair

def _relation(first: str, second: str, vertical: bool) -> str:
    return f"{first} {'above' if vertical else 'left of'} {second}"


def _parse_relation(label: str) -> tuple[str, str, bool]:
    for word, vertical in ((" left of ", False), (" above ", True)):
        if word in label:
            first, second = label.split(word)
            return first, second, vertical
    raise ValueError(f"not a relation label: {label!r} (expected '<colour> <shape> left of|above <colour> <shape>')")


def pair_sample(split: str, index: int, size: int = 64) -> ShapeSample:
    """Two objects of different shapes and colours, side by side or one above the other.

    labels: relation ("red circle left of blue square" / "red circle above blue square": the left or
    top object first), first, second (their shape_colour), axis ("horizontal"/"vertical")."""
    size = _check_size(size)
    rng = _rng("pair", split, index)
    s1, s2 = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=2, replace=False))
    c1, c2 = (tuple(COLOURS)[int(i)] for i in rng.choice(len(COLOURS), size=2, replace=False))
    vertical = bool(rng.integers(2))
    r1, r2 = (float(r) for r in rng.uniform(0.11, 0.17, size=2))
    near = float(rng.uniform(0.2, 0.34))  # first object's coordinate along the axis
    far = float(rng.uniform(0.66, 0.8))
    across = rng.uniform(0.3, 0.7, size=2)
    across[1] = np.clip(across[0] + rng.uniform(-0.12, 0.12), 0.25, 0.75)  # clearly beside, not diagonal
    first, second = (near, float(across[0])), (far, float(across[1]))
    if vertical:
        first, second = first[::-1], second[::-1]
    rot = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=2)
    kind, background = _background(rng, [COLOURS[c1], COLOURS[c2]], size * _SUPERSAMPLE)
    image = _render([(s1, c1, *first, r1, float(rot[0])), (s2, c2, *second, r2, float(rot[1]))], background, size)

    a, b = f"{c1} {s1}", f"{c2} {s2}"
    if vertical:
        templates = (f"{_a(a)} above {_a(b)}", f"{_a(b)} below {_a(a)}", f"a photo of {_a(a)} above {_a(b)}",
                     f"{_a(a)} on top of {_a(b)}", f"a photo of {_a(b)} below {_a(a)}")
    else:
        templates = (f"{_a(a)} to the left of {_a(b)}", f"{_a(b)} to the right of {_a(a)}", f"{_a(a)} left of {_a(b)}",
                     f"a photo of {_a(a)} to the left of {_a(b)}", f"a photo of {_a(b)} to the right of {_a(a)}")
    caption = templates[int(rng.integers(len(templates)))]
    labels = {"relation": _relation(a, b, vertical), "first": a, "second": b,
              "axis": "vertical" if vertical else "horizontal", "background": kind}
    return ShapeSample(image=image, caption=caption, labels=labels)


# ------------------------------------------------------------------------------------------- count

def count_sample(split: str, index: int, size: int = 64) -> ShapeSample:
    """One, two or three small objects of one shape and colour: labels count, shape, colour, shape_colour."""
    size = _check_size(size)
    rng = _rng("count", split, index)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    n = int(rng.integers(1, 4))
    objects: list[tuple[str, str, float, float, float, float]] = []
    while len(objects) < n:  # rejection sampling: objects never touch
        radius = float(rng.uniform(0.09, 0.13))
        cx, cy = (float(v) for v in rng.uniform(radius + 0.03, 1 - radius - 0.03, size=2))
        if all(math.hypot(cx - o[2], cy - o[3]) > radius + o[4] + 0.06 for o in objects):
            objects.append((shape, colour, cx, cy, radius, float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))))
    kind, background = _background(rng, [COLOURS[colour]], size * _SUPERSAMPLE)
    image = _render(objects, background, size)

    count = COUNTS[n - 1]
    things = f"{colour} {shape if n == 1 else _PLURAL[shape]}"
    templates = (f"{count} {things}", f"a photo of {count} {things}", f"an image with {count} {things}")
    caption = templates[int(rng.integers(len(templates)))]
    labels = {"count": count, "shape": shape, "colour": colour, "shape_colour": f"{colour} {shape}",
              "background": kind}
    return ShapeSample(image=image, caption=caption, labels=labels)


# ------------------------------------------------------------------------------------ label sets

def label_sets() -> tuple[str, ...]:
    """Every label set zero-shot is scored on: the global ones (LABEL_SETS) and the per-image ones."""
    return (*LABEL_SETS, *_PER_IMAGE_SETS)


def compositional_sets() -> tuple[str, ...]:
    """The harder sets, scored on pair_sample ("relation") and count_sample ("count") images."""
    return ("relation", "count")


def _check_set(label_set: str) -> None:
    if label_set not in _GENERATOR:
        raise ValueError(f"unknown label set {label_set!r}; expected one of {label_sets()}")


def samples_for(label_set: str, split: str, n: int, size: int = 64, start: int = 0) -> list[ShapeSample]:
    """n images of the generator `label_set` is scored on (sample, pair_sample or count_sample)."""
    _check_set(label_set)
    make = {"single": sample, "pair": pair_sample, "count": count_sample}[_GENERATOR[label_set]]
    return [make(split, i, size) for i in range(start, start + n)]


def label_of(sample: ShapeSample, label_set: str) -> str:
    """The true class of `sample` in `label_set` (ValueError if its generator does not label that set)."""
    _check_set(label_set)
    try:
        return sample.labels[label_set]
    except KeyError:
        raise ValueError(f"this sample has no {label_set!r} label (it has {sorted(sample.labels)}); "
                         f"draw it with samples_for({label_set!r}, ...)") from None


def candidates(sample: ShapeSample, label_set: str) -> list[str]:
    """The classes zero-shot chooses between for this image: LABEL_SETS[label_set] for a global set;
    for "relation", the true relation and five confusions (order swapped, colours swapped, both, and
    the two readings along the other axis), sorted."""
    _check_set(label_set)
    if label_set in LABEL_SETS:
        return list(LABEL_SETS[label_set])
    first, second, vertical = _parse_relation(label_of(sample, label_set))
    (c1, s1), (c2, s2) = first.split(" "), second.split(" ")
    swapped_colours = (f"{c2} {s1}", f"{c1} {s2}")
    found = {
        _relation(first, second, vertical),  # true
        _relation(second, first, vertical),  # order
        _relation(*swapped_colours, vertical),  # binding
        _relation(swapped_colours[1], swapped_colours[0], vertical),  # both
        _relation(first, second, not vertical),  # axis
        _relation(second, first, not vertical),
    }
    return sorted(found)


def prompts(label_set: str, label: str) -> list[str]:
    """Zero-shot captions for one class, in the training captions' phrasing. Attributes a caption never
    names without a shape (a colour, a size, a position, a count) are ensembled over the other
    attributes: "small" -> "a small red circle", "a small red square", ..."""
    _check_set(label_set)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if label_set == "relation":
        first, second, vertical = _parse_relation(label)
        if vertical:
            return [f"{_a(first)} above {_a(second)}", f"{_a(second)} below {_a(first)}",
                    f"a photo of {_a(first)} above {_a(second)}"]
        return [f"{_a(first)} to the left of {_a(second)}", f"{_a(second)} to the right of {_a(first)}",
                f"a photo of {_a(first)} to the left of {_a(second)}"]
    if label not in LABEL_SETS[label_set]:
        raise ValueError(f"{label!r} is not a class of {label_set!r}: {LABEL_SETS[label_set]}")
    if label_set == "shape_colour":
        return [_a(label), f"a photo of {_a(label)}", f"a small {label}", f"a large {label}"]
    if label_set == "shape":
        return [_a(label), f"a small {label}", f"a large {label}"]
    if label_set == "colour":
        return [f"{_a(label)} {s}" for s in SHAPES] + [f"a photo of {_a(label)} {s}" for s in SHAPES]
    if label_set == "size":
        return [f"{_a(label)} {c} {s}" for c, s in pairs]
    if label_set == "position":
        return [f"{_a(c)} {s} {_POSITION_PHRASE[label]}" for c, s in pairs]
    # count
    return [f"{label} {c} {s if label == 'one' else _PLURAL[s]}" for c, s in pairs]
