"""The synthetic shapes data (clip_triton.exporter.parity.shapes) and the ShapesCLIP training script."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter.parity import shapes

ROOT = Path(__file__).resolve().parents[1]


def _pixels(s: shapes.ShapeSample) -> np.ndarray:
    return np.asarray(s.image)


def test_deterministic_pure_function_of_split_index_size() -> None:
    for make in (shapes.sample, shapes.pair_sample, shapes.count_sample):
        a, b = make("train", 7), make("train", 7)
        assert a.caption == b.caption and a.labels == b.labels
        assert np.array_equal(_pixels(a), _pixels(b))
        big = make("train", 7, size=96)
        assert big.image.size == (96, 96) and big.labels == a.labels  # same scene at another size
    # Order does not matter: a batch equals the samples drawn one at a time.
    batch = shapes.samples("heldout", 4, start=10)
    assert [s.caption for s in batch] == [shapes.sample("heldout", i).caption for i in range(10, 14)]
    # Not the process's global RNG.
    np.random.seed(1)
    first = _pixels(shapes.sample("train", 3))
    np.random.seed(2)
    assert np.array_equal(first, _pixels(shapes.sample("train", 3)))


def test_image_size_and_mode() -> None:
    for make in (shapes.sample, shapes.pair_sample, shapes.count_sample):
        for size in (64, 32):
            s = make("heldout", 0, size=size)
            assert s.image.mode == "RGB" and s.image.size == (size, size)
    with pytest.raises(ValueError, match="split"):
        shapes.sample("test", 0)
    with pytest.raises(ValueError, match="index"):
        shapes.sample("train", -1)


def test_splits_disjoint() -> None:
    train = {_pixels(s).tobytes() for s in shapes.samples("train", 200)}
    heldout = {_pixels(s).tobytes() for s in shapes.samples("heldout", 200)}
    assert len(train) == 200 and len(heldout) == 200 and not train & heldout
    for make in (shapes.pair_sample, shapes.count_sample):
        assert not np.array_equal(_pixels(make("train", 0)), _pixels(make("heldout", 0)))


def test_every_shape_colour_size_position_appears_and_captions_name_them() -> None:
    drawn = shapes.samples("train", 600)
    assert len(shapes.SHAPES) >= 8 and len(shapes.COLOURS) >= 8
    assert len(shapes.LABEL_SETS["shape_colour"]) >= 48
    for label_set in ("shape", "colour", "size", "position"):
        assert {s.labels[label_set] for s in drawn} == set(shapes.LABEL_SETS[label_set]), label_set
    assert len({s.labels["shape_colour"] for s in drawn}) >= 0.9 * len(shapes.LABEL_SETS["shape_colour"])
    assert len({s.caption for s in drawn}) > 200  # varied templates
    named = [s for s in drawn if s.labels["colour"] in s.caption.split()]
    assert 0.6 < len(named) / len(drawn) < 0.9  # a quarter of the captions name no colour
    for s in drawn:
        words = s.caption.split()
        assert s.labels["shape"] in words, s.caption
        assert not (set(shapes.COLOURS) - {s.labels["colour"]}) & set(words), s.caption  # no other colour
        assert s.labels["shape_colour"] in s.caption or s.labels["colour"] not in words
        if s.labels["size"] in words:  # "small"/"large" only ever describes the object's size
            assert not ({"small", "large"} - {s.labels["size"]}) & set(words)
        assert all(shapes.label_of(s, name) in shapes.candidates(s, name) for name in shapes.LABEL_SETS
                   if name != "count")
    for colour, rgb in shapes.COLOURS.items():
        assert len(rgb) == 3 and all(0 <= v <= 255 for v in rgb), colour


def test_object_colour_is_in_the_image() -> None:
    """The object is drawn in its named colour and the background keeps away from it."""
    for s in shapes.samples("heldout", 40, size=64):
        rgb = np.asarray(shapes.COLOURS[s.labels["colour"]], dtype=float)
        distance = np.sqrt(((_pixels(s).astype(float) - rgb) ** 2).sum(-1))
        close = (distance < 12).mean()
        assert close > 0.004, s.labels  # even a small object covers tens of pixels
        assert close < 0.5, s.labels  # and the background is not that colour


def test_pair_and_count_samples() -> None:
    pairs = shapes.samples_for("relation", "train", 60)
    assert {s.labels["axis"] for s in pairs} == {"horizontal", "vertical"}
    for s in pairs:
        relation = shapes.label_of(s, "relation")
        first, second = s.labels["first"], s.labels["second"]
        assert relation in (f"{first} left of {second}", f"{first} above {second}")
        assert first in s.caption and second in s.caption
        assert first.split()[0] != second.split()[0] and first.split()[1] != second.split()[1]
        cands = shapes.candidates(s, "relation")
        assert len(cands) == len(set(cands)) == 6 and relation in cands
        c1, s1 = first.split()
        c2, s2 = second.split()
        word = " above " if s.labels["axis"] == "vertical" else " left of "
        assert {f"{second}{word}{first}", f"{c2} {s1}{word}{c1} {s2}"} < set(cands)
        assert all(len(shapes.prompts("relation", c)) >= 2 for c in cands)
    with pytest.raises(ValueError, match="relation"):
        shapes.label_of(shapes.sample("train", 0), "relation")

    counts = shapes.samples_for("count", "train", 60)
    assert {shapes.label_of(s, "count") for s in counts} == set(shapes.COUNTS)
    for s in counts:
        count = s.labels["count"]
        assert count in s.caption.split() and s.labels["colour"] in s.caption
        assert s.caption.endswith(s.labels["shape"]) == (count == "one")  # plural for two and three
    assert set(shapes.compositional_sets()) <= set(shapes.label_sets())


def test_prompts_cover_every_class() -> None:
    for label_set, classes in shapes.LABEL_SETS.items():
        for label in classes:
            found = shapes.prompts(label_set, label)
            assert found and len(set(found)) == len(found), (label_set, label)
            assert all(label.split()[-1] in p or label_set == "count" for p in found)
        with pytest.raises(ValueError):
            shapes.prompts(label_set, "no such class")
    assert shapes.prompts("shape_colour", "orange star")[0] == "an orange star"
    with pytest.raises(ValueError, match="label set"):
        shapes.prompts("texture", "plain")


def test_shapes_module_needs_no_torch() -> None:
    code = "import sys, clip_triton.exporter.parity.shapes as s; s.sample('train', 0); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_config_is_open_clip_format() -> None:
    cfg = json.loads((ROOT / "exporter" / "sources" / "builtin" / "ShapesCLIP-RN-T.json").read_text())
    assert set(cfg) == {"embed_dim", "vision_cfg", "text_cfg"}
    assert cfg["vision_cfg"]["image_size"] == 64 and cfg["text_cfg"]["vocab_size"] == 49408


def test_train_a_few_steps(tmp_path: Path) -> None:
    """The training entry point end to end on a tiny budget: finite loss, weights and metrics written."""
    from safetensors.torch import load_file

    from training.train_shapes import build_model, train

    metrics = train(tmp_path, steps=3, batch=8, seed=0, quiet=True, pool=24, eval_images=12, eval_pairs=12,
                    warmup=1)
    assert math.isfinite(metrics["final_loss"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["batch"] == 8 and saved["seed"] == 0
    assert set(saved["zero_shot"]) == set(shapes.label_sets())
    assert {"torch", "open_clip"} <= set(saved["versions"])
    assert re.fullmatch(r"\d+\.\d+", f"{saved['seconds']['train']}")
    state = load_file(str(tmp_path / "model.safetensors"))
    model, tokenizer, _ = build_model()
    assert tokenizer(["a red circle"]).shape == (1, model.context_length)
    model.load_state_dict(state)  # strict: the checkpoint is exactly open_clip's state_dict
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in state.values())
