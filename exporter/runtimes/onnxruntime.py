"""ONNX Runtime: the exported graphs (FP32 and FP16) with an explicit execution-provider list.

Runners: one per graph precision and execution provider. `cpu` is always there; `cuda` and
`tensorrt` (ONNX Runtime's own CUDA and TensorRT providers) run where onnxruntime-gpu and a
CUDA GPU are present, and are skipped with the reason where they were asked for and are not.
ONNX Runtime quietly falls back to CPU when a GPU provider fails to load, so each session's
first provider is checked to be the one asked for.

Serving: Triton's `onnxruntime` backend (platform onnxruntime_onnx), a GPU instance by default.
FP16 graphs are served with graph optimisation off (docs/engines.md, "ONNX Runtime and FP16
graphs"): `optimization { graph { level: 2 } }`, which is ORT_DISABLE_ALL in Triton's
onnxruntime backend and in the embedded server's python-based stand-in for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.runtimes.base import (
    RunContext,
    Runner,
    Runtime,
    Serving,
    Skipped,
    TowerHandleRunner,
    artifact_paths,
    register,
)

# Short names users type (--ort-providers) -> ONNX Runtime's provider names, in preference order.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("cuda", "tensorrt")
PROVIDERS_ENV = "CLIP_TRITON_ORT_PROVIDERS"
# Triton's onnxruntime backend: optimization.graph.level 2 = ORT_DISABLE_ALL (-1 basic, 1 extended).
TRITON_ORT_DISABLE_ALL = 2


def ort_session(
    path: Path,
    providers: list[str] | None = None,
    optimize: bool = True,
    threads: int | None = None,
    priority_order: bool = False,
) -> Any:
    """An ONNX Runtime session; `optimize=False` for FP16 graphs (ORT's CPU optimiser crashes on them).

    `providers` are short names (PROVIDERS keys); default CPU only. Passed explicitly: an
    onnxruntime-gpu install would otherwise pick its own. `priority_order=True` runs nodes in the
    graph's own order where dependencies allow (ExecutionOrder.PRIORITY_BASED): the fp16 stage's
    calibration graph places each tensor's reduction right after its producer, and ORT's default
    order ran them last, keeping every intermediate alive (+1.3 GB for a ViT-B image tower at
    batch 3; +0.03 GB with this order).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    wanted = providers or ["cpu"]
    chain: list[Any] = []
    for short in wanted:
        if short == "cuda":
            # FP32 means FP32: no TF32 matmuls behind an fp32 threshold.
            chain.append((PROVIDERS[short], {"use_tf32": "0"}))
        else:
            chain.append(PROVIDERS[short])
    if "cpu" not in wanted:
        chain.append(PROVIDERS["cpu"])  # for nodes a GPU provider does not take
    session = ort.InferenceSession(str(path), options, providers=chain)
    first = session.get_providers()[0]
    if first != PROVIDERS[wanted[0]]:
        raise ClipTritonError(f"ONNX Runtime did not start {PROVIDERS[wanted[0]]} (it fell back to {first})")
    return session


def ort_embed(session: Any, inputs: np.ndarray) -> np.ndarray:
    spec = session.get_inputs()[0]
    if spec.type == "tensor(float16)":  # an FP16 graph without FP32 I/O
        inputs = inputs.astype(np.float16)
    return np.asarray(session.run(None, {spec.name: np.ascontiguousarray(inputs)})[0], dtype=np.float32)


def provider_missing(short: str) -> str | None:
    """Why a provider cannot run here (None: it can)."""
    if short not in PROVIDERS:
        raise ClipTritonError(f"unknown ONNX Runtime execution provider {short!r}; known: {', '.join(PROVIDERS)}")
    import onnxruntime as ort

    if PROVIDERS[short] not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no {PROVIDERS[short]} (install onnxruntime-gpu)"
    if short in GPU_PROVIDERS:
        from clip_triton.exporter.runtimes.torch import cuda_missing

        return cuda_missing()
    return None


def parse_providers(text: str | None) -> list[str] | None:
    """'cpu,cuda' -> ['cpu', 'cuda']; None or 'auto' -> None (the default list)."""
    if text is None or text.strip() in ("", "auto"):
        return None
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown:
        raise ClipTritonError(f"--ort-providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))


def default_providers() -> list[str]:
    """CPU, plus every GPU provider that can run here ($CLIP_TRITON_ORT_PROVIDERS overrides)."""
    chosen = parse_providers(os.environ.get(PROVIDERS_ENV))
    if chosen is not None:
        return chosen
    return ["cpu", *(p for p in GPU_PROVIDERS if provider_missing(p) is None)]


class OrtRunner(TowerHandleRunner):
    """One graph precision on one execution provider."""

    def __init__(
        self,
        precision: str,
        files: dict[str, Path],
        provider: str = "cpu",
        threads: int | None = None,
        one_tower_at_a_time: bool = False,
    ) -> None:
        self.precision = precision
        # Parity holds one tower's session at a time, the benchmark both (TowerHandleRunner).
        self.one_tower_at_a_time = one_tower_at_a_time
        self.files = files
        self.provider = provider
        self.threads = threads
        # FP16 graphs run with the optimiser off (docs/engines.md); INT8 Q/DQ graphs need it on: it fuses
        # DequantizeLinear -> MatMul/Conv -> QuantizeLinear into integer kernels (docs/int8.md).
        self.optimize = precision != "fp16"
        # The CPU runner keeps the names reports have always used (onnx-fp32, onnx-fp16).
        self.name = f"onnx-{precision}" + ("" if provider == "cpu" else f"-{provider}")
        where = {"cpu": "CPU", "cuda": "CUDA EP", "tensorrt": "TensorRT EP"}[provider]
        self.label = f"ONNX Runtime {precision.upper()} ({where})"
        if provider == "tensorrt" and precision == "fp32":
            self.precision = "fp16"  # TensorRT may use TF32 for FP32 layers: judged as reduced precision
        self.handles: dict[str, Any] = {}

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.files.values())
        return f"ONNX Runtime {PROVIDERS[self.provider]} ({names}{'' if self.optimize else '; optimiser off'})"

    def _load(self, tower: str) -> Any:
        return ort_session(self.files[tower], [self.provider], optimize=self.optimize, threads=self.threads)

    def _run(self, handle: Any, inputs: np.ndarray) -> np.ndarray:
        return ort_embed(handle, inputs)


class OnnxRuntimeServing(Serving):
    fmt = "onnx"
    model_file = "model.onnx"
    devices = ("gpu", "cpu")

    def configure(self, config: Any, precision: str) -> None:
        config.backend = "onnxruntime"
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = self.model_file
        if precision == "fp16":
            config.optimization.graph.level = TRITON_ORT_DISABLE_ALL


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    label = "ONNX Runtime"
    serving = OnnxRuntimeServing()

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        providers = ctx.providers if ctx.providers is not None else default_providers()
        out: list[Runner | Skipped] = []
        for precision in ("fp32", "fp16", "int8"):
            files = artifact_paths(ctx, "onnx", precision)
            for provider in providers:
                runner = OrtRunner(precision, files, provider, ctx.threads, one_tower_at_a_time=ctx.purpose == "parity")
                missing = [p.name for p in files.values() if not p.is_file()]
                why = provider_missing(provider)
                if missing:
                    hint = {"fp32": "re-run `clip-triton export`", "fp16": "run `clip-triton fp16`",
                            "int8": "run `clip-triton quantize`"}[precision]
                    if precision == "fp32":
                        raise ClipTritonError(f"{ctx.export_dir} lacks {', '.join(missing)}; {hint}")
                    if precision == "int8" and provider != "cpu":
                        continue  # INT8 graphs: checked on CPU; on a GPU they are TensorRT's (docs/int8.md)
                    out.append(Skipped(runner.name, f"no {precision.upper()} graphs ({hint})", runner.label))
                elif why is not None:
                    out.append(Skipped(runner.name, why, runner.label))
                else:
                    out.append(runner)
        return out


RUNTIME = register(OnnxRuntime())
