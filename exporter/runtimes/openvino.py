"""OpenVINO: the exported ONNX graphs on the CPU through OpenVINO's runtime (docs/runtimes.md, "OpenVINO").

Runners (parity, the encoder benchmark), one per inference precision:
  openvino-fp32  the FP32 graph, inference precision pinned to f32 (OpenVINO's CPU plugin otherwise
                 runs FP32 graphs in bf16 on CPUs with AVX512_BF16 or AMX: its default, not ours);
  openvino-bf16  the FP32 graph with inference precision bf16, where the CPU lists BF16 in its
                 OPTIMIZATION_CAPABILITIES (else a skip with the reason); judged by the `bf16` class of
                 TOLERANCES when there is one, else by the fp16 class (docs/runtimes.md: the measured
                 cosines and the class proposed for bf16);
  openvino-int8  the INT8 graph of `clip-triton quantize`, when the export has one (skipped otherwise),
                 the rest of the graph at f32; judged by the `int8` class.

Serving: Triton's OpenVINO backend in NVIDIA's container (`backend: "openvino"`, x86 CPU), reading
`1/model.onnx` directly (`default_model_filename`): no IR conversion step, the file parity checked is the
file served. Parameters (openvino_backend's README and src/openvino.cc):
  PERFORMANCE_HINT=LATENCY   each execution is one batch Triton's dynamic batcher formed; it should use every
                             core (LATENCY), not be split into streams no second request fills;
  NUM_STREAMS=<instances>    one stream per model instance: the backend compiles the model once and each
                             instance runs its own infer request on it, so N instances need N streams;
  ENABLE_BATCH_PADDING=YES   with max_batch_size > 0 the backend fixes the graph's batch to max_batch_size
                             (ov::set_batch) and refuses any other batch unless padding is on;
  HINT_BF16                  not set: the backend accepts only YES (no way to ask for f32), and the CPU
                             plugin already picks bf16 on CPUs that have it, f32 elsewhere. Served FP32
                             encoders are therefore judged by the reduced-precision class (`tolerance`).
Because every execution is padded to max_batch_size, the repository's max batch defaults to
MAX_BATCH_DEFAULT here (an explicit --max-batch is kept). The embedded tritonserver has no OpenVINO
backend; it serves this repository unchanged through a python-based stand-in
(`model_repository/openvino_encoder/model.py`, installed by exporter/base/server.py as
`backends/openvino`), which runs OpenVINO's Python API with the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.manifest import ARTIFACTS, Manifest
from clip_triton.exporter.runtimes.base import (
    TOLERANCES,
    RunContext,
    Runner,
    Runtime,
    Serving,
    Skipped,
    TowerHandleRunner,
    artifact_paths,
    register,
)

# Config parameters of Triton's OpenVINO backend (src/openvino.cc, ModelState::ParseParameters).
PARAM_PERFORMANCE_HINT = "PERFORMANCE_HINT"
PARAM_NUM_STREAMS = "NUM_STREAMS"
PARAM_BATCH_PADDING = "ENABLE_BATCH_PADDING"
PARAM_HINT_BF16 = "HINT_BF16"
PARAM_INFERENCE_NUM_THREADS = "INFERENCE_NUM_THREADS"
MAX_BATCH_DEFAULT = 8  # every execution is padded to max_batch_size by the real backend
NO_INT8 = "no int8 graph: run clip-triton quantize"
# OpenVINO's element type names for its inference precision hint.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
LABELS = {
    "fp32": "OpenVINO FP32 (CPU)",
    "bf16": "OpenVINO bf16 inference precision (CPU)",
    "int8": "OpenVINO INT8 graph (CPU)",
}


def tolerance_class(variant: str) -> str:
    """The threshold class a variant is judged by: its own where TOLERANCES has it, else the nearest.

    bf16 keeps 8 mantissa bits (fp16 keeps 10): where runtimes/base.py has no `bf16` class it is judged
    by fp16's, which it passes on the measured models (docs/runtimes.md, "OpenVINO").
    """
    if variant in TOLERANCES:
        return variant
    return "fp16"


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None: it can)."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install 'clip-triton[openvino]')"
    try:
        devices = ov.Core().available_devices
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"OpenVINO could not start: {type(exc).__name__}: {exc}"
    if "CPU" not in devices:
        return f"OpenVINO {ov.__version__} has no CPU device here (devices: {', '.join(devices) or 'none'})"
    return None


def cpu_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8); [] without OpenVINO."""
    try:
        import openvino as ov

        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001
        return []


def bf16_missing() -> str | None:
    """Why bf16 inference precision cannot run here (None: the CPU computes in bf16 natively)."""
    caps = cpu_capabilities()
    if "BF16" not in caps:
        return (
            "this CPU has no native bf16 (OpenVINO OPTIMIZATION_CAPABILITIES: "
            f"{', '.join(caps) or 'unknown'}; needs AVX512_BF16 or AMX)"
        )
    return None


def compile_model(
    path: Path,
    precision: str = "f32",
    threads: int | None = None,
    hint: str = "LATENCY",
    streams: int | str | None = 1,
) -> Any:
    """An OpenVINO CompiledModel of an ONNX graph on the CPU. `precision`: the inference precision hint
    (f32, bf16, or None for the plugin's default, as Triton's backend leaves it)."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if streams is not None:
        config["NUM_STREAMS"] = str(streams)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def inference_precision(compiled: Any) -> str:
    """What a compiled model computes in (bf16, f32, ...): read back, not assumed."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


def ov_embed(request: Any, inputs: np.ndarray) -> np.ndarray:
    """One synchronous inference on an InferRequest -> the first output as float32."""
    want = request.model_inputs[0].get_element_type().to_dtype()
    request.infer({0: np.ascontiguousarray(inputs.astype(want, copy=False))})
    return np.array(request.get_output_tensor(0).data, dtype=np.float32)


class OpenVinoRunner(TowerHandleRunner):
    """One inference precision (or the INT8 graph) of OpenVINO on the CPU."""

    def __init__(
        self, variant: str, files: dict[str, Path], threads: int | None = None, one_tower_at_a_time: bool = False
    ) -> None:
        self.variant = variant
        self.files = files
        self.threads = threads
        self.one_tower_at_a_time = one_tower_at_a_time
        self.name = f"openvino-{variant}"
        self.label = LABELS[variant]
        self.precision = tolerance_class(variant)
        self.handles: dict[str, Any] = {}
        self.computed_in: dict[str, str] = {}  # tower -> the inference precision OpenVINO reports

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.files.values())
        return f"OpenVINO CPU, inference precision {OV_PRECISION[self.variant]} ({names})"

    def _load(self, tower: str) -> Any:
        compiled = compile_model(self.files[tower], OV_PRECISION[self.variant], self.threads)
        self.computed_in[tower] = inference_precision(compiled)
        return compiled.create_infer_request()

    def _run(self, handle: Any, inputs: np.ndarray) -> np.ndarray:
        return ov_embed(handle, inputs)


class OpenVinoServing(Serving):
    fmt = "onnx"
    model_file = "model.onnx"
    devices = ("cpu",)  # Triton's OpenVINO backend: KIND_CPU (Intel GPUs are not NVIDIA's container's)

    def tolerance(self, precision: str) -> str:
        # An FP32 graph runs in bf16 where the serving CPU has it (the plugin's default; the backend
        # cannot pin f32), so the served encoders are judged as reduced precision.
        fmt, graph = self.artifact(precision)
        return tolerance_class("bf16") if graph == "fp32" else graph

    def max_batch(self, manifest: Manifest, wanted: int, explicit: bool) -> int:
        return wanted if explicit else min(wanted, MAX_BATCH_DEFAULT)

    def configure(self, config: Any, precision: str) -> None:
        config.backend = "openvino"
        config.platform = ""
        config.default_model_filename = self.model_file
        instances = sum(g.count for g in config.instance_group) or 1
        config.parameters[PARAM_PERFORMANCE_HINT].string_value = "LATENCY"
        config.parameters[PARAM_NUM_STREAMS].string_value = str(instances)
        config.parameters[PARAM_BATCH_PADDING].string_value = "YES"


class OpenVinoRuntime(Runtime):
    name = "openvino"
    label = "OpenVINO (CPU)"
    serving = OpenVinoServing()

    def available(self) -> str | None:
        return openvino_missing()

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        one_at_a_time = ctx.purpose == "parity"
        why = self.available()
        if not ctx.judges(self.name):
            # Parity checks OpenVINO where it serves (or where asked): on every other build it would only add
            # time and a compiled copy of each tower's weights (the large models' memory bound).
            why = why or "not the served runtime (parity runs it for a repository served by openvino, or with " \
                "--check-runtime openvino)"
        fp32 = artifact_paths(ctx, "onnx", "fp32")
        out: list[Runner | Skipped] = []
        for variant in ("fp32", "bf16", "int8"):
            files = fp32
            reason = why
            if variant == "bf16" and reason is None:
                reason = bf16_missing()
            if variant == "int8":
                files = artifact_paths(ctx, "onnx", "int8") if ("onnx", "int8") in ARTIFACTS else {}
                if reason is None and (not files or not all(p.is_file() for p in files.values())):
                    reason = NO_INT8
            if reason is None and not all(p.is_file() for p in files.values()):
                reason = f"{ctx.export_dir} lacks {', '.join(p.name for p in files.values() if not p.is_file())}"
            if reason is not None:
                out.append(Skipped(f"openvino-{variant}", reason, LABELS[variant]))
            else:
                out.append(OpenVinoRunner(variant, files, ctx.threads, one_tower_at_a_time=one_at_a_time))
        return out


RUNTIME = register(OpenVinoRuntime())
