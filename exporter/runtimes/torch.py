"""PyTorch: the FP32 reference every other runtime is compared with (CPU), and a CUDA baseline
for the encoder benchmark (the fair comparison for TensorRT). It does not serve."""

from __future__ import annotations

from typing import Any

import numpy as np

from clip_triton.exporter import sources
from clip_triton.exporter.runtimes.base import RunContext, Runner, Runtime, Skipped, TowerBatch, register


def _torch() -> Any:
    import torch

    return torch


def torch_embed(module: Any, inputs: np.ndarray, device: str = "cpu") -> np.ndarray:
    """One forward pass without autograd; float32 numpy out (a CUDA call includes both copies)."""
    torch = _torch()
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(inputs)).to(device)).float().cpu().numpy()


def cuda_missing() -> str | None:
    torch = _torch()
    return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"


class TorchRunner(Runner):
    """open_clip's own module, eager, FP32."""

    def __init__(self, loaded: Any, device: str = "cpu") -> None:
        self.loaded = loaded
        self.device = device
        self.name = "pytorch" if device == "cpu" else f"pytorch-{device}"
        self.label = f"PyTorch eager FP32 ({'CPU' if device == 'cpu' else 'GPU'})"
        self.modules: dict[str, Any] = {}

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else "GPU"
        return f"PyTorch FP32 reference ({self.loaded.name}, {where})"

    def open(self) -> None:
        self.modules = {t: m.to(self.device) for t, m in sources.tower_modules(self.loaded).items()}

    def embed(self, tower: str, batch: TowerBatch) -> np.ndarray:
        return torch_embed(self.modules[tower], batch.tensor, self.device)

    def close(self) -> None:
        if self.device != "cpu":  # both wrappers share loaded.model: give it back to the CPU
            for module in self.modules.values():
                module.to("cpu")
        self.modules = {}


class TorchRuntime(Runtime):
    name = "pytorch"
    label = "PyTorch eager FP32"

    def runners(self, ctx: RunContext) -> list[Runner | Skipped]:
        if ctx.purpose != "bench":
            return []  # in parity PyTorch is the reference, not a stage
        gpu = TorchRunner(ctx.loaded, "cuda")
        why = cuda_missing()
        return [TorchRunner(ctx.loaded), gpu if why is None else Skipped(gpu.name, why, gpu.label)]


RUNTIME = register(TorchRuntime())
