"""The engines stage: FP16 ONNX graphs -> TensorRT plans, built and checked on the serving GPU.

Precision is already decided in the FP16 graph (`precision.py`), so the network is built
strongly typed: TensorRT 11 always is (`create_network(0)`; BuilderFlag.FP16 is gone), 10.12+
takes the STRONGLY_TYPED flag, and older 10.x releases fall back to BuilderFlag.FP16. A plan
runs only on the GPU family and TensorRT version that built it, so both go in the manifest.

`tensorrt` and CUDA are imported lazily: every other stage (and `--help`) works without them.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.common import ClipTritonError, MissingDependencyError, ParityError, Progress, staged_file
from exporter.manifest import (
    IMAGE_FP16_ONNX,
    IMAGE_PLAN,
    TEXT_FP16_ONNX,
    TEXT_PLAN,
    TOWERS,
    Manifest,
    file_record,
    load_manifest,
)
from exporter.parity import compare_embeddings

if TYPE_CHECKING:
    import tensorrt as trt

ENGINE_MIN_COSINE = 0.999
DEFAULT_OPT_BATCH = 32
MAX_BUILDER_LEVEL = 5
PLANS = {"image": IMAGE_PLAN, "text": TEXT_PLAN}
FP16_GRAPHS = {"image": IMAGE_FP16_ONNX, "text": TEXT_FP16_ONNX}
CONTAINER_HINT = (
    "run inside NVIDIA's TensorRT/Triton container (nvcr.io/nvidia/tritonserver:<YY.MM>-py3) "
    "or `pip install 'clip-triton[tensorrt]'` on a GPU host"
)


@dataclass(frozen=True)
class BatchProfile:
    """The one optimisation profile: batch sizes TensorRT accepts (min..max) and tunes for (opt)."""

    min: int
    opt: int
    max: int


def resolve_profile(
    min_batch: int, opt_batch: int | None, max_batch: int | None, manifest_max: int
) -> BatchProfile:
    """Validate 1 <= min <= opt <= max; max defaults to the manifest's, opt to min(32, max)."""
    top = manifest_max if max_batch is None else max_batch
    opt = min(max(DEFAULT_OPT_BATCH, min_batch), top) if opt_batch is None else opt_batch
    if min_batch < 1:
        raise ClipTritonError(f"--min-batch must be at least 1, got {min_batch}")
    if not min_batch <= opt <= top:
        raise ClipTritonError(
            f"the batch profile needs 1 <= min <= opt <= max, got min {min_batch}, opt {opt}, max {top}"
        )
    return BatchProfile(min_batch, opt, top)


@dataclass(frozen=True)
class Runtime:
    """What the build needs from the host: the tensorrt module and the GPU it builds for."""

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


def _find_gpu() -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def require_runtime() -> Runtime:
    """TensorRT >= 10 and a CUDA GPU, or MissingDependencyError (exit 3) saying which is missing."""
    module, why = find_tensorrt()
    gpu = _find_gpu()
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
    return Runtime(module, version, parts[0], parts[1], gpu[0], gpu[1])


# ---------------------------------------------------------------- build


def _typing_mode(runtime: Runtime) -> str:
    if runtime.major >= 11:
        return "strongly typed (TensorRT 11: always)"
    if (runtime.major, runtime.minor) >= (10, 12):
        return "strongly typed (STRONGLY_TYPED flag)"
    return "weakly typed with BuilderFlag.FP16 (TensorRT < 10.12)"


def _create_network(builder: trt.Builder, runtime: Runtime) -> trt.INetworkDefinition:
    import tensorrt as t

    if runtime.major >= 11:
        return builder.create_network(0)  # every network is strongly typed; the flag is ignored
    if (runtime.major, runtime.minor) >= (10, 12):
        return builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    return builder.create_network(0)


def _parse(parser: trt.OnnxParser, path: Path) -> None:
    # parse_from_file (not parse(bytes)): it finds a large graph's external-data sidecar.
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors else "unknown error"
        raise ClipTritonError(f"TensorRT could not parse {path.name}: {first} ({len(errors)} error(s))")


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another GPU/TensorRT is rejected, not silently misused.
    if not config.set_timing_cache(cache, False):
        raise ClipTritonError(f"timing cache {path} does not fit this GPU/TensorRT; delete it or pick another file")
    return cache


def build_plan(
    runtime: Runtime,
    onnx_path: Path,
    plan_path: Path,
    input_name: str,
    input_shape: list[int],
    profile: BatchProfile,
    *,
    timing_cache: Path | None,
    workspace_gib: float | None,
    builder_level: int,
    progress: Progress,
) -> dict[str, Any]:
    """Parse, configure (profile, cache, workspace, level), build and save one plan."""
    import tensorrt as t  # lazily: require_runtime() checked it is there

    logger = t.Logger(t.Logger.WARNING)
    builder = t.Builder(logger)
    network = _create_network(builder, runtime)
    parser = t.OnnxParser(network, logger)
    with progress.step(f"parsing {onnx_path.name}"):
        _parse(parser, onnx_path)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [input_name]:
        raise ClipTritonError(f"{onnx_path.name} has inputs {names}; the manifest says [{input_name!r}]")
    config = builder.create_builder_config()
    if runtime.major == 10 and runtime.minor < 12:
        config.set_flag(t.BuilderFlag.FP16)
    rest = [int(d) for d in input_shape[1:]]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(
        input_name, t.Dims([profile.min, *rest]), t.Dims([profile.opt, *rest]), t.Dims([profile.max, *rest])
    )
    config.add_optimization_profile(opt_profile)
    if workspace_gib is not None:
        config.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = builder_level
    cache = _load_timing_cache(config, timing_cache)
    start = time.perf_counter()
    with progress.step(f"building {plan_path.name} (batch {profile.min}..{profile.max}, opt {profile.opt})"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ClipTritonError(f"TensorRT failed to build {plan_path.name}; see the TensorRT log above")
    seconds = round(time.perf_counter() - start, 2)
    with staged_file(plan_path) as tmp:
        tmp.write_bytes(memoryview(serialized).tobytes())
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(timing_cache) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()).tobytes())
    return {"build_seconds": seconds}


# ---------------------------------------------------------------- run


class EngineRunner:
    """Runs a plan on torch CUDA tensors (TensorRT 10+ API: set_input_shape/set_tensor_address)."""

    def __init__(self, runtime: Runtime, plan_path: Path) -> None:
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


def parity_batches(profile: BatchProfile) -> list[int]:
    """The smallest batch and 8 (or the nearest batch the profile allows)."""
    return sorted({profile.min, min(max(8, profile.min), profile.max)})


# ---------------------------------------------------------------- the stage


def build_engines(
    export_dir: Path,
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    timing_cache: Path | None = None,
    workspace_gib: float | None = None,
    builder_level: int = 3,
    min_cosine: float = ENGINE_MIN_COSINE,
    progress: Progress | None = None,
) -> Manifest:
    """Build both plans into `export_dir`, check them against PyTorch FP32, record them in the manifest."""
    progress = progress or Progress("engines", quiet=True)
    export_dir = Path(export_dir)
    if not 0 <= builder_level <= MAX_BUILDER_LEVEL:
        raise ClipTritonError(f"--builder-level must be 0..{MAX_BUILDER_LEVEL}, got {builder_level}")
    if workspace_gib is not None and workspace_gib <= 0:
        raise ClipTritonError(f"--workspace-gib must be positive, got {workspace_gib}")
    if not 0.0 < min_cosine <= 1.0:
        raise ClipTritonError(f"--min-cosine must be in (0, 1], got {min_cosine}")
    if timing_cache is not None and timing_cache.exists() and not timing_cache.is_file():
        raise ClipTritonError(f"--timing-cache {timing_cache} is not a file")
    manifest = load_manifest(export_dir)
    profile = resolve_profile(min_batch, opt_batch, max_batch, manifest.max_batch)
    runtime = require_runtime()
    missing = [name for name in FP16_GRAPHS.values() if not (export_dir / name).is_file()]
    if missing or manifest.fp16 is None:
        raise ClipTritonError(f"{export_dir} has no FP16 graphs ({', '.join(missing) or 'manifest'}); "
                              "run `clip-triton fp16 --export DIR` first")
    if profile.max != manifest.max_batch:
        progress.warn(
            f"engine max batch {profile.max} differs from the manifest's max_batch {manifest.max_batch}: "
            "the repository stage must take max_batch_size from the engine profile"
        )
    progress.info(
        f"TensorRT {runtime.version} on {runtime.gpu} (compute {runtime.compute_capability}), "
        f"{_typing_mode(runtime)}"
    )

    from exporter.loading import load_reference
    from exporter.onnx_export import sample_inputs, torch_embed, tower_modules

    with progress.step(f"rebuilding the PyTorch reference {manifest.model_name}"):
        loaded = load_reference(manifest, export_dir=export_dir)
        modules = tower_modules(loaded)
    stage = Path(tempfile.mkdtemp(prefix=".engines.tmp-", dir=export_dir))
    try:
        towers: dict[str, Any] = {}
        for tower in TOWERS:
            spec = manifest.tower(tower)
            plan = stage / PLANS[tower]
            info = build_plan(
                runtime,
                export_dir / FP16_GRAPHS[tower],
                plan,
                spec.input.name,
                spec.input.shape,
                profile,
                timing_cache=timing_cache,
                workspace_gib=workspace_gib,
                builder_level=builder_level,
                progress=progress,
            )
            with progress.step(f"{tower} tower: TensorRT vs PyTorch FP32"):
                runner = EngineRunner(runtime, plan)
                results = {}
                for batch in parity_batches(profile):
                    inputs = sample_inputs(loaded, tower, batch)
                    results[f"batch_{batch}"] = compare_embeddings(torch_embed(modules[tower], inputs), runner(inputs))
                del runner
            worst = min(results.values(), key=lambda r: r["min_cosine"])
            towers[tower] = {
                "min_cosine": worst["min_cosine"],
                "mean_cosine": min(r["mean_cosine"] for r in results.values()),
                "max_abs_diff": max(r["max_abs_diff"] for r in results.values()),
                "batches": results,
                **info,
            }
            progress.info(f"{tower} tower: min cosine {worst['min_cosine']:.7f}")
        bad = [t for t in TOWERS if towers[t]["min_cosine"] < min_cosine]
        if bad:
            detail = ", ".join(f"{t} tower min cosine {towers[t]['min_cosine']:.6f}" for t in bad)
            raise ParityError(f"TensorRT parity failed: {detail} < {min_cosine} (engine vs PyTorch FP32); "
                              "no plans written")
        for tower in TOWERS:
            (stage / PLANS[tower]).replace(export_dir / PLANS[tower])
        manifest.engines = {
            "tensorrt": runtime.version,
            "gpu": runtime.gpu,
            "compute_capability": runtime.compute_capability,
            "typing": _typing_mode(runtime),
            "profile": asdict(profile),
            "builder_optimization_level": builder_level,
            "workspace_gib": workspace_gib,
            "timing_cache": str(timing_cache) if timing_cache is not None else None,
            "threshold": min_cosine,
            "compared_with": "PyTorch FP32",
            "note": "a plan runs only on this GPU family (compute capability) and TensorRT version",
            "files": {PLANS[t]: file_record(export_dir / PLANS[t]) for t in TOWERS},
            **towers,
        }
        manifest.versions["tensorrt"] = runtime.version
        manifest.save(export_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
