"""An export folder checked as a whole before a stage reads it: the one gate of every later stage.

`load_export` = the manifest (load_manifest: known schema_version, every value in range, shapes
consistent with each other; exporter/base/manifest.py `check_manifest`) + every file it names inside the
folder (no absolute path, no `..`, no symlink out of it) + each ONNX graph the stage will read:
a complete ONNX model whose one input and output carry the manifest's names, dtypes and static
dims (FP32 pixels [B,3,H,W], INT32 ids [B,L], FP32 embedding [B,D]), and whose external weights
lie inside the folder too. A problem is one `ClipTritonError` line (exit 2), raised before the
stage writes anything.

Graphs are read without their weights: the protobuf is walked by its wire format through a memory
map, initializers are kept as names and dims only, and the weightless skeleton is parsed by onnx
(every node included) and shape-inferred for the embedding width: never a copy of the weights
(ViT-B-32's 350 MB image graph: 0.03 s and 44 MB, where onnx.load takes 0.5 s and 680 MB).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.base.manifest import ARTIFACTS, TOWERS, Manifest, load_manifest
from clip_triton.exporter.base.onnx_weights import GRAPH_INITIALIZER, MODEL_GRAPH, length_prefixed

# Tensor data under this size stays in the skeleton (shape inference may need a Reshape's target);
# larger data is what the weights are, and is skipped.
_KEEP_DATA_BYTES = 1 << 16
_TENSOR_DATA_FIELDS = {4, 5, 6, 7, 9, 10, 11}  # float/int32/string/int64/raw/double/uint64 _data
_EXTERNAL_DATA, _DATA_LOCATION = 13, 14  # TensorProto fields (GraphProto's and ModelProto's: onnx_weights)


class _Corrupt(Exception):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name, or "type N" for one numpy has no name for
    dims: list[int | None]  # None: dynamic (dim_param or unset)

    def describe(self) -> str:
        dims = ", ".join("B" if i == 0 and d is None else "?" if d is None else str(d) for i, d in enumerate(self.dims))
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass
class GraphInterface:
    inputs: list[TensorInfo]  # graph inputs that are not initializers
    outputs: list[TensorInfo]
    external: dict[str, str] = field(default_factory=dict)  # initializer -> external data location
    embedding_width: dict[str, int | None] = field(default_factory=dict)  # output -> inferred last dim


# ------------------------------------------------------------------ protobuf wire format


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("it ends inside a number (truncated?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("a number runs past 10 bytes")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(field number, wire type, field start, payload start or varint value, payload end, field end)."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, first, value, pos, pos
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            a, b = pos, pos + length
        elif wire in (1, 5):
            a, b = pos, pos + (8 if wire == 1 else 4)
        else:
            raise _Corrupt(f"wire type {wire} (not a protobuf this reader knows)")
        if b > end:
            raise _Corrupt("a field runs past the end (truncated?)")
        pos = b
        yield number, wire, first, a, b, b


def _delimited(number: int, payload: bytes) -> bytes:
    return length_prefixed(number, len(payload)) + payload


def _weightless_tensor(buf: Any, start: int, end: int) -> tuple[bytes, str, str | None]:
    """A TensorProto without its (large) data: (skeleton bytes, name, external data location)."""
    out = bytearray()
    name, location = "", None
    data_bytes = sum(b - a for number, _w, _f, a, b, _e in _fields(buf, start, end) if number in _TENSOR_DATA_FIELDS)
    for number, wire, first, a, b, last in _fields(buf, start, end):
        if number == 8 and wire == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        if number == _EXTERNAL_DATA and wire == 2:
            entry = {n: bytes(buf[x:y]).decode("utf-8", "replace") for n, w, _, x, y, _ in _fields(buf, a, b) if w == 2}
            if entry.get(1) == "location":
                location = entry.get(2, "")
            continue
        if number == _DATA_LOCATION or (number in _TENSOR_DATA_FIELDS and data_bytes > _KEEP_DATA_BYTES):
            continue
        out += buf[first:last]
    return bytes(out), name, location


def _skeleton(buf: Any, size: int) -> tuple[bytes, dict[str, str]]:
    """The model's bytes with every large tensor's data left out, and the external data locations."""
    out = bytearray()
    external: dict[str, str] = {}
    graphs = 0
    for number, wire, first, a, b, last in _fields(buf, 0, size):
        if number != MODEL_GRAPH or wire != 2:
            out += buf[first:last]
            continue
        graphs += 1
        graph = bytearray()
        for g_number, g_wire, g_first, ga, gb, g_last in _fields(buf, a, b):
            if g_number == GRAPH_INITIALIZER and g_wire == 2:
                tensor, name, location = _weightless_tensor(buf, ga, gb)
                if location is not None:
                    external[name] = location
                graph += _delimited(GRAPH_INITIALIZER, tensor)
            else:
                graph += buf[g_first:g_last]
        out += _delimited(MODEL_GRAPH, bytes(graph))
    if graphs != 1:
        raise _Corrupt("no graph in it" if not graphs else "several graphs in it")
    return bytes(out), external


# ------------------------------------------------------------------ graphs


def _dtype(elem_type: int) -> str:
    from onnx import helper

    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return f"type {elem_type}"


def _info(value: Any) -> TensorInfo:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    return TensorInfo(value.name, _dtype(tensor.elem_type), dims)


def read_graph(path: Path) -> GraphInterface:
    """The interface of the ONNX graph at `path`, read without its weights; ClipTritonError if it is not one."""
    import onnx

    try:
        with open(path, "rb") as handle:
            size = Path(path).stat().st_size
            if size == 0:
                raise _Corrupt("the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                skeleton, external = _skeleton(buf, size)
        model = onnx.ModelProto.FromString(skeleton)
    except _Corrupt as exc:
        raise ClipTritonError(f"{path} is not an ONNX graph ({exc}): re-run `clip-triton export`") from None
    except OSError as exc:
        raise ClipTritonError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ClipTritonError(
            f"{path} is not an ONNX graph ({type(exc).__name__}: {str(exc).strip()[:120]}): re-run `clip-triton export`"
        ) from None
    if model.ir_version < 3 or not model.opset_import or not model.graph.node:
        raise ClipTritonError(
            f"{path} is not a complete ONNX graph (no IR version, opset or nodes: truncated?): "
            "re-run `clip-triton export`"
        )
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_info(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_info(v) for v in model.graph.output]
    return GraphInterface(inputs, outputs, external, _inferred_widths(model))


def _inferred_widths(model: Any) -> dict[str, int | None]:
    """Each output's last dim as ONNX shape inference finds it on the weightless graph (None: unknown)."""
    import onnx

    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")  # declared dims may be symbolic: infer them
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - an op the inference cannot follow: the width stays unchecked
        return {}
    widths: dict[str, int | None] = {}
    for value in inferred.graph.output:
        dims = value.type.tensor_type.shape.dim
        widths[value.name] = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    return widths


# ------------------------------------------------------------------ files and the whole export


def export_file(export_dir: Path, name: Any, what: str) -> Path:
    """`export_dir / name`, refused unless it stays inside the export folder (symlinks resolved)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ClipTritonError(f"{what} {name!r} is not a file name inside the export folder")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ClipTritonError(f"{what} {name!r} must be a file inside the export folder (no absolute path, no '..')")
    path = Path(export_dir) / relative
    if path.exists() or path.is_symlink():
        root, real = Path(export_dir).resolve(), path.resolve()
        if root != real and root not in real.parents:
            raise ClipTritonError(f"{what} {name} resolves to {real}, outside the export folder {root}")
    return path


def named_files(manifest: Manifest) -> Iterable[tuple[str, str]]:
    """(what, name) of every file the manifest says is in the export folder."""
    for tower in TOWERS:
        yield f"the manifest's {tower}.file", manifest.tower(tower).file
    if manifest.tokenizer.hf_file is not None:
        yield "the manifest's tokenizer.hf_file", manifest.tokenizer.hf_file
    for key in ARTIFACTS:
        for tower, name in manifest.artifacts(*key).items():
            yield f"the {tower} {key[1]} {key[0]} file", name
    for section in ("files", "fp16", "engines"):
        data = getattr(manifest, section) or {}
        records = data if section == "files" else data.get("files") or {}
        if not isinstance(records, dict):
            raise ClipTritonError(f"the manifest's {section} files must be an object")
        for name in records:
            yield f"the manifest's {section} file", name


def check_graph(path: Path, manifest: Manifest, tower: str) -> GraphInterface:
    """The graph at `path` is `tower`'s, as the manifest describes it; ClipTritonError otherwise."""
    graph = read_graph(path)
    spec = manifest.tower(tower)
    want_in = TensorInfo(spec.input.name, spec.input.dtype, [None if d < 0 else d for d in spec.input.shape])
    want_out = TensorInfo(spec.output.name, spec.output.dtype, [None, manifest.embed_dim])
    name = path.name
    if len(graph.inputs) != 1 or not _fits(graph.inputs[0], want_in):
        got = ", ".join(t.describe() for t in graph.inputs) or "none"
        other = "text" if tower == "image" else "image"
        looks = ""
        if len(graph.inputs) == 1 and graph.inputs[0].dtype == manifest.tower(other).input.dtype:
            looks = f" (it looks like the {other} graph)"
        raise ClipTritonError(
            f"{name} is not the {tower} graph the manifest describes{looks}: its input is {got}, "
            f"the manifest's {tower} tower takes {want_in.describe()}"
        )
    outputs = {t.name: t for t in graph.outputs}
    out = outputs.get(want_out.name)
    if out is None or not _fits(out, want_out):
        got = ", ".join(t.describe() for t in graph.outputs) or "none"
        raise ClipTritonError(
            f"{name}'s outputs are {got}; the manifest's {tower} tower gives {want_out.describe()}"
        )
    width = graph.embedding_width.get(out.name)
    if width is not None and width != manifest.embed_dim:
        raise ClipTritonError(
            f"{name} gives {width}-d embeddings, but the manifest's embed_dim is {manifest.embed_dim}"
        )
    for tensor, location in sorted(graph.external.items()):
        # Relative to the graph's own folder, which is inside the export folder (export_file).
        export_file(path.parent, location, f"{name}'s external data for {tensor}")
    return graph


def _fits(got: TensorInfo, want: TensorInfo) -> bool:
    """Same name, dtype and rank; a dynamic batch; every other static dim as wanted."""
    if got.name != want.name or got.dtype != want.dtype or len(got.dims) != len(want.dims):
        return False
    if got.dims and got.dims[0] is not None:  # a fixed batch cannot take Triton's batches
        return False
    return all(g is None or w is None or g == w for g, w in zip(got.dims[1:], want.dims[1:], strict=True))


def check_export(export_dir: Path, manifest: Manifest, graphs: Iterable[tuple[str, str]] = ()) -> None:
    """Every named file inside the folder; each ONNX artifact of `graphs` (format, precision) that
    exists checked against the manifest. A missing one is left to the stage (it names the step to run)."""
    export_dir = Path(export_dir)
    for what, name in named_files(manifest):
        export_file(export_dir, name, what)
    for fmt, precision in graphs:
        if fmt != "onnx":
            continue  # TensorRT plans are opaque here: the engines stage checked them on its GPU
        for tower, name in manifest.artifacts(fmt, precision).items():
            path = export_file(export_dir, name, f"the {tower} {precision} graph")
            if path.is_file():
                check_graph(path, manifest, tower)


def load_export(export_dir: Path, graphs: Iterable[tuple[str, str]] = (("onnx", "fp32"),)) -> Manifest:
    """The export folder's manifest, checked with the graphs a stage reads (check_export)."""
    manifest = load_manifest(export_dir)
    check_export(export_dir, manifest, graphs)
    return manifest
