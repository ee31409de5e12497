"""The runtime registry's interface: what a runtime is, what its runners do, how it serves.

A runtime (docs/runtimes.md) is one module of this package that registers a `Runtime`:
- `runners(ctx)`: the runners it can offer for parity and the encoder benchmark (each one
  embeds a tower: open / embed / close), or a `Skipped` record saying why one cannot run here;
- `serving`: how its encoders are written into a Triton repository (platform or backend, file,
  devices, parameters), or None when it does not serve.

The ideas come from Polygraphy (one runner interface, a comparator that runs runners and a
separate step that judges them) and Model Navigator (each runner declares its name, format and
device; callers loop over the registry instead of naming runtimes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import ClipTritonError, release_memory
from clip_triton.exporter.base.manifest import STAGE_OF_ARTIFACT, Manifest

BATCH = 16  # rows per call into a runner: bounds memory, exercises batching
TOLERANCES = ("fp32", "fp16", "int8")  # threshold classes: a runner is judged by one of them


@dataclass
class TowerBatch:
    """What a runner embeds: the reference-preprocessed tensor and the raw samples it came from.

    Tensor runners (PyTorch, ONNX Runtime, TensorRT) read `tensor`; Triton reads `raw` (encoded
    image bytes, caption strings) so its own preprocessing and tokenisation are part of the check.
    """

    tensor: np.ndarray
    raw: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, rows: slice) -> TowerBatch:
        return TowerBatch(self.tensor[rows], self.raw[rows])


class Runner:
    """Embeds a batch of one tower -> numpy [B, D] float32.

    `name` is the stage name in parity reports and the key in benchmark results (one name per
    runner everywhere); `precision` is its tolerance class (TOLERANCES).
    """

    name = "runner"
    label = "runner"  # a short human name (benchmark tables and plots)
    precision = "fp32"
    max_batch = BATCH

    def describe(self) -> str:
        return self.name

    def open(self) -> None:  # noqa: B027 - optional hook
        pass

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def embed_all(self, tower: str, batch: TowerBatch) -> np.ndarray:
        step = max(1, min(self.max_batch, BATCH))
        parts = [self.embed(tower, batch[i : i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(parts, axis=0).astype(np.float32)

    def __call__(self, tower: str, tensor: np.ndarray) -> np.ndarray:
        """One call on a plain tensor (the encoder benchmark times this)."""
        return self.embed(tower, TowerBatch(tensor))


class TowerHandleRunner(Runner):
    """A runner over one loaded handle per tower (an ONNX Runtime session, a compiled OpenVINO model).

    The benchmark keeps both towers' handles open; parity (`one_tower_at_a_time`) embeds a whole tower, then
    the other, and holds one handle at a time, which halves the weights in memory (docs/engines.md, "Memory").
    Subclasses set `files` and say how to load a tower (`_load`) and run it (`_run`)."""

    files: dict[str, Path]
    one_tower_at_a_time = False

    def _load(self, tower: str) -> Any:
        raise NotImplementedError

    def _run(self, handle: Any, inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def open(self) -> None:
        self.handles: dict[str, Any] = {} if self.one_tower_at_a_time else {t: self._load(t) for t in self.files}

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        if tower not in self.handles:  # one tower at a time: the other tower's handle goes first
            self.handles = {}
            release_memory()
            self.handles[tower] = self._load(tower)
        return self._run(self.handles[tower], batch.tensor)

    def close(self) -> None:
        self.handles = {}


@dataclass(frozen=True)
class Skipped:
    """A runner that cannot run here, and why (reported, never silently dropped)."""

    name: str
    reason: str
    label: str = ""


@dataclass
class RunContext:
    """What a runtime needs to build its runners."""

    export_dir: Path
    manifest: Manifest
    purpose: str = "parity"  # "parity" or "bench" (the benchmark also times baselines parity skips)
    loaded: Any = None  # the PyTorch reference (clip_triton.exporter.sources.open_clip.LoadedModel), when built
    providers: list[str] | None = None  # ONNX Runtime execution providers; None: the default list
    threads: int | None = None  # intra-op threads for CPU runtimes; None: the runtime's default
    url: str | None = None  # a live Triton's gRPC endpoint
    section: dict[str, Any] | None = None  # the served repository's manifest record
    check_runtimes: tuple[str, ...] = ()  # parity --check-runtime: judged although the repository does not serve them

    def judges(self, runtime: str) -> bool:
        """Whether parity checks a runtime it judges only where it counts: served by the repository, or asked
        for with --check-runtime. (Benchmarks run every runtime.)"""
        served = (self.section or {}).get("runtime")
        return self.purpose != "parity" or served == runtime or runtime in self.check_runtimes


class Serving:
    """How a runtime's encoders are written into a Triton repository, and where they run.

    Subclasses set the class attributes and override `configure` for their own fields.
    """

    fmt = "onnx"  # the artifact format it serves (manifest.ARTIFACTS)
    model_file = "model.onnx"  # the file (or folder) in <model>/1/
    devices: tuple[str, ...] = ("gpu", "cpu")  # the first is the default
    # None: the embedded tritonserver (nvidia-pytriton's) can load it; else why it cannot.
    embedded_reason: str | None = None
    python_source: str | None = None  # model_repository/ source copied in as model.py
    pip: tuple[str, ...] = ()  # packages its model needs in NVIDIA's container
    fixed_precision: str | None = None  # a format whose precision was fixed when it was built

    def artifact(self, precision: str) -> tuple[str, str]:
        """(format, precision) of the export artifact this runtime serves at `precision`."""
        return self.fmt, self.fixed_precision or precision

    def tolerance(self, precision: str) -> str:
        """The threshold class the served encoders are judged by."""
        return self.artifact(precision)[1]

    def check_device(self, runtime: str, device: str) -> None:
        if device not in self.devices:
            raise ClipTritonError(
                f"--runtime {runtime} runs on {' or '.join(self.devices)} only: use --device {self.devices[0]}"
            )

    def max_batch(self, manifest: Manifest, wanted: int, explicit: bool) -> int:
        """The max_batch_size the encoders can take (`explicit`: the user asked for `wanted`)."""
        return wanted

    def missing_hint(self, precision: str) -> str:
        """What to run when the artifact this runtime serves is not in the export folder."""
        fmt, precision = self.artifact(precision)
        stage = STAGE_OF_ARTIFACT[(fmt, precision)]
        if stage == "export":
            return "the export folder is incomplete; re-run `clip-triton export`"
        return f"run `clip-triton {stage}` first" + (", or use --precision fp32" if fmt == "onnx" else "")

    def configure(self, config: Any, precision: str) -> None:
        """Set the encoder ModelConfig's platform/backend, file name and runtime parameters."""
        raise NotImplementedError


class Runtime:
    """One registry entry. `name` is what users type (--runtime) and manifests record."""

    name = "runtime"
    label = "runtime"
    serving: Serving | None = None

    def available(self) -> str | None:
        """None when this runtime can run on this host; otherwise why not (one line)."""
        return None

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        """Runners (or skip records) this runtime offers for the given export."""
        return []


_REGISTRY: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    if runtime.name in _REGISTRY:
        raise ValueError(f"runtime {runtime.name!r} is registered twice")
    _REGISTRY[runtime.name] = runtime
    return runtime


def registered() -> list[Runtime]:
    """Every runtime, in registration order (the order of stages in reports)."""
    return list(_REGISTRY.values())


def find(name: str | None) -> Runtime | None:
    return _REGISTRY.get(str(name))


def get(name: str) -> Runtime:
    if name not in _REGISTRY:
        raise ClipTritonError(f"unknown runtime {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def serving_names() -> tuple[str, ...]:
    """Runtimes a repository can be written for (the values of `--runtime`)."""
    return tuple(r.name for r in _REGISTRY.values() if r.serving is not None)


def serving(name: str) -> Serving:
    """The serving spec of `name`, or a one-line error listing the runtimes that serve."""
    runtime = _REGISTRY.get(name)
    if runtime is None or runtime.serving is None:
        raise ClipTritonError(f"--runtime must be one of {', '.join(serving_names())}, got {name!r}")
    return runtime.serving


def artifact_paths(ctx: RunContext, fmt: str, precision: str) -> dict[str, Path]:
    """tower -> path of an artifact in the export folder (names from the manifest)."""
    return {t: ctx.export_dir / n for t, n in ctx.manifest.artifacts(fmt, precision).items()}
