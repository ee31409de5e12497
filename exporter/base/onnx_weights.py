"""Graph weights kept on disk: the FP16 conversion reads and writes them tensor by tensor.

Why (docs/engines.md, "Memory"): with upb protobuf a `TensorProto.raw_data` lives in its model's
arena until the whole model is freed, so converting weights in place keeps the FP32 and the FP16
bytes at once, and `onnx.load` of an external-data graph keeps a copy of each tensor on the way.
Here the graph is a weight-free skeleton whose initializers point into sidecar files; weights are
read in chunks of WEIGHT_CHUNK_BYTES, converted and appended to the new sidecar. The process holds
the skeleton plus one chunk, whatever the model's size.

We read sidecars ourselves rather than with `onnx.load_external_data_for_model`: that refuses a
file with more than one hard link, and `clip-triton repository` hard-links the export's weights
into the repository (exporter/base/common.py, `link_or_copy`). The same confinement as onnx's loader
applies: a location must be a plain relative path inside the graph's own folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError

WEIGHT_CHUNK_BYTES = 16 << 20  # a multiple of every element size; the clipping makes ~5 copies of a chunk
ALIGN = 4096  # sidecar offsets on page boundaries, so runtimes may map tensors in place
INLINE_MAX_BYTES = 1024  # onnx's own default threshold for moving a tensor out of the graph


def tensor_bytes(init: Any) -> int:
    """An initializer's data size from its dims and type. Not `ByteSize()` or `len(raw_data)`: with
    upb's protobuf both copy the tensor (ByteSize encodes the message)."""
    from onnx import helper

    count = 1
    for dim in init.dims:
        count *= int(dim)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1  # string tensors and other oddities: small in these graphs
    return count * itemsize


@dataclass(frozen=True)
class ExternalWeight:
    """Where one initializer's bytes are: a file, an offset and a length."""

    path: Path
    offset: int
    length: int

    def chunks(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            left = self.length
            while left:
                chunk = f.read(min(WEIGHT_CHUNK_BYTES, left))
                if not chunk:
                    raise ClipTritonError(f"{self.path} is truncated: a tensor ends past its end")
                left -= len(chunk)
                yield chunk


def external_weight(init: Any, base_dir: Path) -> ExternalWeight | None:
    """The file range holding `init`'s data, or None when its data is inside the graph."""
    from onnx import TensorProto

    if init.data_location != TensorProto.EXTERNAL:
        return None
    fields = {entry.key: entry.value for entry in init.external_data}
    location = Path(fields.get("location", ""))
    if not location.parts or location.is_absolute() or ".." in location.parts:
        raise ClipTritonError(
            f"tensor {init.name!r}: external data location {str(location)!r} is not inside the graph's folder"
        )
    path = base_dir / location
    if not path.is_file():
        raise ClipTritonError(f"tensor {init.name!r}: its weights file {path} is missing")
    offset = int(fields.get("offset", 0))
    length = int(fields["length"]) if "length" in fields else path.stat().st_size - offset
    return ExternalWeight(path, offset, length)


def max_abs(init: Any, base_dir: Path) -> float:
    """Largest |value| of a FLOAT initializer, read chunk by chunk when it is external (NaN-aware
    like `np.abs(x).max()`: a NaN anywhere gives NaN)."""
    from onnx import numpy_helper

    where = external_weight(init, base_dir)
    if where is None:
        values = numpy_helper.to_array(init)
        return float(np.abs(values).max()) if values.size else 0.0
    peak = 0.0
    for chunk in where.chunks():
        part = np.frombuffer(chunk, np.float32)
        if part.size:
            top = float(np.abs(part).max())
            if np.isnan(top):
                return top
            peak = max(peak, top)
    return peak


@contextmanager
def weights_outside(src: Path) -> Iterator[Path]:
    """A graph equivalent to `src` whose initializers over INLINE_MAX_BYTES all live in sidecars.

    `src` itself when it is already so (a large export); otherwise a temporary copy beside it
    (so `src`'s own relative sidecar paths still resolve), removed afterwards. The one full parse
    of an inline graph happens here, and its memory is released before anything else is loaded.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    inline = any(
        init.HasField("raw_data") and tensor_bytes(init) > INLINE_MAX_BYTES for init in model.graph.initializer
    )
    if not inline:
        del model
        yield src
        return
    tmp = save_beside(model, src, ".fp32-")
    del model
    try:
        yield tmp
    finally:
        remove_saved(tmp)


def save_beside(model: Any, beside: Path, prefix: str) -> Path:
    """Write `model` to a new temporary graph in `beside`'s folder (so `beside`'s relative sidecar
    paths still resolve), with its own sidecar (`save_with_sidecar`). `remove_saved` deletes both."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".onnx", dir=beside.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        save_with_sidecar(model, tmp)
    except BaseException:
        remove_saved(tmp)
        raise
    return tmp


def save_with_sidecar(model: Any, path: Path) -> None:
    """`path` plus `<name>.data`: the tensors over INLINE_MAX_BYTES that are inside the graph go to
    the sidecar one by one (serialising them with the graph costs ~3.5x their size at once);
    tensors already external stay where they are."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=INLINE_MAX_BYTES)


def remove_saved(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def inline_attribute_tensors(model: Any, base_dir: Path) -> int:
    """Load node-attribute tensors kept in external files (the TorchScript exporter writes even a
    Constant's value to its own file for a >2 GiB graph) back into the graph; returns how many.
    They are small; only initializers stay in sidecars."""
    from onnx import AttributeProto, TensorProto

    def tensors(graph: Any) -> Iterator[Any]:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == AttributeProto.GRAPH:
                    yield from tensors(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from tensors(sub)

    count = 0
    for tensor in tensors(model.graph):
        where = external_weight(tensor, base_dir)
        if where is not None:
            tensor.raw_data = b"".join(where.chunks())
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            count += 1
    return count


def record_sources(model: Any, base_dir: Path) -> dict[str, tuple[ExternalWeight, int]]:
    """Each external initializer's (file range, data type), taken before a converter retypes it."""
    sources = {}
    for init in model.graph.initializer:
        where = external_weight(init, base_dir)
        if where is not None:
            sources[init.name] = (where, int(init.data_type))
    return sources


def write_weights(
    model: Any,
    sources: dict[str, tuple[ExternalWeight, int]],
    sidecar: Path,
    to_float16: Callable[[np.ndarray], np.ndarray],
) -> int:
    """Stream every external initializer of `model` from its source into `sidecar` (new file).

    A tensor the converter retyped FLOAT -> FLOAT16 goes through `to_float16` chunk by chunk (an
    elementwise function, so chunks give the same bytes as the whole tensor); any other is
    copied as is. Each initializer is re-pointed at `sidecar`. Returns the bytes written.
    """
    from onnx import TensorProto

    with sidecar.open("wb") as out:
        for init in model.graph.initializer:
            if init.name not in sources:
                continue
            where, before = sources[init.name]
            out.write(b"\0" * (-out.tell() % ALIGN))
            start = out.tell()
            halve = before == TensorProto.FLOAT and init.data_type == TensorProto.FLOAT16
            for chunk in where.chunks():
                out.write(to_float16(np.frombuffer(chunk, np.float32)).tobytes() if halve else chunk)
            del init.external_data[:]
            for key, value in (("location", sidecar.name), ("offset", str(start)), ("length", str(out.tell() - start))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
        return out.tell()


def length_prefixed(field_number: int, length: int) -> bytes:
    """A protobuf length-delimited field's key and length (wire type 2)."""
    out = bytearray()
    for value in (field_number << 3 | 2, length):
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


def save_inline(model: Any, path: Path, base_dir: Path) -> None:
    """Write `model` as one self-contained .onnx file, its external weights (relative to `base_dir`)
    copied in chunk by chunk.

    `onnx.save_model` on a loaded model serialises it whole: ~4x the weights at once with upb
    (5.3 GiB for SigLIP2's 1.3 GiB FP16 text tower). Protobuf lets a message's fields come in any
    order and a length-delimited field be written as key, length, bytes, so the file is: the model
    without its graph, then the graph without its initializers, then each initializer's metadata
    followed by its raw_data field streamed from disk. Parsers read the same ModelProto.
    """
    import onnx
    from onnx import TensorProto

    pieces: list[tuple[bytes, ExternalWeight | None]] = []  # (serialised head, weight bytes to append)
    for init in model.graph.initializer:
        where = external_weight(init, base_dir)
        meta = TensorProto()
        meta.CopyFrom(init)
        if where is not None:
            del meta.external_data[:]
            meta.data_location = TensorProto.DEFAULT
        encoded = meta.SerializeToString()
        if where is not None:
            encoded += length_prefixed(TENSOR_RAW_DATA, where.length)
        pieces.append((encoded, where))
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.ClearField("graph")
    tensor_sizes = [len(head) + (where.length if where else 0) for head, where in pieces]
    graph_bytes = graph.SerializeToString()
    graph_size = len(graph_bytes) + sum(len(length_prefixed(GRAPH_INITIALIZER, n)) + n for n in tensor_sizes)
    with path.open("wb") as out:
        out.write(shell.SerializeToString())
        out.write(length_prefixed(MODEL_GRAPH, graph_size))
        out.write(graph_bytes)
        for (head, where), size in zip(pieces, tensor_sizes, strict=True):
            out.write(length_prefixed(GRAPH_INITIALIZER, size))
            out.write(head)
            for chunk in where.chunks() if where else ():
                out.write(chunk)


# Protobuf's hard limit is 2 GiB; stay under it with room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000
