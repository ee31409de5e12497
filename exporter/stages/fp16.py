"""The fp16 stage: FP32 ONNX graphs -> FP16 graphs with an explicit keep-in-FP32 policy.

Precision is decided here, in the graph, so it is testable on CPU with ONNX Runtime and
TensorRT builds the same graph strongly typed (TensorRT 11 has no other FP16 path).

The conversion itself is onnxruntime's maintained `convert_float_to_float16`; this module adds
what it lacks for CLIP towers:
- the policy as data (`Fp16Policy`): op types kept in FP32 (LayerNorm in both its fused and its
  decomposed ReduceMean/Pow/Sqrt/Div form, Softmax, the final L2 normalisation), and a range
  check: tensors whose calibrated magnitude would come near FP16's 65504 keep their producer
  and consumers in FP32;
- consecutive FP32 nodes stay FP32 (the converter casts every blocked node's output back to
  FP16, so `Pow(x, 2) -> ReduceMean` would still overflow in between); the FP32 output keeps the
  exact unit norm of the FP32 normalisation;
- a topological sort (the converter appends its Casts at the end of the node list), an
  `onnx.checker` full check, and parity against PyTorch FP32 before anything is written.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import (
    ClipTritonError,
    ParityError,
    Progress,
    check_min_cosine,
    check_number,
    release_memory,
)
from clip_triton.exporter.base.export_inputs import load_export
from clip_triton.exporter.base.manifest import ARTIFACTS, TOWERS, Manifest, file_record
from clip_triton.exporter.base.onnx_weights import (
    EXTERNAL_DATA_BYTES,
    max_abs,
    record_sources,
    remove_saved,
    save_beside,
    save_inline,
    tensor_bytes,
    weights_outside,
    write_weights,
)
from clip_triton.exporter.parity.gate import (
    VERIFY_BATCHES,
    References,
    compare_references,
    gate_towers,
    torch_references,
)
from clip_triton.exporter.parity.metrics import top1
from clip_triton.exporter.parity.samples import sample_inputs
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from clip_triton.exporter.sources import release_model, tower_modules

FP16_MIN_COSINE = 0.999
FP16_MAX = 65504.0
CALIBRATION_BATCH = 4
CALIBRATION_SEED = 1  # not the parity samples' seed: the range check must not be tuned to them
# The range calibration's activation budget (docs/engines.md, "Memory"). The calibration graph
# reduces every intermediate to its max |value| inside ONNX Runtime, so a run holds what one
# inference holds; the budget decides how many calibration rows go into one run. Lower it with
# $CLIP_TRITON_CALIBRATION_BYTES (bytes, or with a K/M/G suffix) for very large images.
CALIBRATION_BYTES_ENV = "CLIP_TRITON_CALIBRATION_BYTES"
DEFAULT_CALIBRATION_BYTES = 1 << 30
# A run holds a few tensors as large as the largest intermediate at once (a matmul's operands and
# result, the reduction's temporaries): the budget is divided by this many times its size.
LIVE_TENSORS = 6
# Initializers up to this size keep their values in the weight-free copy that shape inference
# sees (shape constants, Reshape targets); larger ones become typed graph inputs.
SKELETON_KEEP_BYTES = 1 << 16

# Op types computed in FP32 by default, and why.
DEFAULT_KEEP_FP32: dict[str, str] = {
    "LayerNormalization": "LayerNorm (opset 17+): its variance squares pre-norm activations",
    "ReduceMean": "decomposed LayerNorm: mean and variance",
    "Pow": "decomposed LayerNorm variance (x^2); tanh-GELU's x^3 overflows past |x| ~ 40",
    "Sqrt": "decomposed LayerNorm std; attention scale",
    "Div": "decomposed LayerNorm normalisation; the final L2 normalisation",
    "Reciprocal": "decomposed LayerNorm (some exporters use 1/std)",
    "Softmax": "attention probabilities (sum of exponentials)",
    "ReduceL2": "final L2 normalisation",
    "ReduceSumSquare": "final L2 normalisation (other exporters)",
    "Clip": "final L2 normalisation's epsilon (1e-12 is zero in FP16)",
}


@dataclass
class Fp16Policy:
    """Which parts of the graph stay FP32. Recorded verbatim in the manifest's `fp16` section."""

    keep_fp32_ops: list[str] = field(default_factory=lambda: sorted(DEFAULT_KEEP_FP32))
    # Nodes from the final ReduceL2/Div back to the projection output stay FP32: exact unit norm.
    keep_final_normalisation: bool = True
    # Calibrated |max| above this keeps a tensor's producer and consumers in FP32. A quarter of
    # FP16's range: the calibration samples do not show every input's worst case.
    overflow_threshold: float | None = FP16_MAX / 4
    keep_io_types: bool = True  # FP32 inputs and outputs: clients and configs do not change

    @classmethod
    def default(cls, extra_ops: list[str] | None = None) -> Fp16Policy:
        policy = cls()
        policy.keep_fp32_ops = sorted(set(policy.keep_fp32_ops) | set(extra_ops or []))
        return policy

    @classmethod
    def none(cls, extra_ops: list[str] | None = None) -> Fp16Policy:
        """No protection at all (only the op types given): the demonstration of what breaks."""
        return cls(
            keep_fp32_ops=sorted(set(extra_ops or [])),
            keep_final_normalisation=False,
            overflow_threshold=None,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = {op: DEFAULT_KEEP_FP32.get(op, "added by the user") for op in self.keep_fp32_ops}
        return data


def parse_op_list(text: str | None) -> list[str]:
    """'Erf,Gelu' -> ['Erf', 'Gelu'], checked against ONNX's operator names."""
    if not text:
        return []
    import onnx.defs

    ops = [op.strip() for op in text.split(",") if op.strip()]
    known = {schema.name for schema in onnx.defs.get_all_schemas()}
    unknown = [op for op in ops if op not in known]
    if unknown:
        import difflib

        hints = [f"{op} (did you mean {', '.join(difflib.get_close_matches(op, known, n=2))}?)" for op in unknown]
        raise ClipTritonError(f"--keep-fp32: not ONNX op types: {'; '.join(hints)}")
    return ops


# ---------------------------------------------------------------- graph helpers


def _name_nodes(graph: Any) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_clip_triton_{index}"
        seen.add(node.name)


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output if out}


def final_normalisation_nodes(graph: Any) -> set[str]:
    """Names of the nodes on every path from the final division's numerator to its output.

    `F.normalize(x)` exports as Div(x, Expand(Clip(ReduceL2(x)))): keeping these FP32 (with x
    cast up once) gives an exactly unit-length FP32 output.
    """
    producers = _producers(graph)
    names: set[str] = set()
    for output in graph.output:
        last = producers.get(output.name)
        while last is not None and last.op_type in ("Identity", "Cast"):
            last = producers.get(last.input[0])
        if last is None or last.op_type not in ("Div", "Mul") or not last.input:
            continue
        source = last.input[0]
        # Ancestors of the division that descend from its numerator.
        stack, ancestors = [last], set()
        while stack:
            node = stack.pop()
            if node.name in ancestors:
                continue
            ancestors.add(node.name)
            stack.extend(producers[i] for i in node.input if i in producers and i != source)
        users = _consumers(graph)
        descend, queue = set(), deque(users.get(source, []))
        while queue:
            node = queue.popleft()
            if node.name in descend:
                continue
            descend.add(node.name)
            for out in node.output:
                queue.extend(users.get(out, []))
        names |= (ancestors & descend) | {last.name}
    return names


def _float_value_infos(model: Any) -> list[Any]:
    from onnx import TensorProto

    outputs = {o.name for o in model.graph.output}
    return [
        vi
        for vi in model.graph.value_info
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in outputs
    ]


def calibration_bytes(value: int | str | None = None) -> int:
    """The calibration budget in bytes: `value`, else $CLIP_TRITON_CALIBRATION_BYTES, else 1 GiB.

    Strings may end in K, M or G (powers of 1024): '512M'."""
    raw: int | str | None = value if value is not None else os.environ.get(CALIBRATION_BYTES_ENV)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_CALIBRATION_BYTES
    if isinstance(raw, int):
        number = raw
    else:
        text = raw.strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            number = int(float(text[:-1] if scale > 1 else text) * scale)
        except (ValueError, OverflowError):  # OverflowError: inf
            source = "--calibration-bytes" if value is not None else CALIBRATION_BYTES_ENV
            raise ClipTritonError(
                f"{source}={raw!r}: not a byte count (e.g. 536870912 or 512M)"
            ) from None
    if number < 1:
        raise ClipTritonError(f"calibration budget must be positive, got {raw!r}")
    return number


def _is_weight(init: Any) -> bool:
    from onnx import TensorProto

    return init.data_location == TensorProto.EXTERNAL or tensor_bytes(init) > SKELETON_KEEP_BYTES


def infer_shapes_lean(model: Any) -> Any:
    """`onnx.shape_inference.infer_shapes` on a weight-free copy of `model`; returns that copy.

    `infer_shapes(model)` serialises the whole model, weights included, and parses the result back:
    two to three extra copies of the weights at once. Shapes never depend on a weight's values, so
    the copy keeps only small initializers (the shape constants) and declares the others as typed
    graph inputs. The result's value_info is what inference on the full model gives (tested).
    """
    import onnx
    from onnx import helper

    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if not _is_weight(init):
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return onnx.shape_inference.infer_shapes(skeleton)


def apply_shapes(model: Any, inferred: Any) -> None:
    """Copy `infer_shapes_lean`'s value_info and interface types into `model` (in place)."""
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for index, output in enumerate(model.graph.output):
        output.CopyFrom(inferred.graph.output[index])
    for index, graph_input in enumerate(model.graph.input):
        graph_input.CopyFrom(inferred.graph.input[index])


_ABSMAX = "clip_triton_absmax/"
_SIZE = "clip_triton_size/"


def _add_range_outputs(model: Any, names: list[str]) -> None:
    """For each tensor in `names`, append max |finite value| and its element count as graph outputs.

    The reduction runs inside ONNX Runtime right after the tensor's producer (the nodes are placed
    there), so a tensor is freed as soon as its own consumers ran: one run holds what one
    inference holds, instead of every intermediate fetched to Python. Non-finite values count as
    0, as `np.abs(x[np.isfinite(x)]).max()` did: |x| < inf is false for inf and NaN.
    """
    from onnx import TensorProto, helper, numpy_helper

    wanted = {name: index for index, name in enumerate(names)}
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(np.array(np.inf, np.float32), "clip_triton_inf"),
        numpy_helper.from_array(np.array(0.0, np.float32), "clip_triton_zero"),
    ])
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            if out not in wanted:
                continue
            i = wanted[out]
            tag = f"clip_triton_range_{i}"
            nodes += [
                helper.make_node("Abs", [out], [f"{tag}/abs"], name=f"{tag}/abs"),
                helper.make_node("Less", [f"{tag}/abs", "clip_triton_inf"], [f"{tag}/finite"], name=f"{tag}/less"),
                helper.make_node("Where", [f"{tag}/finite", f"{tag}/abs", "clip_triton_zero"], [f"{tag}/kept"],
                                 name=f"{tag}/where"),
                helper.make_node("ReduceMax", [f"{tag}/kept"], [f"{_ABSMAX}{i}"], name=f"{tag}/max", keepdims=0),
                helper.make_node("Size", [out], [f"{_SIZE}{i}"], name=f"{tag}/size"),
            ]
            graph.output.extend([
                helper.make_tensor_value_info(f"{_ABSMAX}{i}", TensorProto.FLOAT, []),
                helper.make_tensor_value_info(f"{_SIZE}{i}", TensorProto.INT64, []),
            ])
    del graph.node[:]
    graph.node.extend(nodes)


def tensor_ranges(
    model_path: Path,
    feeds: dict[str, np.ndarray],
    budget_bytes: int | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Max |value| of every float intermediate tensor of an FP32 graph on `feeds` (ONNX Runtime CPU).

    Streaming (docs/engines.md, "Memory"): the graph computes each tensor's max |value| itself, so
    only scalars come back. The first run takes one calibration row and also reports every
    tensor's size; the other rows go in runs of as many as `budget_bytes` allows (LIVE_TENSORS
    times the largest intermediate per row). The max over runs is the max over the whole batch.
    `stats`, when given, receives the runs' row counts and the largest intermediate's bytes.
    """
    import onnx

    budget = calibration_bytes(budget_bytes)
    model = onnx.load(str(model_path), load_external_data=False)
    inferred = infer_shapes_lean(model)
    names = [vi.name for vi in _float_value_infos(inferred)]
    del inferred
    _add_range_outputs(model, names)
    tmp = save_beside(model, model_path, ".calibrate-")
    del model  # the session reads the file: never the Python copy and ORT's at once
    try:
        release_memory()
        session = ort_session(tmp, optimize=False, priority_order=True)
        outputs = [f"{_ABSMAX}{i}" for i in range(len(names))] + [f"{_SIZE}{i}" for i in range(len(names))]
        rows = len(next(iter(feeds.values())))
        ranges: dict[str, float] = {}
        runs: list[int] = []
        largest = 0
        start = 0
        while start < rows:
            step = 1 if not runs else max(1, min(rows - start, budget // max(1, LIVE_TENSORS * largest)))
            part = {name: value[start : start + step] for name, value in feeds.items()}
            values = session.run(outputs, part)
            peaks, sizes = values[: len(names)], values[len(names) :]
            if not runs:  # one row: each tensor's size per row (an upper bound for batch-free ones)
                largest = 4 * max((int(n) for n in sizes), default=0)
            for name, peak, size in zip(names, peaks, sizes, strict=True):
                if int(size) == 0:
                    continue  # an empty tensor has no range
                ranges[name] = max(ranges.get(name, 0.0), float(peak))
            runs.append(step)
            start += step
        del session
        if stats is not None:
            stats.update(runs=runs, largest_tensor_bytes_per_row=largest, budget_bytes=budget)
        return ranges
    finally:
        remove_saved(tmp)
        release_memory()


def overflow_nodes(
    graph: Any, ranges: dict[str, float], threshold: float, base_dir: Path
) -> tuple[set[str], list[str]]:
    """Nodes that produce or read a tensor (or an initializer) beyond `threshold`. `base_dir`: the
    folder external initializers' locations are relative to (they are read chunk by chunk)."""
    producers, users = _producers(graph), _consumers(graph)
    big = {name for name, peak in ranges.items() if peak > threshold}
    for init in graph.initializer:
        if init.data_type == 1 and init.name in users:  # FLOAT
            if max_abs(init, base_dir) > FP16_MAX:
                big.add(init.name)
    nodes: set[str] = set()
    for name in big:
        if name in producers:
            nodes.add(producers[name].name)
        nodes.update(node.name for node in users.get(name, []))
    return nodes, sorted(big)


def _fold_cast_pairs(graph: Any, fp32_tensors: set[str]) -> int:
    """Cast(fp32->fp16) then Cast(fp16->fp32): read the FP32 tensor directly (lossless, no overflow)."""
    from onnx import TensorProto, helper

    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}
    identities = []
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT:
            continue
        first = producers.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != TensorProto.FLOAT16:
            continue
        if first.input[0] not in fp32_tensors:
            continue
        if node.output[0] in outputs:
            identities.append((node, first.input[0]))
        else:
            replace[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    for node, source in identities:
        node.CopyFrom(helper.make_node("Identity", [source], [node.output[0]], name=node.name))
    _remove_dead_nodes(graph)
    return len(replace) + len(identities)


def _cast_to(node: Any) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "to"), -1)


def _remove_dead_nodes(graph: Any) -> None:
    """Drop nodes no graph output depends on (walks producers, so node order does not matter)."""
    nodes = list(graph.node)
    producer_index = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    live: set[int] = set()
    stack = [producer_index[o.name] for o in graph.output if o.name in producer_index]
    while stack:
        index = stack.pop()
        if index in live:
            continue
        live.add(index)
        stack.extend(producer_index[i] for i in nodes[index].input if i in producer_index)
    keep = [node for index, node in enumerate(nodes) if index in live]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for node in graph.node for i in node.input}
    inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _topological_sort(graph: Any) -> None:
    """The converter appends its Casts last; ONNX requires producers before consumers."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    waiting: dict[str, list[int]] = defaultdict(list)
    missing = []
    for index, node in enumerate(pending):
        need = {i for i in node.input if i not in available}
        missing.append(need)
        for name in need:
            waiting[name].append(index)
    ready = deque(i for i, need in enumerate(missing) if not need)
    while ready:
        index = ready.popleft()
        node = pending[index]
        ordered.append(node)
        for out in node.output:
            for other in waiting.pop(out, []):
                missing[other].discard(out)
                if not missing[other]:
                    ready.append(other)
    if len(ordered) != len(pending):
        raise ClipTritonError("FP16 conversion produced a graph with a cycle or a dangling input")
    del graph.node[:]
    graph.node.extend(ordered)


@contextmanager
def _converter_on_skeletons() -> Iterator[Any]:
    """Let onnxruntime's converter work on a graph whose weights are not loaded; yields its own
    FP32 -> FP16 function (clipping to FP16's range), for `write_weights` to apply to the weights.

    The converter retypes an unloaded (external) initializer and leaves its bytes alone; the one
    place it reads weight values is a value_info it builds from `numpy_helper.to_array(t).shape`,
    which is the tensor's dims.
    """
    from onnx import helper
    from onnxruntime.transformers import float16 as converter

    original = converter.make_value_info_from_tensor

    def from_dims(tensor: Any) -> Any:
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    converter.make_value_info_from_tensor = from_dims
    try:
        yield converter.convert_np_to_float16
    finally:
        converter.make_value_info_from_tensor = original


def _weight_bytes(model: Any) -> int:
    return sum(tensor_bytes(init) for init in model.graph.initializer)


def convert_graph(
    src: Path,
    dest: Path,
    policy: Fp16Policy,
    feeds: dict[str, np.ndarray] | None = None,
    budget_bytes: int | None = None,
) -> dict[str, Any]:
    """FP32 graph at `src` -> FP16 graph at `dest` under `policy`; returns what was kept in FP32.

    Memory (docs/engines.md, "Memory"): the graph is handled as a weight-free skeleton whose
    initializers point into sidecar files (exporter/base/onnx_weights.py). Calibration, shape inference
    and the converter see only the skeleton (the converter retypes a weight it cannot see); the
    weights are then streamed from the FP32 sidecar into the FP16 one, one chunk at a time, with
    the converter's own clipping. Only a graph small enough to be saved inline is loaded whole.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    calibration: dict[str, Any] = {}
    ranges: dict[str, float] = {}
    with weights_outside(src) as skeleton_path:
        base_dir = skeleton_path.parent
        if feeds is not None:
            ranges = tensor_ranges(skeleton_path, feeds, budget_bytes, calibration)
        model = onnx.load(str(skeleton_path), load_external_data=False)
        apply_shapes(model, infer_shapes_lean(model))
        _name_nodes(model.graph)
        keep_nodes: set[str] = set()
        if policy.keep_final_normalisation:
            keep_nodes |= final_normalisation_nodes(model.graph)
        overflow: list[str] = []
        overflow_kept: set[str] = set()
        if policy.overflow_threshold is not None and ranges:
            overflow_kept, overflow = overflow_nodes(model.graph, ranges, policy.overflow_threshold, base_dir)
            keep_nodes |= overflow_kept
        blocked_ops = set(policy.keep_fp32_ops)
        # Tensors the FP16 graph computes in FP16 although their FP32 values exceed FP16's range: they
        # become inf on a GPU (TensorRT). ONNX Runtime's CPU provider hides this (it runs ops without
        # FP16 kernels in FP32), so the range check, not CPU parity alone, decides.
        in_fp16 = [
            node
            for node in model.graph.node
            if node.op_type not in blocked_ops and node.name not in keep_nodes and node.op_type != "Cast"
        ]
        range_violations = sorted(
            out for node in in_fp16 for out in node.output if ranges.get(out, 0.0) > FP16_MAX
        )
        # A fused LayerNormalization left in FP16 squares its input inside the kernel (the variance):
        # no graph tensor shows it, so judge the square. We cannot see the kernel's accumulator type,
        # and TensorRT's own overflow warnings for FP16 LayerNorm say to assume the worst.
        range_violations += sorted(
            f"{node.input[0]}^2 (inside {node.name})"
            for node in in_fp16
            if node.op_type == "LayerNormalization" and ranges.get(node.input[0], 0.0) ** 2 > FP16_MAX
        )
        sources = record_sources(model, base_dir)
        with _converter_on_skeletons() as to_float16:
            converted = convert_float_to_float16(
                model,
                keep_io_types=policy.keep_io_types,
                disable_shape_infer=True,
                op_block_list=sorted(blocked_ops),
                node_block_list=sorted(keep_nodes),
            )
            graph = converted.graph
            fp32_nodes = [n for n in graph.node if n.op_type in blocked_ops or n.name in keep_nodes]
            fp32_tensors = {out for n in fp32_nodes for out in n.output}
            fp32_tensors |= {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
            folded = _fold_cast_pairs(graph, fp32_tensors)
            _topological_sort(graph)
            foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
            if foreign:
                raise ClipTritonError(f"FP16 graph {dest.name} uses non-standard ops TensorRT lacks: {foreign}")
            sidecar = dest.with_name(dest.name + ".data")
            write_weights(converted, sources, sidecar, to_float16)
    large = _weight_bytes(converted) >= EXTERNAL_DATA_BYTES
    onnx.save_model(converted, str(dest))  # the skeleton: its initializers already point at `sidecar`
    # By path, on the skeleton: full_check runs strict shape/type inference without loading weights.
    onnx.checker.check_model(str(dest), full_check=True)
    if not large:  # small enough for one file: the same graph with the weights streamed into it
        save_inline(converted, dest, dest.parent)
        sidecar.unlink()
    ops = [n.op_type for n in graph.node]
    del graph, converted, model
    release_memory()
    return {
        "nodes": len(ops),
        "nodes_fp32_by_policy": len(fp32_nodes),
        "kept_fp32_ops": sorted({n.op_type for n in fp32_nodes}),
        "overflow_tensors": overflow[:50],
        "overflow_tensor_count": len(overflow),
        "overflow_nodes": len(overflow_kept),
        "fp16_range_violations": range_violations[:50],
        "fp16_range_violation_count": len(range_violations),
        "peak_abs_activation": max(ranges.values(), default=0.0),
        "casts": ops.count("Cast"),
        "folded_cast_pairs": folded,
        "external_data": large,
        "calibration_runs": calibration.get("runs", []),
    }


# ---------------------------------------------------------------- the stage


def _zero_shot_agreement(ref: dict[str, np.ndarray], fp16: dict[str, np.ndarray]) -> float:
    """Share of images whose best-matching caption (top-1) is the same in FP16 as in FP32."""
    return float(np.mean(top1(ref["image"], ref["text"]) == top1(fp16["image"], fp16["text"])))


def make_fp16(
    export_dir: Path,
    *,
    policy: Fp16Policy | None = None,
    min_cosine: float = FP16_MIN_COSINE,
    progress: Progress | None = None,
    calibration_budget: int | str | None = None,
) -> Manifest:
    """Convert both towers, check parity vs PyTorch FP32, then (only then) write files + manifest.

    `calibration_budget`: bytes for the range calibration's activations (`calibration_bytes`;
    default $CLIP_TRITON_CALIBRATION_BYTES or 1 GiB)."""
    from clip_triton.exporter.sources import load_reference

    progress = progress or Progress("fp16", quiet=True)
    policy = policy or Fp16Policy.default()
    export_dir = Path(export_dir)
    check_min_cosine("--min-cosine", min_cosine)
    check_number("--overflow-threshold", policy.overflow_threshold, 0, above=True)  # NaN and inf refused too
    manifest = load_export(export_dir, [("onnx", "fp32")])  # the FP32 graphs, checked before any work
    for tower in TOWERS:
        if not (export_dir / manifest.tower(tower).file).exists():
            raise ClipTritonError(f"{export_dir / manifest.tower(tower).file} is missing; re-run export")
    if not os.access(export_dir, os.W_OK):
        raise ClipTritonError(f"cannot write to {export_dir}: not writable")

    budget = calibration_bytes(calibration_budget)  # a bad $CLIP_TRITON_CALIBRATION_BYTES fails first
    # Memory (docs/engines.md, "Memory"): the PyTorch reference embeddings are computed first and
    # the model is released before any ONNX graph is loaded; then one tower at a time, and within
    # a tower one of {calibration session, graph being converted, FP16 session} at a time.
    with progress.step(f"rebuilding the PyTorch reference {manifest.model_name}"):
        loaded = load_reference(manifest, export_dir=export_dir)
    references: dict[str, References] = {}
    # The range check's inputs: always, it is the one CPU-side signal of GPU FP16 overflow.
    calibration: dict[str, np.ndarray] = {}
    with progress.step("PyTorch FP32 reference embeddings (then the model is released)"):
        modules = tower_modules(loaded)
        for tower in TOWERS:
            references[tower] = torch_references(modules[tower], loaded, tower)
            calib = sample_inputs(loaded, tower, CALIBRATION_BATCH)
            if tower == "image":
                calib = calib * np.float32(1.5)  # a little beyond the samples' range
            calibration[tower] = calib
        del modules
        release_model(loaded)
    stage = Path(tempfile.mkdtemp(prefix=".fp16.tmp-", dir=export_dir))
    try:
        seconds: dict[str, float] = {}
        outputs: dict[str, dict[int, np.ndarray]] = {}

        def check(tower: str) -> dict[str, Any]:
            spec = manifest.tower(tower)
            src = export_dir / spec.file
            dest = stage / ARTIFACTS[("onnx", "fp16")][tower]
            start = time.perf_counter()
            with progress.step(f"{tower} tower: {spec.file} -> {dest.name}"):
                feeds = {spec.input.name: calibration[tower].astype(spec.input.dtype)}
                info = convert_graph(src, dest, policy, feeds, budget)
                release_memory()
            seconds[f"{tower}_convert"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            with progress.step(f"{tower} tower: ONNX Runtime FP16 (CPU, optimiser off) vs PyTorch FP32"):
                session = ort_session(dest, optimize=False)
                outputs[tower] = {}
                record = compare_references(
                    references[tower], functools.partial(ort_embed, session), finite=True, outputs=outputs[tower]
                )
                del session
                release_memory()
            seconds[f"{tower}_parity"] = round(time.perf_counter() - start, 2)
            return {**record, "graph": info}

        def describe(record: dict[str, Any]) -> str:
            info = record["graph"]
            return (
                f"{info['nodes_fp32_by_policy']} of {info['nodes']} nodes FP32 by policy, "
                f"{info['overflow_tensor_count']} tensors beyond the FP16 range threshold, "
                f"{info['fp16_range_violation_count']} FP16 tensors overflowing"
            )

        towers = gate_towers(
            check,
            stage="FP16",
            threshold=min_cosine,
            compared_with="ONNX Runtime FP16 vs PyTorch FP32",
            progress=progress,
            refused="no FP16 files written; keep more ops in FP32 with --keep-fp32 OP,...",
            describe=describe,
        )
        over = {t: towers[t]["graph"]["fp16_range_violations"] for t in TOWERS}
        if any(over.values()):
            detail = ", ".join(
                f"{t} tower {towers[t]['graph']['fp16_range_violation_count']} (e.g. {names[0]})"
                for t, names in over.items()
                if names
            )
            raise ParityError(
                f"FP16 range check failed: tensors computed in FP16 exceed {FP16_MAX:.0f} on the calibration "
                f"inputs: {detail}; they become inf on a GPU (ONNX Runtime CPU hides it); no FP16 files "
                "written; keep their ops in FP32 with --keep-fp32 OP,..."
            )
        largest = max(VERIFY_BATCHES)  # zero-shot agreement on the largest batch's embeddings
        agreement = _zero_shot_agreement(
            {t: references[t][largest][1] for t in TOWERS}, {t: outputs[t][largest] for t in TOWERS}
        )
        import onnxruntime

        # All checks passed: move the files in (data sidecars first, each an atomic rename).
        files = sorted(stage.iterdir(), key=lambda p: p.suffix == ".onnx")
        for item in files:
            os.replace(item, export_dir / item.name)
        for tower in TOWERS:  # a sidecar from an earlier (larger) conversion would be stale
            stale = export_dir / (ARTIFACTS[("onnx", "fp16")][tower] + ".data")
            if stale.exists() and stale.name not in {f.name for f in files}:
                stale.unlink()
        manifest.fp16 = {
            "converter": f"onnxruntime.transformers.float16 (onnxruntime {onnxruntime.__version__})",
            "policy": policy.to_dict(),
            "threshold": min_cosine,
            "compared_with": "PyTorch FP32; ONNX Runtime CPU, graph optimisation disabled",
            "zero_shot_top1_agreement": agreement,
            "seconds": seconds,
            "files": {item.name: file_record(export_dir / item.name) for item in files},
            **towers,
        }
        manifest.save(export_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
