"""A live Triton: the served ensembles over gRPC, from raw bytes and strings.

Its runners send what clients send, so the server's own preprocessing and tokenisation are part
of what parity judges: `triton` sends encoded images and UTF-8 captions; `triton-pixels` sends the
crops `ClipClient(preprocess="client")` makes (through that very client) to the pixels entry point.
Both are judged at the tolerance of the runtime the repository was written for (`Serving.tolerance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_triton.clients import contract
from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.runtimes.base import RunContext, Runner, Runtime, Skipped, TowerBatch, find, register

# Parity judges values, not latency: one request may carry several 378-px images through a 400M-
# parameter tower on a CPU-only embedded server (minutes on 2 cores). A deadline still bounds a hung
# server; the clients' 60 s default is for serving traffic.
PARITY_REQUEST_TIMEOUT = 1800.0
_DEFAULT_NAMES = contract.model_names(contract.DEFAULT_PREFIX)


@dataclass
class TritonModels:
    """Names of the repository's models (from manifest.repository; `clip` prefix by default)."""

    image: str = _DEFAULT_NAMES["image"]
    text: str = _DEFAULT_NAMES["text"]
    preprocess: str = _DEFAULT_NAMES["image_preprocess"]
    tokenize: str = _DEFAULT_NAMES["text_tokenize"]
    pixels: str | None = None  # the pixels entry point; None for repositories written before it existed
    prefix: str = contract.DEFAULT_PREFIX

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> TritonModels:
        section = section or {}
        prefix = section.get("prefix") or section.get("name_prefix") or contract.DEFAULT_PREFIX
        models: dict[str, Any] = section["models"] if isinstance(section.get("models"), dict) else {}
        names = contract.model_names(str(prefix))  # what the contract names them, for records that list none
        return cls(
            image=str(models.get("image") or names["image"]),
            text=str(models.get("text") or names["text"]),
            preprocess=str(models.get("image_preprocess") or models.get("preprocess") or names["image_preprocess"]),
            tokenize=str(models.get("text_tokenize") or models.get("tokenize") or names["text_tokenize"]),
            pixels=str(models["image_pixels"]) if models.get("image_pixels") else None,
            prefix=str(prefix),
        )


class TritonRunner(Runner):
    """A live Triton over gRPC, through the ensembles, from raw bytes and strings."""

    name = "triton"

    def __init__(self, url: str, models: TritonModels, precision: str, runtime: str | None) -> None:
        self.url = url
        self.models = models
        self.precision = precision
        self.runtime = runtime
        self.client: Any = None
        self._io: dict[str, tuple[str, str, int]] = {}

    def describe(self) -> str:
        runtime = self.runtime or "unknown runtime"
        return f"Triton gRPC {self.url} ({self.models.image}, {self.models.text}; {runtime}, {self.precision})"

    def open(self) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(self.url)
        if not self.client.is_server_ready():
            raise ClipTritonError(f"the Triton server at {self.url} is not ready")

    def model_io(self, model: str) -> tuple[str, str, int]:
        """(input name, output name, max_batch_size) as the server reports them."""
        if model not in self._io:
            if not self.client.is_model_ready(model):
                raise ClipTritonError(f"model {model!r} is not ready on {self.url}")
            meta = self.client.get_model_metadata(model)
            config = self.client.get_model_config(model).config
            self._io[model] = (meta.inputs[0].name, meta.outputs[0].name, int(config.max_batch_size))
        return self._io[model]

    def infer_raw(self, model: str, raw: list[Any]) -> np.ndarray:
        """Send BYTES items (image bytes or UTF-8 strings) to `model`; its first output, stacked."""
        import tritonclient.grpc as grpcclient

        in_name, out_name, max_batch = self.model_io(model)
        items = [r.encode("utf-8") if isinstance(r, str) else bytes(r) for r in raw]
        step = max_batch if max_batch > 0 else 1
        parts = []
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            data = np.array(chunk, dtype=np.object_).reshape(len(chunk), 1)
            if max_batch == 0:
                data = data.reshape(1)
            tensor = grpcclient.InferInput(in_name, list(data.shape), contract.BYTES)
            tensor.set_data_from_numpy(data)
            result = self.client.infer(
                model, [tensor], outputs=[grpcclient.InferRequestedOutput(out_name)],
                client_timeout=PARITY_REQUEST_TIMEOUT,
            )
            out = result.as_numpy(out_name)
            parts.append(out if max_batch > 0 else out[None])
        return np.concatenate(parts, axis=0)

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        model = self.models.image if tower == "image" else self.models.text
        return self.infer_raw(model, batch.raw).astype(np.float32)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class TritonPixelsRunner(TritonRunner):
    """The pixels entry point: images cropped by ClipClient(preprocess="client"), texts as `triton`."""

    name = "triton-pixels"
    pixels_client: Any = None

    def describe(self) -> str:
        return f"Triton gRPC {self.url} ({self.models.pixels} from client-side crops; {self.runtime}, {self.precision})"

    def open(self) -> None:
        from clip_triton.clients.sync import ClipClient

        super().open()
        # One client for the run: it reads the transform and limits from the server once.
        self.pixels_client = ClipClient(
            self.url, prefix=self.models.prefix, preprocess="client", timeout=PARITY_REQUEST_TIMEOUT
        )

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        if tower != "image":
            return super().embed(tower, batch)
        return self.pixels_client.embed_images([bytes(r) for r in batch.raw])

    def close(self) -> None:
        if self.pixels_client is not None:
            self.pixels_client.close()
            self.pixels_client = None
        super().close()


def triton_precision(section: dict[str, Any] | None) -> tuple[str, str | None]:
    """(tolerance class, runtime) of a repository from its manifest record."""
    section = section or {}
    runtime = section.get("runtime")
    precision = str(section.get("precision") or "fp32")
    entry = find(runtime)
    if entry is not None and entry.serving is not None:
        return entry.serving.tolerance(precision), runtime
    return ("fp16" if precision == "fp16" else "fp32"), runtime


def triton_runner(url: str, section: dict[str, Any] | None) -> TritonRunner:
    """A runner for the repository a manifest `repository` section describes, served at `url`."""
    precision, runtime = triton_precision(section)
    return TritonRunner(url, TritonModels.from_section(section), precision, runtime)


def triton_runners(url: str, section: dict[str, Any] | None) -> list[Runner | Skipped]:
    """Both entry points of the repository a manifest `repository` section describes, served at `url`."""
    bytes_runner = triton_runner(url, section)
    if bytes_runner.models.pixels is None:
        reason = "the repository has no pixels entry point (written by an older clip-triton)"
        return [bytes_runner, Skipped(TritonPixelsRunner.name, reason)]
    pixels = TritonPixelsRunner(url, bytes_runner.models, bytes_runner.precision, bytes_runner.runtime)
    return [bytes_runner, pixels]


class TritonRuntime(Runtime):
    name = "triton"
    label = "Triton Inference Server (gRPC, ensembles)"

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        if ctx.url is None:
            return []
        return triton_runners(ctx.url, ctx.section if ctx.section is not None else ctx.manifest.repository)


RUNTIME = register(TritonRuntime())
