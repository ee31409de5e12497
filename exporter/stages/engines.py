"""The engines stage: FP16 ONNX graphs -> TensorRT plans, built and checked on the serving GPU.

Precision is already decided in the FP16 graph (`precision.py`), so the network is built
strongly typed: TensorRT 11 always is (`create_network(0)`; BuilderFlag.FP16 is gone), 10.12+
takes the STRONGLY_TYPED flag, and older 10.x releases fall back to BuilderFlag.FP16. A plan
runs only on the GPU family and TensorRT version that built it, so both go in the manifest.

`tensorrt` and CUDA are imported lazily: every other stage (and `--help`) works without them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_triton.exporter.base.common import (
    INT32_MAX,
    ClipTritonError,
    Progress,
    check_min_cosine,
    check_number,
    staged_file,
)
from clip_triton.exporter.base.export_inputs import load_export
from clip_triton.exporter.base.manifest import TOWERS, Manifest, file_record
from clip_triton.exporter.parity.gate import VERIFY_BATCHES, compare_references, gate_towers, torch_references
from clip_triton.exporter.runtimes.tensorrt import EngineRunner, TensorRTHost, require_runtime
from clip_triton.exporter.sources import tower_modules

if TYPE_CHECKING:
    import tensorrt as trt

ENGINE_MIN_COSINE = 0.999
DEFAULT_OPT_BATCH = 32
MAX_BUILDER_LEVEL = 5



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
    check_number("--max-batch", top, 1, INT32_MAX)
    if not min_batch <= opt <= top:
        raise ClipTritonError(
            f"the batch profile needs 1 <= min <= opt <= max, got min {min_batch}, opt {opt}, max {top}"
        )
    return BatchProfile(min_batch, opt, top)


# ---------------------------------------------------------------- build


def _typing_mode(runtime: TensorRTHost) -> str:
    if runtime.major >= 11:
        return "strongly typed (TensorRT 11: always)"
    if (runtime.major, runtime.minor) >= (10, 12):
        return "strongly typed (STRONGLY_TYPED flag)"
    return "weakly typed with BuilderFlag.FP16 (TensorRT < 10.12)"


def _create_network(builder: trt.Builder, runtime: TensorRTHost) -> trt.INetworkDefinition:
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
    runtime: TensorRTHost,
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


def parity_batches(profile: BatchProfile) -> list[int]:
    """The gate's batch sizes (VERIFY_BATCHES), each moved to the nearest one the profile allows."""
    return sorted({min(max(batch, profile.min), profile.max) for batch in VERIFY_BATCHES})


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
    precision: str = "fp16",
) -> Manifest:
    """Build both plans into `export_dir`, check them against PyTorch FP32, record them in the manifest.

    `precision` int8: from the quantize stage's Q/DQ graphs (explicit quantization; docs/int8.md); unverified
    here (no GPU), and judged at `min_cosine` like the FP16 plans unless given lower."""
    progress = progress or Progress("engines", quiet=True)
    export_dir = Path(export_dir)
    if not 0 <= builder_level <= MAX_BUILDER_LEVEL:
        raise ClipTritonError(f"--builder-level must be 0..{MAX_BUILDER_LEVEL}, got {builder_level}")
    check_number("--workspace-gib", workspace_gib, 0, above=True)  # NaN and inf refused too
    check_min_cosine("--min-cosine", min_cosine)
    if timing_cache is not None and timing_cache.exists() and not timing_cache.is_file():
        raise ClipTritonError(f"--timing-cache {timing_cache} is not a file")
    if precision not in ("fp16", "int8"):
        raise ClipTritonError(f"--precision must be fp16 or int8, got {precision!r}")
    manifest = load_export(export_dir, [("onnx", precision)])  # the graphs the plans are built from
    profile = resolve_profile(min_batch, opt_batch, max_batch, manifest.max_batch)
    runtime = require_runtime()
    graphs = manifest.artifacts("onnx", precision)
    plans = manifest.artifacts("plan", precision)
    missing = [name for name in graphs.values() if not (export_dir / name).is_file()]
    if missing or getattr(manifest, precision) is None:
        step = "fp16" if precision == "fp16" else "quantize"
        raise ClipTritonError(f"{export_dir} has no {precision.upper()} graphs ({', '.join(missing) or 'manifest'}); "
                              f"run `clip-triton {step} --export DIR` first")
    if profile.max != manifest.max_batch:
        progress.warn(
            f"engine max batch {profile.max} differs from the manifest's max_batch {manifest.max_batch}: "
            "the repository stage must take max_batch_size from the engine profile"
        )
    progress.info(
        f"TensorRT {runtime.version} on {runtime.gpu} (compute {runtime.compute_capability}), "
        f"{_typing_mode(runtime)}"
    )

    from clip_triton.exporter.sources import load_reference

    with progress.step(f"rebuilding the PyTorch reference {manifest.model_name}"):
        loaded = load_reference(manifest, export_dir=export_dir)
        modules = tower_modules(loaded)
    stage = Path(tempfile.mkdtemp(prefix=".engines.tmp-", dir=export_dir))
    try:
        def check(tower: str) -> dict[str, Any]:
            spec = manifest.tower(tower)
            plan = stage / plans[tower]
            info = build_plan(
                runtime,
                export_dir / graphs[tower],
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
                references = torch_references(modules[tower], loaded, tower, parity_batches(profile))
                runner = EngineRunner(runtime, plan)
                record = compare_references(references, runner)
                del runner
            return {**record, **info}

        towers = gate_towers(
            check,
            stage="TensorRT",
            threshold=min_cosine,
            compared_with="engine vs PyTorch FP32",
            progress=progress,
            refused="no plans written",
        )
        for tower in TOWERS:
            (stage / plans[tower]).replace(export_dir / plans[tower])
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
            "precision": precision,
            # INT8 plans beside FP16 ones: both files recorded (the profile and GPU are the last build's).
            "files": {
                **(((manifest.engines or {}).get("files") or {}) if precision == "int8" else {}),
                **{plans[t]: file_record(export_dir / plans[t]) for t in TOWERS},
            },
            **towers,
        }
        manifest.versions["tensorrt"] = runtime.version
        manifest.save(export_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
