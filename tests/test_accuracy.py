"""Parity's accuracy rows (docs/design.md, "Parity"): the metric math, labelled sets (built-in shapes and
the user's own, hostile ones refused in one line), the agreement gate, and the shipped ShapesCLIP model
served with the same zero-shot decisions as PyTorch (marked `server`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.parity import labelled as labelled_sets
from clip_triton.exporter.parity.labelled import LabelledSet, LabelSet, load
from clip_triton.exporter.parity.metrics import accuracy, agreement, class_embeddings, recall_at_k
from clip_triton.exporter.parity.report import FAIL, PASS, SKIP, format_markdown, format_table, judge_accuracy
from clip_triton.exporter.parity.run import run_parity
from clip_triton.exporter.parity.samples import ImageSample, SampleSet
from clip_triton.exporter.runtimes import TowerBatch
from helpers import linked_copy, run_cli, tiny_images

SHAPES_MODEL = "ShapesCLIP-RN-T"
LABELLED_IMAGES = 48  # of the shapes held-out split, in the tests without a server


def _has_builtin_weights() -> bool:
    from clip_triton.exporter.sources.open_clip import builtin_models

    return SHAPES_MODEL in builtin_models()


def stage(result: dict, name: str) -> dict:
    return next(s for s in result["stages"] if s["stage"] == name)


# ------------------------------------------------------------------ the metric math (numpy only)


def test_class_embeddings_average_normalised_prompts() -> None:
    texts = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 5.0], [1.0, 1.0]])
    classes = class_embeddings(texts, [[0, 1], [2], [3, 0]])
    np.testing.assert_allclose(classes[0], [np.sqrt(0.5), np.sqrt(0.5)])  # not dragged by the 2.0 norm
    np.testing.assert_allclose(classes[1], [0.0, 1.0])
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        class_embeddings(texts, [[0], []])


def test_accuracy_and_agreement_count_items() -> None:
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    assert accuracy(np.array([1, 1]), np.array([0, 0])) == 0.0
    assert agreement(np.array([3, 1, 2]), np.array([3, 1, 2])) == 1.0
    assert agreement(np.array([3, 1, 2]), np.array([3, 0, 2])) == pytest.approx(2 / 3)
    assert np.isnan(accuracy(np.array([], int), np.array([], int)))
    with pytest.raises(ValueError, match="shape mismatch"):
        accuracy(np.array([1, 2]), np.array([1]))


def test_recall_at_k_ranks_positives() -> None:
    sim = np.array([
        [0.9, 0.1, 0.0],  # positive ranked 1st
        [0.5, 0.4, 0.3],  # positive (2) ranked 3rd
        [0.1, 0.8, 0.9],  # positive (1) ranked 2nd
    ])
    pos = np.eye(3, dtype=bool)
    pos[2] = [False, True, False]
    pos[1] = [False, False, True]
    assert recall_at_k(sim, pos, (1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    # Several positives: any one in the top k is a hit; a query without positives is left out.
    many = np.array([[True, False, True], [False, False, True], [False, False, False]])
    assert recall_at_k(sim, many, (1,)) == {1: 0.5}
    # Ties rank in index order: a constant row is not a free hit for a late positive.
    assert recall_at_k(np.zeros((1, 4)), np.array([[False, False, False, True]]), (1, 3)) == {1: 0.0, 3: 0.0}
    assert recall_at_k(np.full((1, 2), np.nan), np.array([[False, True]]), (1,)) == {1: 0.0}
    with pytest.raises(ValueError, match="shape mismatch"):
        recall_at_k(sim, pos[:2])


def _hand_set(classes: bool = True) -> tuple[SampleSet, dict[str, np.ndarray]]:
    """4 labelled images (after 1 unlabelled one), 2 classes of 2 prompts (unless not `classes`), 2 captions;
    embeddings by hand."""
    kind = LabelSet("kind", ["x", "y"], [["px1", "px2"], ["py1", "py2"]], [0, 0, 1, 1])
    labelled = LabelledSet(
        name="hand", source="by hand", images=[ImageSample(f"i{i}", b"") for i in range(4)],
        label_sets=[kind] if classes else [], captions=["cx", "cy"], pairs=[(0, 0), (1, 0), (2, 1), (3, 1)],
    )
    texts = ["other", *labelled.texts()]
    samples = SampleSet(
        image_names=["u", *[s.name for s in labelled.images]], images=TowerBatch(np.zeros((5, 1)), [b""] * 5),
        captions=["other"], prompts=[], texts=TowerBatch(np.zeros((len(texts), 1)), texts), labels=[], templates=1,
        labelled=labelled, labelled_image_start=1, labelled_text_start=1,
    )
    x, y = [1.0, 0.0], [0.0, 1.0]
    text = np.array([[1.0, 1.0], *([x, x, y, y] if classes else []), x, y])  # other, px1, px2, py1, py2, cx, cy
    image = np.array([[5.0, 5.0], [1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.6, 0.4]])  # the last one is wrong
    return samples, {"image": image, "text": text}


def test_judge_accuracy_reports_and_gates_agreement() -> None:
    samples, ref = _hand_set()
    rows = judge_accuracy(samples, ref, None, None)  # PyTorch's own rows
    kind, captions = rows
    assert (kind.set, kind.top1, kind.reference_top1, kind.agreement) == ("hand/kind", 0.75, 0.75, 1.0)
    assert captions.set == "hand/captions" and captions.top1 is None
    assert captions.recall == {"i2t@1": 0.75, "i2t@5": 1.0, "t2i@1": 1.0, "t2i@5": 1.0}
    # A stage that moves one image to the other side: one changed pick, agreement 3/4, and it is right now.
    moved = {"image": ref["image"].copy(), "text": ref["text"]}
    moved["image"][4] = [0.1, 1.0]
    rows = judge_accuracy(samples, ref, moved, 0.8)
    assert rows[0].agreement == 0.75 and rows[0].changed == 1 and rows[0].status == FAIL
    assert rows[0].top1 == 1.0 and rows[0].reference_top1 == 0.75  # different is a failure, even if better
    # Beside classes, the captions row reports its agreement but is not gated (paraphrases near-tie).
    assert rows[1].changed == 1 and rows[1].min_agreement is None and rows[1].status == PASS
    assert rows[1].recall["i2t@1"] == 1.0
    assert all(r.status == PASS for r in judge_accuracy(samples, ref, moved, 0.75))
    assert all(r.status == PASS for r in judge_accuracy(samples, ref, ref, 1.0))
    # A captions-only set (a user's captions file): the top-1 caption is the decision, and it is gated.
    samples, ref = _hand_set(classes=False)
    (only,) = judge_accuracy(samples, ref, {"image": moved["image"], "text": ref["text"]}, 0.8)
    assert only.set == "hand/captions" and only.min_agreement == 0.8 and only.status == FAIL


# ------------------------------------------------------------------ labelled sets


def test_shapes_set_is_the_held_out_split() -> None:
    from clip_triton.exporter.parity import shapes

    got = load("shapes", 12)
    assert got.name == "shapes" and len(got.images) == 12 and "heldout" in got.source
    assert [ls.name for ls in got.label_sets] == ["shape_colour", "shape", "colour"]
    main = got.label_sets[0]
    held = shapes.samples("heldout", 12)
    assert [main.labels[t] for t in main.truth] == [s.labels["shape_colour"] for s in held]
    assert len(main.labels) == len(shapes.LABEL_SETS["shape_colour"])
    assert all(main.prompts[i] == shapes.prompts("shape_colour", label) for i, label in enumerate(main.labels))
    assert [got.captions[c] for _, c in got.pairs] == [s.caption for s in held]
    assert load("shapes", 12).images[3].data == got.images[3].data  # deterministic bytes


def test_auto_means_shapes_only_for_the_builtin_model() -> None:
    assert labelled_sets.resolve("auto", "builtin") == "shapes"
    assert labelled_sets.resolve("auto", None) is None and labelled_sets.resolve("auto", "openai") is None
    assert labelled_sets.resolve("none", "builtin") is None
    assert labelled_sets.resolve("shapes", None) == "shapes"
    assert labelled_sets.resolve("my/set", None) == Path("my/set")


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(tiny_images(n, seed)):
        (folder / f"img{i}.png").write_bytes(data)


def test_class_folders_set(tmp_path: Path) -> None:
    _write_images(tmp_path / "set" / "golden_retriever", 2)
    _write_images(tmp_path / "set" / "cat", 3, seed=1)
    (tmp_path / "set" / "cat" / "notes.txt").write_text("not an image: ignored, as --images ignores it")
    (tmp_path / "set" / ".cache").mkdir()
    got = load(tmp_path / "set")
    (kind,) = got.label_sets
    assert got.name == "set" and kind.labels == ["cat", "golden_retriever"]
    assert kind.truth == [0, 0, 0, 1, 1] and got.images[0].name == "cat/img0.png"
    assert kind.prompts == [["a photo of a cat"], ["a photo of a golden retriever"]]
    assert not got.captions


@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_captions_file_set(tmp_path: Path, suffix: str) -> None:
    _write_images(tmp_path / "imgs", 3)
    rows = [("img0.png", "a red thing"), ("img1.png", "a blue thing"), ("img0.png", "something red"),
            ("img2.png", "a red thing")]
    if suffix == "jsonl":
        text = "\n".join(json.dumps({"image": f"imgs/{i}", "caption": c}) for i, c in rows) + "\n\n"
    else:
        text = "image\tcaption\n" + "".join(f"imgs/{i}\t{c}\n" for i, c in rows)
    (tmp_path / f"captions.{suffix}").write_text(text, encoding="utf-8")
    got = load(tmp_path)  # the folder holding the file, or the file itself
    assert load(tmp_path / f"captions.{suffix}").pairs == got.pairs
    assert [s.name for s in got.images] == ["imgs/img0.png", "imgs/img1.png", "imgs/img2.png"]
    assert got.captions == ["a red thing", "a blue thing", "something red"]
    assert got.pairs == [(0, 0), (1, 1), (0, 2), (2, 0)] and not got.label_sets


def _bad_sets(root: Path) -> dict[str, tuple[Path, str]]:
    """Each hostile set: (the path given, what its one-line error says)."""
    cases: dict[str, tuple[Path, str]] = {}

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    cases["missing"] = (root / "nowhere", "does not exist")
    cases["empty"] = (folder("empty"), "holds no class folders")
    one = folder("one_class")
    _write_images(one / "cat", 2)
    cases["one class"] = (one, "zero-shot needs two or more")
    loose = folder("loose")
    _write_images(loose, 2)
    cases["no class folders"] = (loose, "holds images but no class folders")
    mixed = folder("mixed")
    _write_images(mixed / "cat", 1)
    _write_images(mixed / "dog", 1)
    _write_images(mixed, 1)
    cases["loose images"] = (mixed, "outside the class folders")
    hollow = folder("hollow")
    _write_images(hollow / "cat", 1)
    (hollow / "dog").mkdir()
    (hollow / "dog" / "readme.txt").write_text("no images here")
    cases["class folder without images"] = (hollow, "class folder .*dog holds no images")
    broken = folder("broken")
    _write_images(broken / "cat", 1)
    _write_images(broken / "dog", 1)
    (broken / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cases["unreadable image"] = (broken, "bad.jpg is not a readable image")

    def captions(name: str, file: str, text: str | bytes, images: int = 1) -> Path:
        path = folder(name)
        _write_images(path, images)
        (path / file).write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    cases["not json"] = (captions("cj", "captions.jsonl", '{"image": "img0.png", "caption": "x"}\n{oops\n'),
                         "line 2 is not JSON")
    cases["json without fields"] = (captions("cf", "captions.jsonl", '["img0.png", "x"]\n'),
                                    'line 1 is not a JSON object with string fields "image" and "caption"')
    cases["tsv without tab"] = (captions("ct", "captions.tsv", "img0.png a caption\n"), "line 1 has no tab")
    cases["empty caption"] = (captions("ce", "captions.tsv", "img0.png\t  \n"), "line 1 has an empty caption")
    cases["no captions"] = (captions("cn", "captions.jsonl", "\n\n"), "has no captions")
    cases["not utf-8"] = (captions("cu", "captions.tsv", b"img0.png\t\xff\xfe\n"), "is not UTF-8")
    cases["missing image"] = (captions("cm", "captions.tsv", "img0.png\tx\nimg7.png\ty\n"),
                              "line 2 names img7.png, which does not exist")
    cases["escapes the folder"] = (captions("cx", "captions.tsv", "../cj/img0.png\tx\n"),
                                   "line 1 names an image outside")
    path = captions("cb", "captions.tsv", "img0.png\tx\nbad.png\ty\n")
    (path / "bad.png").write_bytes(b"\x89PNG but not really")
    cases["unreadable captioned image"] = (path, "bad.png is not a readable image")
    odd = folder("odd") / "captions.csv"
    odd.write_text("img0.png,x\n")
    cases["wrong suffix"] = (odd, "must be .jsonl or .tsv")
    return cases


def test_bad_user_sets_are_one_line_errors(tmp_path: Path) -> None:
    for name, (path, message) in _bad_sets(tmp_path).items():
        with pytest.raises(ClipTritonError, match=message) as info:
            load(path)
        text = str(info.value)
        assert "\n" not in text and text.startswith("--labelled-set"), f"{name}: {text!r}"


def test_bad_parity_options_exit_2_before_any_work(tmp_path: Path) -> None:
    """Through the CLI: a missing set and an impossible agreement are refused before the export is read."""
    missing = run_cli("parity", "--export", str(tmp_path), "--labelled-set", str(tmp_path / "nope"), timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: --labelled-set {tmp_path / 'nope'} does not")
    absurd = run_cli("parity", "--export", str(tmp_path), "--min-agreement-fp32", "1.01", timeout=120)
    assert absurd.returncode == 2
    assert absurd.stderr.strip().splitlines()[-1].startswith("error: --min-agreement-fp32 must be")
    with pytest.raises(ClipTritonError, match="--labelled-samples must be"):
        run_parity(tmp_path, labelled_samples=0)


# ------------------------------------------------------------------ parity on the ShapesCLIP export
# (conftest's shared `shapes_fp16_export`: the builtin weights, FP32 and FP16 graphs)


def test_parity_reports_accuracy_rows_per_stage(shapes_fp16_export: Path, tmp_path: Path) -> None:
    export = linked_copy(shapes_fp16_export, tmp_path / "export")
    result = run_parity(export, samples=2, labelled_set="shapes", labelled_samples=LABELLED_IMAGES)
    assert result["passed"], result["failures"]
    labelled = result["labelled"]
    assert labelled["images"] == LABELLED_IMAGES and labelled["label_sets"]["shape_colour"] == 64
    sets = ["shapes/shape_colour", "shapes/shape", "shapes/colour", "shapes/captions"]
    assert [row["set"] for row in labelled["pytorch"]] == sets
    embedding_stages = [s for s in result["stages"] if "towers" in s]
    assert {s["stage"] for s in embedding_stages} >= {"onnx-fp32", "onnx-fp16"}
    reference = {row["set"]: row for row in labelled["pytorch"]}
    for entry in embedding_stages:  # every stage that ran has the rows; skipped ones have none
        assert [row["set"] for row in entry["accuracy"]] == sets
        for row in entry["accuracy"]:
            assert row["status"] == PASS and row["images"] == LABELLED_IMAGES
            gate = (0.99 if entry["precision"] == "fp32" else 0.98) if "top1" in row else None
            assert row.get("min_agreement") == gate  # class rows are gated; beside them, captions are not
            assert row.get("reference_top1") == reference[row["set"]].get("top1")
        fp = {row["set"]: row for row in entry["accuracy"]}
        assert set(fp["shapes/captions"]["recall"]) == {"i2t@1", "i2t@5", "t2i@1", "t2i@5"}
    assert all("accuracy" not in s for s in result["stages"] if s["status"] == SKIP)
    fp32 = {row["set"]: row for row in stage(result, "onnx-fp32")["accuracy"]}
    assert fp32["shapes/shape_colour"]["agreement"] == 1.0  # FP32 graphs decide as PyTorch does
    if _has_builtin_weights():  # the trained model (99.9 % on 2,000 held-out images; chance 1/64)
        assert reference["shapes/shape_colour"]["top1"] >= 0.9
    table = format_table(result)
    assert "PyTorch top-1" in table and "R@5 t->i" in table
    assert any(line.startswith("onnx-fp16") and "shapes/colour" in line and "PASS" in line
               for line in table.splitlines())
    assert "## Accuracy" in format_markdown(result) and "| pytorch | shapes/shape_colour |" in format_markdown(result)
    on_disk = json.loads((export.with_name("export-parity") / "parity.json").read_text())  # beside the export
    assert on_disk["labelled"]["pytorch"] == labelled["pytorch"]
    assert stage(on_disk, "onnx-fp32")["accuracy"][0]["agreement"] == 1.0
    # auto: the builtin model gets the shapes set without asking; any other model none.
    assert ("labelled" in run_parity(export, samples=1, labelled_samples=8)) == _has_builtin_weights()


def _last_3x3_conv(path: Path) -> str:
    """The widest 3x3 convolution of the image graph (ShapesCLIP-RN-T's last stage; BatchNorm folded into it
    by the export, so its name is the exporter's)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    convs = [t for t in graph.initializer if len(t.dims) == 4 and list(t.dims[2:]) == [3, 3]]
    return max(convs, key=lambda t: t.dims[0]).name


def test_agreement_below_tolerance_fails_parity(shapes_fp16_export: Path, tmp_path: Path) -> None:
    """A corrupted image graph whose cosines still pass a lax threshold: the changed decisions alone
    fail parity (exit 1), naming the stage and the labelled set."""
    from test_parity import scale_initializer

    export = linked_copy(shapes_fp16_export, tmp_path / "export", skip=(".fp16.onnx",))
    manifest = json.loads((export / "manifest.json").read_text())
    manifest.pop("fp16", None)
    (export / "manifest.json").unlink()
    (export / "manifest.json").write_text(json.dumps(manifest))
    scale_initializer(export / "image_encoder.onnx", _last_3x3_conv(export / "image_encoder.onnx"), factor=1.5)
    proc = run_cli("parity", "--export", str(export), "--samples", "1", "--labelled-set", "shapes",
                   "--labelled-samples", str(LABELLED_IMAGES), "--min-cosine-fp32", "0.01", "--quiet", timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: parity failed: onnx-fp32 accuracy on shapes/"), error
    assert "top-1 agreement with PyTorch" in error and "min cosine" not in error
    report = json.loads((tmp_path / "export-parity" / "parity.json").read_text())
    fp32 = stage(report, "onnx-fp32")
    assert fp32["status"] == FAIL and fp32["towers"]["image"]["status"] == PASS
    assert any(row["status"] == FAIL and row["agreement"] < 0.99 for row in fp32["accuracy"])
    assert "FAIL (min 99.0%" in proc.stdout


# ------------------------------------------------------------------ the shipped model, served


@pytest.mark.server
def test_served_shapes_model_decides_as_pytorch(shapes_fp16_export: Path, tmp_path: Path) -> None:
    """ShapesCLIP-RN-T exported, written as a python-runtime repository and served by the embedded
    tritonserver: on the shapes held-out split (the default 120 images) the served zero-shot picks equal
    PyTorch's item for item, for bytes in (triton) and client-side crops in (triton-pixels)."""
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    export = linked_copy(shapes_fp16_export, tmp_path / "export")
    repo = write_repository(export, tmp_path / "repo", RepositoryOptions(runtime="python"))
    result = run_parity(export, repository=repo, samples=2, labelled_set="shapes")
    assert result["passed"], result["failures"]
    reference = {row["set"]: row for row in result["labelled"]["pytorch"]}
    for name in ("triton", "triton-pixels"):
        rows = {row["set"]: row for row in stage(result, name)["accuracy"]}
        for key in ("shapes/shape_colour", "shapes/shape", "shapes/colour", "shapes/captions"):
            row = rows[key]
            assert row["images"] == labelled_sets.DEFAULT_SHAPES_IMAGES
            assert row["changed"] == 0 and row["agreement"] == 1.0, (name, key, row)
            assert row.get("top1") == reference[key].get("top1")
        assert rows["shapes/captions"]["recall"] == reference["shapes/captions"]["recall"]
    if _has_builtin_weights():
        assert reference["shapes/shape_colour"]["top1"] >= 0.9


def test_demo_captions_are_close_confusers() -> None:
    from clip_triton.exporter.build import demo_captions

    labels = {"shape": "circle", "colour": "orange", "size": "small"}
    got = demo_captions("a photo of a small orange circle on the left", labels)
    assert got[0] == "a photo of a small orange circle on the left"
    assert "a photo of a small purple circle on the left" in got  # other colour
    assert "a photo of a small orange square on the left" in got  # other shape
    assert "a photo of a large orange circle on the left" in got  # other size
    assert "a photo of a small purple square on the left" in got  # both
    assert len(got) == len(set(got)) == 7
    assert demo_captions("an orange star", {"shape": "star", "colour": "orange"})[1] == "a purple star"
