"""Labelled sets for parity's accuracy rows (docs/design.md, "Parity"): images with a class per label
set (zero-shot top-1) and/or captions (retrieval recall), each stage's accuracy beside PyTorch's.

Where they come from (`--labelled-set`):
- `shapes`: the held-out split of the built-in shapes dataset (clip_triton.exporter.parity.shapes),
  label sets shape_colour (the main one), shape and colour, each image's caption for recall;
- a folder with one sub-folder per class: class name = folder name, prompt "a photo of a {class}"
  (underscores read as spaces);
- a folder holding `captions.jsonl` or `captions.tsv` (or that file itself): image file name ->
  caption, images relative to the file's folder; recall only.

A user's set is refused with one line (exit 2) when it is missing, empty, has a class folder without
an image, an unreadable image (as `--images` refuses one) or a malformed captions file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.parity.samples import IMAGE_SUFFIXES, ImageSample, LabelledSet, LabelSet, read_image

FLAG = "--labelled-set"
AUTO, SHAPES, NONE = "auto", "shapes", "none"
BUILTIN_PRETRAINED = "builtin"  # manifest.pretrained of the project's own trained model
DEFAULT_SHAPES_IMAGES = 120
MAX_LABELLED_IMAGES = 10_000
SHAPES_LABEL_SETS = ("shape_colour", "shape", "colour")  # the first is the main one
SHAPES_SPLIT = "heldout"
CLASS_TEMPLATE = "a photo of a {}"
CAPTION_FILES = ("captions.jsonl", "captions.tsv")


def resolve(choice: str | Path | None, pretrained: str | None) -> str | Path | None:
    """`--labelled-set` as SHAPES, a Path or None (auto: the shapes set for the builtin trained model,
    nothing otherwise, so parity on other models stays as fast as without it)."""
    if choice is None:
        return None
    text = str(choice)
    if text == AUTO:
        return SHAPES if pretrained == BUILTIN_PRETRAINED else None
    if text == NONE:
        return None
    if text == SHAPES:
        return SHAPES
    return Path(text)


def check_choice(choice: str | Path | None) -> None:
    """Before any work: a user's set must at least exist (parsed in full by `load`)."""
    if choice is None or str(choice) in (AUTO, NONE, SHAPES):
        return
    path = Path(choice)
    if not path.exists():
        raise ClipTritonError(f"{FLAG} {path} does not exist (give auto, shapes, none, a folder or a captions file)")


def load(choice: str | Path, count: int = DEFAULT_SHAPES_IMAGES) -> LabelledSet:
    """The labelled set `choice` (SHAPES or a path) names; a bad user set is one line, exit 2."""
    if choice == SHAPES:
        return shapes_set(count)
    path = Path(choice)
    if path.is_file():
        return captions_set(path)
    if not path.is_dir():
        raise ClipTritonError(f"{FLAG} {path} does not exist (give auto, shapes, none, a folder or a captions file)")
    for name in CAPTION_FILES:
        if (path / name).is_file():
            return captions_set(path / name)
    return class_folders_set(path)


# ---------------------------------------------------------------------------------------------
# The built-in shapes set
# ---------------------------------------------------------------------------------------------


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG file bytes (lossless: what parity and the demo send is what was drawn)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_set(count: int = DEFAULT_SHAPES_IMAGES) -> LabelledSet:
    """The first `count` images of the shapes held-out split, with their labels and captions."""
    from clip_triton.exporter.parity import shapes

    items = shapes.samples(SHAPES_SPLIT, count)
    images = [ImageSample(f"shapes-{SHAPES_SPLIT}-{i:04d}.png", png_bytes(s.image)) for i, s in enumerate(items)]
    label_sets = []
    for name in SHAPES_LABEL_SETS:
        labels = list(shapes.LABEL_SETS[name])
        index = {label: i for i, label in enumerate(labels)}
        truth = [index[shapes.label_of(s, name)] for s in items]
        label_sets.append(LabelSet(name, labels, [list(shapes.prompts(name, label)) for label in labels], truth))
    captions = list(dict.fromkeys(s.caption for s in items))
    where = {caption: i for i, caption in enumerate(captions)}
    pairs = [(i, where[s.caption]) for i, s in enumerate(items)]
    return LabelledSet(SHAPES, f"shapes {SHAPES_SPLIT} split, {len(items)} images", images, label_sets,
                       captions, pairs)


# ---------------------------------------------------------------------------------------------
# The user's sets
# ---------------------------------------------------------------------------------------------


def _too_many(path: Path, count: int) -> None:
    if count > MAX_LABELLED_IMAGES:
        raise ClipTritonError(f"{FLAG} {path} holds more than {MAX_LABELLED_IMAGES} images; use a subset")


def class_folders_set(folder: Path) -> LabelledSet:
    """One sub-folder per class, every image in it of that class."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not classes:
        what = f"images but no class folders (e.g. {loose[0]})" if loose else "no class folders"
        raise ClipTritonError(
            f"{FLAG} {folder} holds {what}: give one sub-folder of images per class, or a "
            f"{' / '.join(CAPTION_FILES)} file"
        )
    if loose:
        raise ClipTritonError(f"{FLAG} {folder} holds images outside the class folders (e.g. {loose[0]})")
    if len(classes) < 2:
        raise ClipTritonError(f"{FLAG} {folder} has one class folder ({classes[0].name}); zero-shot needs two or more")
    images: list[ImageSample] = []
    truth: list[int] = []
    for index, sub in enumerate(classes):
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ClipTritonError(f"{FLAG}: class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        _too_many(folder, len(images) + len(files))
        for path in files:
            sample = read_image(path, FLAG)
            images.append(ImageSample(f"{sub.name}/{sample.name}", sample.data))
            truth.append(index)
    labels = [sub.name for sub in classes]
    prompts = [[CLASS_TEMPLATE.format(label.replace("_", " "))] for label in labels]
    label_set = LabelSet("class", labels, prompts, truth)
    return LabelledSet(folder.name, f"{folder}: {len(labels)} class folders, {len(images)} images", images,
                       [label_set])


def _caption_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image name, caption) of a captions file: JSONL objects {"image", "caption"}, or
    TSV lines `image<TAB>caption` (an `image<TAB>caption` header line is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ClipTritonError(f"{FLAG} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows: list[tuple[int, str, str]] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ClipTritonError(f"{FLAG} {path}: line {number} is not JSON ({exc.msg})") from None
            if not (isinstance(item, dict) and isinstance(item.get("image"), str)
                    and isinstance(item.get("caption"), str)):
                raise ClipTritonError(
                    f'{FLAG} {path}: line {number} is not a JSON object with string fields "image" and "caption"'
                )
            image, caption = item["image"], item["caption"]
        else:
            if "\t" not in line:
                raise ClipTritonError(f"{FLAG} {path}: line {number} has no tab (want: image<TAB>caption)")
            image, caption = line.split("\t", 1)
            if not rows and (image.strip().lower(), caption.strip().lower()) == ("image", "caption"):
                continue  # the header
        for what, value in (("image", image), ("caption", caption)):
            if not value.strip():
                raise ClipTritonError(f"{FLAG} {path}: line {number} has an empty {what}")
        rows.append((number, image.strip(), caption.strip()))
    if not rows:
        raise ClipTritonError(f"{FLAG} {path} has no captions")
    return rows


def captions_set(path: Path) -> LabelledSet:
    """A captions file (JSONL or TSV) and the images it names, relative to its folder."""
    if path.suffix.lower() not in (".jsonl", ".tsv"):
        raise ClipTritonError(f"{FLAG} {path}: a captions file must be .jsonl or .tsv")
    rows = _caption_rows(path)
    folder = path.parent.resolve()
    images: list[ImageSample] = []
    image_index: dict[Path, int] = {}
    captions: dict[str, int] = {}
    pairs: dict[tuple[int, int], None] = {}
    for number, name, caption in rows:
        file = (folder / name).resolve()
        if not file.is_relative_to(folder):
            raise ClipTritonError(f"{FLAG} {path}: line {number} names an image outside {folder}: {name}")
        if file not in image_index:
            if not file.is_file():
                raise ClipTritonError(f"{FLAG} {path}: line {number} names {name}, which does not exist")
            _too_many(path, len(images) + 1)
            sample = read_image(file, FLAG)
            image_index[file] = len(images)
            images.append(ImageSample(name, sample.data))
        pairs[(image_index[file], captions.setdefault(caption, len(captions)))] = None
    return LabelledSet(path.parent.name or str(path.parent), f"{path}: {len(images)} images, {len(captions)} captions",
                       images, [], list(captions), list(pairs))
