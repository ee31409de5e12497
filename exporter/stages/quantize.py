"""The quantize stage: FP32 ONNX graphs -> INT8 Q/DQ graphs, calibrated, policed and gated (docs/int8.md).

One graph for two targets: ONNX Runtime's CPU provider fuses its QuantizeLinear/DequantizeLinear pairs
into integer kernels (VNNI/AMX), and TensorRT builds the same graph with explicit precision (Q/DQ
placement decides what runs in INT8). So every Q/DQ pair is what TensorRT takes: signed INT8, zero point
0 (symmetric), weights per output channel; biases stay FP32.

The quantizer is Intel NNCF's post-training quantization (`nncf.quantize` on the ONNX model,
ModelType.TRANSFORMER: SmoothQuant on the MatMuls, min-max activation ranges, fast bias correction),
chosen over ONNX Runtime's `quantize_static` on measured accuracy and speed (docs/int8.md, the table);
`--quantizer onnxruntime` keeps the other for comparison. What this module adds:
- the policy as data (`Int8Policy`, recorded in the manifest's `int8` section): op types left
  unquantized (LayerNorm, Softmax, ...), the first weighted layer of the image tower (patch embedding /
  stem convolution) and the final projection of each tower in FP32;
- static calibration on real inputs: the built-in sample images and captions, the shapes train split
  (never the held-out split the gate measures on), plus the user's folder and captions file;
- NNCF writes UINT8 activations (zero point 0) after ReLUs; TensorRT takes only INT8, so those become
  INT8 with twice the scale (the same real range, one bit less: what a signed symmetric quantizer gives);
- the gate (parity/gate.py): min cosine vs PyTorch FP32 at the verification batches, then top-1
  agreement with PyTorch on the labelled set (the trained model's held-out shapes) and on the user's
  own images and captions; below either, one ParityError line and nothing written.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import (
    ClipTritonError,
    MissingDependencyError,
    Progress,
    check_min_cosine,
    check_number,
    release_memory,
)
from clip_triton.exporter.base.export_inputs import load_export
from clip_triton.exporter.base.manifest import ARTIFACTS, TOWERS, Manifest, file_record
from clip_triton.exporter.base.onnx_weights import EXTERNAL_DATA_BYTES, tensor_bytes, weights_outside
from clip_triton.exporter.parity import labelled as labelled_sets
from clip_triton.exporter.parity.gate import (
    compare_references,
    gate_agreement,
    gate_towers,
    labelled_references,
    torch_references,
)
from clip_triton.exporter.parity.samples import (
    ImageSample,
    builtin_images,
    builtin_texts,
    reference_pixels,
    reference_transform,
    synthetic_token_ids,
    user_images,
    user_texts,
    zero_shot_prompts,
)
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from clip_triton.exporter.sources import release_model, tower_modules

# Defaults of the gate (docs/int8.md, "The gate"). INT8 moves a CLIP embedding by ~1e-3..1e-2 in cosine
# (measured: ShapesCLIP-RN-T image tower min 0.991 on odd built-in images, ViT-B-32 0.9998): 0.98 refuses
# a broken graph (a wrong scale, an outlier channel clipped) and keeps a sound one.
INT8_MIN_COSINE = 0.98
# Share of labelled images whose zero-shot pick equals PyTorch's: INT8 may flip close calls now and then
# (five in 100 allowed; FP16 allows two).
INT8_MIN_AGREEMENT = 0.95
QUANTIZERS = ("nncf", "onnxruntime")
SHAPES_CALIBRATION = 48  # shapes *train* images (and their captions) in the default calibration set
MAX_CALIBRATION = 512  # rows per tower: more adds time, not accuracy, for min-max ranges
CALIBRATION_ROWS = 4  # rows per calibration batch (NNCF runs its statistics per batch)
# The user's images and captions: how many at most go in the top-1 agreement check (all are calibration).
USER_CHECK = 256

# Op types never quantized by default, and why.
DEFAULT_KEEP_FP32: dict[str, str] = {
    "LayerNormalization": "LayerNorm: its mean and variance need the full range of pre-norm activations",
    "ReduceMean": "decomposed LayerNorm (mean, variance)",
    "Pow": "decomposed LayerNorm variance",
    "Sqrt": "decomposed LayerNorm std; attention scale",
    "Softmax": "attention probabilities: most mass in a few values, INT8 steps flatten it",
    "ReduceL2": "the final L2 normalisation (exact unit norm)",
    "Div": "the final L2 normalisation; decomposed LayerNorm",
}


@dataclass
class Int8Policy:
    """What stays in higher precision. Recorded verbatim in the manifest's `int8` section."""

    keep_fp32_ops: list[str] = field(default_factory=lambda: sorted(DEFAULT_KEEP_FP32))
    # The image tower's first weighted layer (ViT patch embedding, ResNet stem): it reads raw pixels whose
    # fine detail every later layer builds on; it is a few percent of the compute.
    keep_first_layer: bool = True
    # Each tower's last weighted MatMul/Gemm (the projection into the shared embedding space): its error
    # goes straight into every cosine.
    keep_final_projection: bool = True
    weights: str = "int8, symmetric, per output channel"
    activations: str = "int8, symmetric (zero point 0), per tensor, static min-max ranges from calibration"

    @classmethod
    def default(cls, extra_ops: list[str] | None = None) -> Int8Policy:
        policy = cls()
        policy.keep_fp32_ops = sorted(set(policy.keep_fp32_ops) | set(extra_ops or []))
        return policy

    @classmethod
    def none(cls, extra_ops: list[str] | None = None) -> Int8Policy:
        """No protection (only the op types given): the demonstration of what the policy buys."""
        return cls(keep_fp32_ops=sorted(set(extra_ops or [])), keep_first_layer=False, keep_final_projection=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = {op: DEFAULT_KEEP_FP32.get(op, "added by the user") for op in self.keep_fp32_ops}
        return data


@dataclass
class QuantizeOptions:
    """The quantize stage's knobs (the `quantize` command's options)."""

    calibration_images: Path | None = None
    calibration_texts: Path | None = None
    labelled_set: str | Path | None = labelled_sets.AUTO
    labelled_samples: int = labelled_sets.DEFAULT_SHAPES_IMAGES
    min_cosine: float = INT8_MIN_COSINE
    min_agreement: float = INT8_MIN_AGREEMENT
    quantizer: str = "nncf"
    policy: Int8Policy = field(default_factory=Int8Policy.default)
    # NNCF's SmoothQuant on the MatMuls (accuracy on activation outliers); off takes the stage's peak on ViT-B-32
    # from ~3.5 to ~2.1 GiB (docs/int8.md, "Memory").
    smooth_quant: bool = True


def require_nncf() -> Any:
    # NNCF reports usage to Google Analytics unless told not to (openvino_telemetry, no opt-in dialog: a
    # missing consent file counts as consent). A toolchain that runs in users' CI does not phone home; this
    # variable, read once when nncf is imported, is NNCF's own switch for it.
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError as exc:
        raise MissingDependencyError(
            f"the quantize stage needs NNCF ({exc}): pip install 'clip-triton[int8]', or use --quantizer onnxruntime"
        ) from None
    return nncf


def check_options(opts: QuantizeOptions) -> None:
    """Every option, before the reference model loads: one line, exit 2."""
    if opts.quantizer not in QUANTIZERS:
        raise ClipTritonError(f"--quantizer must be one of {', '.join(QUANTIZERS)}, got {opts.quantizer!r}")
    check_min_cosine("--min-cosine", opts.min_cosine)
    check_number("--min-agreement", opts.min_agreement, 0, 1)
    check_number("--labelled-samples", opts.labelled_samples, 1, labelled_sets.MAX_LABELLED_IMAGES)
    labelled_sets.check_choice(opts.labelled_set)
    for flag, path, kind in (
        ("--calibration-images", opts.calibration_images, "folder"),
        ("--calibration-texts", opts.calibration_texts, "file"),
    ):
        if path is not None and not (Path(path).is_dir() if kind == "folder" else Path(path).is_file()):
            raise ClipTritonError(f"{flag} {path} is not a {kind}")
    if opts.quantizer == "nncf":
        require_nncf()


# ---------------------------------------------------------------- calibration data


@dataclass
class Calibration:
    """Both towers' calibration inputs, and the user's own images and captions (for the agreement check)."""

    inputs: dict[str, np.ndarray]
    sources: dict[str, str]
    user_images: list[ImageSample]
    user_texts: list[str]


def _token_ids(loaded: Any, manifest: Manifest, texts: list[str]) -> np.ndarray:
    if loaded.tokenizer is not None:
        return np.asarray(loaded.tokenizer(texts)).astype(manifest.text.input.dtype)
    return synthetic_token_ids(texts, manifest.tokenizer).astype(manifest.text.input.dtype)


def calibration_data(manifest: Manifest, loaded: Any, opts: QuantizeOptions) -> Calibration:
    """The built-in sample images and captions (parity's), the shapes train split's images and captions,
    and the user's folder and captions file when given (refused like parity's --images/--texts)."""
    from clip_triton.exporter.parity import shapes
    from clip_triton.exporter.parity.labelled import png_bytes

    mine_images = user_images(Path(opts.calibration_images)) if opts.calibration_images else []
    mine_texts = user_texts(Path(opts.calibration_texts)) if opts.calibration_texts else []
    train = shapes.samples("train", SHAPES_CALIBRATION)  # disjoint from the held-out split the gate uses
    images = mine_images + builtin_images(16) + [
        ImageSample(f"shapes-train-{i:04d}.png", png_bytes(s.image)) for i, s in enumerate(train)
    ]
    texts = mine_texts + builtin_texts(16) + zero_shot_prompts() + list(dict.fromkeys(s.caption for s in train))
    images, texts = images[:MAX_CALIBRATION], texts[:MAX_CALIBRATION]
    transform = getattr(loaded, "image_reference", None) or reference_transform(manifest)
    pixels = reference_pixels(transform, images).astype(manifest.image.input.dtype)
    ids = _token_ids(loaded, manifest, texts)
    return Calibration(
        inputs={"image": pixels, "text": ids},
        sources={
            "image": f"{len(mine_images)} of yours, 16 built-in samples, {len(train)} shapes train images",
            "text": f"{len(mine_texts)} of yours, 16 built-in captions, {len(zero_shot_prompts())} prompts, "
            f"{len(texts) - len(mine_texts) - 16 - len(zero_shot_prompts())} shapes train captions",
        },
        user_images=mine_images[:USER_CHECK],
        user_texts=mine_texts[:USER_CHECK],
    )


# ---------------------------------------------------------------- graph helpers


def weighted_layers(model: Any) -> list[Any]:
    """Conv/MatMul/Gemm nodes with a weight initializer, in graph order."""
    inits = {init.name for init in model.graph.initializer}
    return [
        node
        for node in model.graph.node
        if node.op_type in ("Conv", "MatMul", "Gemm") and any(name in inits for name in node.input[1:2])
    ]


def kept_nodes(model: Any, tower: str, policy: Int8Policy) -> list[str]:
    """Names of the nodes the policy keeps in FP32 by position (first layer, final projection)."""
    layers = weighted_layers(model)
    names: list[str] = []
    if layers and policy.keep_first_layer and tower == "image":
        names.append(layers[0].name)
    if layers and policy.keep_final_projection:
        last = [n for n in layers if n.op_type in ("MatMul", "Gemm")]
        if last:
            names.append(last[-1].name)
    return list(dict.fromkeys(names))


def _name_nodes(model: Any) -> None:
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_clip_triton_{index}"
        seen.add(node.name)


def signed_activations(model: Any) -> int:
    """UINT8 Q/DQ pairs with zero point 0 -> INT8 with twice the scale (255/127): the same real range
    [0, 255 s], what TensorRT accepts (it takes INT8 Q/DQ only). Returns how many were changed."""
    from onnx import TensorProto, numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    changed: set[str] = set()
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zero = numpy_helper.to_array(inits[node.input[2]])
        if zero.dtype != np.uint8:
            continue
        if np.any(zero != 0):
            raise ClipTritonError(f"{node.name}: an asymmetric UINT8 quantizer (zero point != 0) cannot be made signed")
        for name, value in (
            (node.input[1], None),
            (node.input[2], np.zeros(zero.shape, np.int8)),
        ):
            if name in changed:
                continue
            if value is None:
                scale = numpy_helper.to_array(inits[name]).astype(np.float32)
                value = (scale * np.float32(255.0 / 127.0)).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
            changed.add(name)
        retyped.add(node.output[0])
    for info in model.graph.value_info:
        if info.name in retyped:
            info.type.tensor_type.elem_type = TensorProto.INT8
    return len(retyped)


def check_qdq(model: Any) -> dict[str, Any]:
    """What TensorRT's explicit quantization needs, checked: every Q/DQ INT8 with zero point 0; weights'
    scales per channel. Returns counts for the manifest."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = per_channel = 0
    for node in quantize + dequantize:
        if len(node.input) > 2 and node.input[2] in inits:
            zero = numpy_helper.to_array(inits[node.input[2]])
            if zero.dtype != np.int8 or np.any(zero != 0):
                raise ClipTritonError(f"{node.name}: a {zero.dtype} zero point is not symmetric INT8 (TensorRT)")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights += 1
            if int(np.prod(inits[node.input[1]].dims or [1])) > 1:
                per_channel += 1
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ClipTritonError(f"the INT8 graph uses non-standard ops TensorRT lacks: {foreign}")
    return {
        "quantize_linear": len(quantize),
        "dequantize_linear": len(dequantize),
        "quantized_weights": weights,
        "per_channel_weights": per_channel,
    }


def _save(model: Any, dest: Path) -> None:
    import onnx

    large = sum(tensor_bytes(init) for init in model.graph.initializer) >= EXTERNAL_DATA_BYTES
    if large:
        onnx.save_model(model, str(dest), save_as_external_data=True, location=dest.name + ".data")
    else:
        onnx.save_model(model, str(dest))
    onnx.checker.check_model(str(dest))


def quantize_nncf(
    src: Path, dest: Path, tower: str, input_name: str, feeds: np.ndarray, policy: Int8Policy,
    smooth_quant: bool = True,
) -> Any:
    """NNCF post-training quantization of one tower (its model is returned, already saved at `dest`).

    NNCF is handed a weight-free skeleton whose weights stay in a sidecar (`weights_outside`): it then
    reads a weight when an algorithm needs it and points its ONNX Runtime sessions at the sidecar, instead
    of deep-copying every weight with each model copy it makes (the statistics model, SmoothQuant's and
    MinMax's results) and serialising them for each session. The same graph, weight for weight; ~1 GiB
    less at the stage's peak on ViT-B-32 (docs/int8.md, "Memory")."""
    import onnx

    nncf = require_nncf()
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    params = (
        AdvancedQuantizationParameters()
        if smooth_quant
        else AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    )
    batches = [{input_name: feeds[i : i + CALIBRATION_ROWS]} for i in range(0, len(feeds), CALIBRATION_ROWS)]
    with weights_outside(src) as skeleton:
        model = onnx.load(str(skeleton), load_external_data=False)
        _name_nodes(model)
        keep = kept_nodes(model, tower, policy)
        present = {node.op_type for node in model.graph.node}
        scope = nncf.IgnoredScope(names=keep, types=sorted(set(policy.keep_fp32_ops) & present), validate=False)
        params.backend_params[BackendParameters.EXTERNAL_DATA_DIR] = str(skeleton.parent.resolve())
        # Returns the model with every weight inside (NNCF loads the rest before the sidecar goes).
        quantized = nncf.quantize(
            model,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(batches),
            fast_bias_correction=True,
            ignored_scope=scope,
            advanced_parameters=params,
        )
        del model
    quantized.graph.name = quantized.graph.name or f"{tower}_encoder_int8"
    signed = signed_activations(quantized)
    _save(quantized, dest)
    quantized.doc_string = f"{signed} unsigned activation quantizers made signed; kept FP32: {keep}"
    return quantized, keep


def quantize_onnxruntime(
    src: Path, dest: Path, tower: str, input_name: str, feeds: np.ndarray, policy: Int8Policy,
    smooth_quant: bool = True,  # NNCF's only: not used here
) -> Any:
    """ONNX Runtime's quantize_static (QDQ, per channel, symmetric INT8 both ways, FP32 biases): the
    alternative measured in docs/int8.md."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = _with_names(src)  # node names the exclusion list can refer to
    keep = kept_nodes(model, tower, policy)
    keep += [n.name for n in model.graph.node if n.op_type in policy.keep_fp32_ops]
    named = dest.with_name(dest.name + ".named.onnx")
    onnx.save_model(model, str(named))
    del model

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(feeds):
                return None
            part = feeds[self.start : self.start + CALIBRATION_ROWS]
            self.start += CALIBRATION_ROWS
            return {input_name: part}

    try:
        quantize_static(
            str(named), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=keep,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    finally:
        named.unlink(missing_ok=True)
    return onnx.load(str(dest)), keep


def _with_names(src: Path) -> Any:
    import onnx

    model = onnx.load(str(src))
    _name_nodes(model)
    return model


QUANTIZE = {"nncf": quantize_nncf, "onnxruntime": quantize_onnxruntime}


def quantizer_version(name: str) -> str:
    if name == "nncf":
        return f"nncf {require_nncf().__version__} (nncf.quantize, ModelType.TRANSFORMER, preset PERFORMANCE)"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (quantization.quantize_static, QDQ, MinMax)"


# ---------------------------------------------------------------- the stage


def make_int8(
    export_dir: Path,
    opts: QuantizeOptions | None = None,
    *,
    progress: Progress | None = None,
) -> Manifest:
    """Quantize both towers, gate them against PyTorch FP32 (cosine, then agreement), then (only then)
    move the files in and record them in the manifest."""
    from clip_triton.exporter.sources import load_reference

    opts = opts or QuantizeOptions()
    progress = progress or Progress("quantize", quiet=True)
    export_dir = Path(export_dir)
    check_options(opts)
    manifest = load_export(export_dir, [("onnx", "fp32")])
    for tower in TOWERS:
        if not (export_dir / manifest.tower(tower).file).is_file():
            raise ClipTritonError(f"{export_dir / manifest.tower(tower).file} is missing; re-run export")
    if not os.access(export_dir, os.W_OK):
        raise ClipTritonError(f"cannot write to {export_dir}: not writable")
    chosen = labelled_sets.resolve(opts.labelled_set, manifest.pretrained)
    labelled = labelled_sets.load(chosen, opts.labelled_samples) if chosen is not None else None

    # Memory (docs/engines.md, "Memory"): every PyTorch embedding first, then the model is released; then
    # one tower at a time, one of {quantizer, INT8 session} at a time.
    with progress.step(f"rebuilding the PyTorch reference {manifest.model_name}"):
        loaded = load_reference(manifest, export_dir=export_dir)
    with progress.step("calibration data; PyTorch FP32 references (then the model is released)"):
        calibration = calibration_data(manifest, loaded, opts)
        modules = tower_modules(loaded)
        references = {tower: torch_references(modules[tower], loaded, tower) for tower in TOWERS}
        del modules
        accuracy = labelled_references(
            manifest, loaded, labelled, calibration.user_images, calibration.user_texts
        )
        release_model(loaded)
    stage = Path(tempfile.mkdtemp(prefix=".quantize.tmp-", dir=export_dir))
    try:
        seconds: dict[str, float] = {}
        sessions_out: dict[str, np.ndarray] = {}

        def check(tower: str) -> dict[str, Any]:
            spec = manifest.tower(tower)
            dest = stage / ARTIFACTS[("onnx", "int8")][tower]
            start = time.perf_counter()
            with progress.step(f"{tower} tower: {spec.file} -> {dest.name} ({opts.quantizer})"):
                model, keep = QUANTIZE[opts.quantizer](
                    export_dir / spec.file, dest, tower, spec.input.name, calibration.inputs[tower], opts.policy,
                    opts.smooth_quant,
                )
                info = {**check_qdq(model), "kept_fp32_nodes": keep}
                del model
                release_memory()
            seconds[f"{tower}_quantize"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            with progress.step(f"{tower} tower: ONNX Runtime INT8 (CPU) vs PyTorch FP32"):
                embed = functools.partial(ort_embed, ort_session(dest))
                record = compare_references(references[tower], embed, finite=True)
                if accuracy is not None:
                    sessions_out[tower] = accuracy.embed(tower, embed)
                del embed
                release_memory()
            seconds[f"{tower}_parity"] = round(time.perf_counter() - start, 2)
            return {**record, "graph": info}

        refused = "no INT8 files written; keep more in FP32 with --keep-fp32 OP,... or lower the gate (docs/int8.md)"
        towers = gate_towers(
            check,
            stage="INT8",
            threshold=opts.min_cosine,
            compared_with="ONNX Runtime INT8 vs PyTorch FP32",
            progress=progress,
            refused=refused,
            describe=lambda r: f"{r['graph']['quantized_weights']} weights INT8, "
            f"{len(r['graph']['kept_fp32_nodes'])} nodes kept FP32 by name",
        )
        rows: list[dict[str, Any]] = []
        if accuracy is not None:
            rows = gate_agreement(
                accuracy, sessions_out, stage="INT8", threshold=opts.min_agreement, progress=progress,
                refused=refused,
            )
        import onnx

        files = sorted(stage.iterdir(), key=lambda p: p.suffix == ".onnx")  # data sidecars first
        for item in files:
            os.replace(item, export_dir / item.name)
        for tower in TOWERS:  # a sidecar from an earlier (larger) quantization would be stale
            stale = export_dir / (ARTIFACTS[("onnx", "int8")][tower] + ".data")
            if stale.exists() and stale.name not in {f.name for f in files}:
                stale.unlink()
        manifest.int8 = {
            "quantizer": quantizer_version(opts.quantizer),
            "smooth_quant": opts.smooth_quant and opts.quantizer == "nncf",
            "format": "QDQ (QuantizeLinear/DequantizeLinear), opset " + str(manifest.opset),
            "onnx": onnx.__version__,
            "policy": opts.policy.to_dict(),
            "calibration": calibration.sources,
            "threshold": opts.min_cosine,
            "min_agreement": opts.min_agreement,
            "compared_with": "PyTorch FP32; ONNX Runtime CPU (graph optimisation on: fused INT8 kernels)",
            "accuracy": rows,
            "seconds": seconds,
            "files": {item.name: file_record(export_dir / item.name) for item in files},
            **towers,
        }
        manifest.save(export_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if rows:
        worst = min(rows, key=lambda r: r["agreement"])
        progress.info(f"agreement with PyTorch: worst {worst['set']} {worst['agreement']:.4f}")
    return manifest


