"""TensorRT: serialized plans (built by `clip_triton.exporter.stages.engines` from the FP16 graphs) on a CUDA GPU.

Runner: the plans through TensorRT's own Python API (10+: set_input_shape/set_tensor_address)
on torch CUDA tensors. Serving: Triton's `tensorrt_plan` platform, GPU only. A plan runs only on
the GPU family and TensorRT version that built it (docs/engines.md), and the embedded
tritonserver has no TensorRT backend: a TensorRT repository is checked live only in NVIDIA's
container (`clip-triton parity --url`).

`tensorrt` and CUDA are imported lazily: every other stage (and `--help`) works without them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError, MissingDependencyError
from clip_triton.exporter.base.manifest import Manifest
from clip_triton.exporter.runtimes.base import (
    RunContext,
    Runner,
    Runtime,
    Serving,
    Skipped,
    TowerBatch,
    artifact_paths,
    register,
)

if TYPE_CHECKING:
    import tensorrt as trt

# Plans load only in a Triton whose TensorRT built them: build them in the TensorRT container of the target
# release, not with the PyPI wheel (docs/releases.md; `deploy --build-engines` scripts it).
CONTAINER_HINT = (
    "build the plans on the serving GPU inside nvcr.io/nvidia/tensorrt:<YY.MM>-py3 of the target Triton "
    "release (`clip-triton deploy --build-engines` writes the Job and a docker script; docs/releases.md)"
)


@dataclass(frozen=True)
class TensorRTHost:
    """What building or running a plan needs from the host: the tensorrt module and the GPU it builds for."""

    trt: Any
    version: str
    major: int
    minor: int
    gpu: str
    compute_capability: str


def find_tensorrt() -> tuple[Any | None, str | None]:
    """(module, None) or (None, why). A stub-only `tensorrt` (type stubs, no bindings) counts as missing."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as exc:
        return None, f"the tensorrt package is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        return None, f"the tensorrt package failed to import ({type(exc).__name__}: {exc})"
    if not hasattr(module, "Builder"):
        return None, "the tensorrt package is not installed (only its type stubs are)"
    return module, None


def find_gpu() -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def require_runtime() -> TensorRTHost:
    """TensorRT >= 10 and a CUDA GPU, or MissingDependencyError (exit 3) saying which is missing."""
    module, why = find_tensorrt()
    gpu = find_gpu()
    if module is None and gpu is None:
        raise MissingDependencyError(f"engines need TensorRT and a CUDA GPU: {why} and no GPU is visible; "
                                     + CONTAINER_HINT)
    if module is None:
        raise MissingDependencyError(f"engines need TensorRT: {why}; {CONTAINER_HINT}")
    if gpu is None:
        raise MissingDependencyError(
            f"engines need a CUDA GPU (TensorRT {module.__version__} is installed but torch sees no GPU); "
            "build on the GPU that will serve the plans"
        )
    version = str(module.__version__)
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()] + [0, 0]
    if parts[0] < 10:
        raise MissingDependencyError(f"engines need TensorRT >= 10, found {version}; {CONTAINER_HINT}")
    return TensorRTHost(module, version, parts[0], parts[1], gpu[0], gpu[1])




class EngineRunner:
    """Runs a plan on torch CUDA tensors (TensorRT 10+ API: set_input_shape/set_tensor_address)."""

    def __init__(self, host: TensorRTHost, plan_path: Path) -> None:
        import tensorrt as t

        self.logger = t.Logger(t.Logger.WARNING)
        self.runtime = t.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise ClipTritonError(f"TensorRT could not load {plan_path.name} (built for another GPU/TensorRT?)")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == t.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == t.TensorIOMode.OUTPUT]

    def __call__(self, inputs: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        import tensorrt as t
        import torch

        name = self.inputs[0]
        want = np.dtype(t.nptype(self.engine.get_tensor_dtype(name)))
        device_in = torch.from_numpy(np.ascontiguousarray(inputs.astype(want))).cuda()
        if not self.context.set_input_shape(name, tuple(inputs.shape)):
            raise ClipTritonError(f"batch {inputs.shape[0]} is outside the engine's profile")
        self.context.set_tensor_address(name, device_in.data_ptr())
        results = []
        for out_name in self.outputs:
            dims = self.context.get_tensor_shape(out_name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            dtype = np.dtype(t.nptype(self.engine.get_tensor_dtype(out_name)))
            out = torch.empty(shape, dtype=getattr(torch, dtype.name), device="cuda")
            self.context.set_tensor_address(out_name, out.data_ptr())
            results.append(out)
        stream = torch.cuda.Stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ClipTritonError("TensorRT execution failed")
        stream.synchronize()
        return results[0].float().cpu().numpy()


class TensorRTRunner(Runner):
    """Both towers' plans, checked against the PyTorch reference at the FP16 tolerance."""

    name = "tensorrt"
    label = "TensorRT FP16 (GPU)"
    precision = "fp16"

    def __init__(self, files: dict[str, Path], precision: str = "fp16") -> None:
        self.files = files
        if precision != "fp16":  # INT8 plans from the Q/DQ graphs: their own stage name and tolerance
            self.precision = precision
            self.name = f"tensorrt-{precision}"
            self.label = f"TensorRT {precision.upper()} (GPU)"
        self.engines: dict[str, EngineRunner] = {}

    def describe(self) -> str:
        return f"TensorRT ({', '.join(p.name for p in self.files.values())})"

    def open(self) -> None:
        host = require_runtime()
        for tower, path in self.files.items():
            runner = EngineRunner(host, path)
            self.engines[tower] = runner
            # Every call must fit the profile (its shapes: min, opt, max).
            profile_max = runner.engine.get_tensor_profile_shape(runner.inputs[0], 0)[2][0]
            self.max_batch = min(self.max_batch, int(profile_max))

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        return self.engines[tower](batch.tensor)

    def close(self) -> None:
        self.engines = {}


def engine_max_batch(manifest: Manifest) -> int | None:
    """The largest batch the engines' optimisation profile accepts (manifest.engines.profile.max)."""
    profile = (manifest.engines or {}).get("profile") or {}
    top = profile.get("max")
    return int(top) if isinstance(top, int) else None


class TensorRTServing(Serving):
    fmt = "plan"
    model_file = "model.plan"
    devices = ("gpu",)
    # The graph decided the precision: FP16 plans from the FP16 graphs, INT8 plans from the Q/DQ graphs
    # (`engines --precision int8`, explicit quantization; docs/int8.md). fp32 serves the FP16 plans, as before.

    def artifact(self, precision: str) -> tuple[str, str]:
        return self.fmt, "int8" if precision == "int8" else "fp16"
    embedded_reason = (
        "the embedded tritonserver cannot load TensorRT plans; serve this repository with NVIDIA's "
        "Triton container on the GPU and pass --url HOST:PORT"
    )

    def configure(self, config: Any, precision: str) -> None:
        config.platform = "tensorrt_plan"
        config.default_model_filename = self.model_file

    def max_batch(self, manifest: Manifest, wanted: int, explicit: bool) -> int:
        limit = engine_max_batch(manifest)
        if limit is None:
            raise ClipTritonError(
                "the manifest records no engine profile max batch (manifest.engines); rebuild the engines "
                "with `clip-triton engines`"
            )
        if explicit and wanted > limit:
            raise ClipTritonError(
                f"--max-batch {wanted} exceeds the engines' profile max batch {limit}; "
                "Triton would refuse to load the model (rebuild the engines with a larger --max-batch)"
            )
        return min(wanted, limit)

    def missing_hint(self, precision: str) -> str:
        if precision == "int8":
            return ("run `clip-triton quantize`, then `clip-triton engines --precision int8` on the target GPU "
                    "(TensorRT builds the Q/DQ graph), or pick another --runtime")
        return "run `clip-triton engines` on the target GPU first, or pick another --runtime"


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    label = "TensorRT"
    serving = TensorRTServing()

    def available(self) -> str | None:
        try:
            require_runtime()
        except MissingDependencyError as exc:
            return str(exc)
        return None

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        files = artifact_paths(ctx, "plan", "fp16")
        out: list[Runner | Skipped] = []
        why = self.available()
        if not all(p.is_file() for p in files.values()):
            out.append(Skipped(TensorRTRunner.name, "no engines (run `clip-triton engines`)", TensorRTRunner.label))
        elif why is not None:
            out.append(Skipped(TensorRTRunner.name, why, TensorRTRunner.label))
        else:
            out.append(TensorRTRunner(files))
        int8 = artifact_paths(ctx, "plan", "int8")
        if all(p.is_file() for p in int8.values()):  # only listed where INT8 plans were built
            runner = TensorRTRunner(int8, "int8")
            out.append(runner if why is None else Skipped(runner.name, why, runner.label))
        return out


RUNTIME = register(TensorRTRuntime())
