"""The export stage: image and text towers -> two ONNX graphs (dynamic batch) + manifest.json.

Each graph ends in the L2 normalisation, so every runtime serves unit-length embeddings.
Token ids are INT32: open_clip pools the text tower with `argmax` over the ids, ONNX Runtime
has no int64 ArgMax kernel (onnxruntime#10068) and TensorRT before 10 had no int64 inputs;
int32 holds every vocabulary we know (< 2**31).
"""

from __future__ import annotations

import functools
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.exporter.base.common import (
    INT32_MAX,
    ClipTritonError,
    Progress,
    check_number,
    release_memory,
    staged_dir,
)
from clip_triton.exporter.base.manifest import ARTIFACTS, TOWERS, Manifest, TensorSpec, TowerSpec, file_record
from clip_triton.exporter.base.onnx_weights import (
    EXTERNAL_DATA_BYTES,
    inline_attribute_tensors,
    record_sources,
    save_inline,
    save_with_sidecar,
    write_weights,
)
from clip_triton.exporter.parity.gate import (
    VERIFY_BATCHES,
    References,
    compare_references,
    gate_towers,
    torch_references,
)
from clip_triton.exporter.parity.samples import TOKEN_DTYPE, sample_inputs
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from clip_triton.exporter.sources import LoadedModel, release_tower, tower_modules, tower_parameter_bytes

DEFAULT_OPSET = 18
EXPORT_MIN_COSINE = 0.99999
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixel_values", "input_ids", "embedding"

def _export_graph(
    module: Any,
    example: np.ndarray,
    path: Path,
    input_name: str,
    opset: int,
    exporter: str,
) -> str:
    """torch.onnx.export one tower to `path`; returns the exporter that succeeded.

    Each tower is exported into a scratch folder of its own: a large graph's exporter writes many
    weight files, and they must never be confused with the other tower's.
    """
    import torch

    example_t = torch.from_numpy(example)
    dynamic_axes = {input_name: {0: "batch"}, OUTPUT: {0: "batch"}}
    scratch = path.parent / f".{path.stem}-raw"
    raw = scratch / path.name
    tried = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    errors = []
    for kind in tried:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            # Tracer/indexing warnings are expected for these graphs and drown the progress lines;
            # correctness is checked afterwards by ONNX Runtime vs PyTorch, not by these warnings.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                if kind == "dynamo":
                    torch.onnx.export(
                        module,
                        (example_t,),
                        str(raw),
                        input_names=[input_name],
                        output_names=[OUTPUT],
                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                        opset_version=opset,
                        dynamo=True,
                        external_data=True,
                    )
                else:
                    torch.onnx.export(
                        module,
                        (example_t,),
                        str(raw),
                        input_names=[input_name],
                        output_names=[OUTPUT],
                        dynamic_axes=dynamic_axes,
                        opset_version=opset,
                        do_constant_folding=True,
                        dynamo=False,
                    )
            _place_graph(raw, path)
            _check_graph(path, input_name)
            return kind
        except Exception as exc:  # noqa: BLE001 - fall through to the next exporter
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            for stale in path.parent.glob(path.name + "*"):
                stale.unlink()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    raise ClipTritonError(f"could not export {path.name}: " + " | ".join(errors))


def _check_graph(path: Path, input_name: str) -> None:
    import onnx

    # Full check (shape inference included); by path, so graphs with external data work.
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs != [OUTPUT]:
        raise ValueError(f"unexpected graph interface: inputs {inputs}, outputs {outputs}")
    if len(set(n for node in model.graph.node for n in node.output if n)) != sum(
        1 for node in model.graph.node for n in node.output if n
    ):
        raise ValueError("graph has duplicate output names")


def _place_graph(raw: Path, path: Path) -> None:
    """Move an exported graph into place: one file below 2 GB, else one `<name>.data` sidecar."""
    import onnx

    written = [f for f in raw.parent.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in written)
    if written == [raw] and size <= EXTERNAL_DATA_BYTES:
        raw.replace(path)  # the common case: already a single self-contained file
        return
    # Streamed, never loaded whole (exporter/base/onnx_weights.py): the tower's PyTorch weights are still
    # in memory here, and ViT-bigG's image tower alone is 7 GiB.
    model = onnx.load(str(raw), load_external_data=False)
    inline_attribute_tensors(model, raw.parent)
    sources = record_sources(model, raw.parent)
    if not sources:  # one self-contained file over our limit (under protobuf's 2 GiB, or it would not parse)
        save_with_sidecar(model, path)
        return
    if size <= EXTERNAL_DATA_BYTES:
        save_inline(model, path, raw.parent)
        return
    write_weights(model, sources, path.with_name(path.name + ".data"), lambda values: values)
    onnx.save_model(model, str(path))  # the skeleton: its initializers point at the sidecar


MIN_OPSET = 7  # the oldest opset torch.onnx writes


def check_export_options(opset: int, max_batch: int, exporter: str) -> None:
    """The export's own options (`export`, and `build` before any work): one line each, exit 2."""
    import onnx

    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ClipTritonError("--exporter must be auto, dynamo or torchscript")
    check_number("--opset", opset, MIN_OPSET, onnx.defs.onnx_opset_version(), note=f"this onnx {onnx.__version__}")
    check_number("--max-batch", max_batch, 1, INT32_MAX)  # Triton's max_batch_size is an int32


def verify_graph(path: Path, references: References) -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch references at each batch size; the worst figures across them."""
    session = ort_session(path)
    record = compare_references(references, functools.partial(ort_embed, session))
    del session
    release_memory()
    return record


# What exporting a tower adds over the weights already alive, per byte of its FP32 weights
# (measured with benchmarks/memory.py, docs/engines.md "Memory"): TorchScript builds a graph under
# protobuf's 2 GiB in memory (folded weight copies, the C++ ModelProto, its serialised bytes: ~3x);
# a larger one is written out weight by weight as it goes (~0.5x).
EXPORT_COST_INLINE, EXPORT_COST_EXTERNAL = 3.0, 0.5
PROTOBUF_LIMIT = 2**31


def plan_export_order(sizes: dict[str, int]) -> tuple[str, ...]:
    """The tower order whose estimated peak is lower: the first tower is exported with both towers'
    weights alive, the second with only its own (the first's are released)."""

    def cost(tower: str) -> float:
        return sizes[tower] * (EXPORT_COST_INLINE if sizes[tower] < PROTOBUF_LIMIT else EXPORT_COST_EXTERNAL)

    def peak(order: tuple[str, ...]) -> float:
        first, second = order
        return max(sizes[first] + sizes[second] + cost(first), sizes[second] + cost(second))

    return min((TOWERS, TOWERS[::-1]), key=peak)


def export_order(loaded: LoadedModel, release_model: bool) -> tuple[str, ...]:
    """Towers in export order: with `release_model`, the order with the lower estimated peak."""
    return plan_export_order(tower_parameter_bytes(loaded)) if release_model else TOWERS


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    import clip_triton

    return {
        "clip_triton": clip_triton.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export_model(
    loaded: LoadedModel,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 128,
    exporter: str = "torchscript",
    min_cosine: float = EXPORT_MIN_COSINE,
    force: bool = False,
    progress: Progress | None = None,
    release_model: bool = False,
) -> Manifest:
    """Export both towers into `out` (atomically), verify them, and write the manifest.

    `release_model=True` holds one tower at a time (docs/engines.md, "Memory"): the towers go in
    `plan_export_order`'s order, and each tower's weights are dropped from `loaded.model` once its
    graph is written and its PyTorch references computed. ONNX Runtime checks both graphs
    afterwards, with no PyTorch weights alive. The caller cannot use `loaded.model` afterwards; the CLI's export does
    not need it.
    """
    progress = progress or Progress("export", quiet=True)
    check_export_options(opset, max_batch, exporter)
    modules = tower_modules(loaded)
    files = ARTIFACTS[("onnx", "fp32")]
    inputs = {"image": IMAGE_INPUT, "text": TEXT_INPUT}
    h, w = loaded.preprocess.size
    shapes = {"image": [-1, 3, h, w], "text": [-1, loaded.tokenizer_cfg.context_length]}
    dtypes = {"image": "float32", "text": TOKEN_DTYPE}
    used: dict[str, str] = {}
    timings: dict[str, float] = {}
    references: dict[str, References] = {}
    batches = " and ".join(map(str, VERIFY_BATCHES))
    with staged_dir(out, force=force) as tmp:
        order = export_order(loaded, release_model)
        for tower in order:
            start = time.perf_counter()
            with progress.step(f"{tower} tower -> {files[tower]}"):
                # Batch 2: a batch of 1 lets the tracer specialise the batch axis.
                example = sample_inputs(loaded, tower, 2)
                used[tower] = _export_graph(modules[tower], example, tmp / files[tower], inputs[tower], opset, exporter)
                release_memory()
            timings[tower] = round(time.perf_counter() - start, 2)
            with progress.step(f"{tower} tower: PyTorch reference embeddings (batch {batches})"):
                references[tower] = torch_references(modules[tower], loaded, tower)
                if release_model:  # this tower's weights are done with
                    del modules[tower]
                    release_tower(loaded, tower)
        # ONNX Runtime checks come last: with release_model no PyTorch weights are alive beside a
        # session (the first tower's session would otherwise sit on top of the second tower's weights).
        def check(tower: str) -> dict[str, Any]:
            with progress.step(f"{tower} tower: ONNX Runtime vs PyTorch (batch {batches})"):
                return verify_graph(tmp / files[tower], references.pop(tower))

        parity = gate_towers(
            check,
            stage="export",
            threshold=min_cosine,
            compared_with="ONNX Runtime vs PyTorch",
            progress=progress,
            order=order,
        )
        timings = {tower: timings[tower] for tower in TOWERS}
        manifest = Manifest(
            model_name=loaded.name,
            source=loaded.source,
            pretrained=loaded.pretrained,
            checkpoint=loaded.checkpoint,
            random_weights=loaded.random_weights,
            seed=loaded.seed,
            embed_dim=loaded.embed_dim,
            logit_scale=loaded.logit_scale,
            logit_bias=loaded.logit_bias,
            model_config=loaded.model_config,
            builtin_sha256=loaded.builtin_sha256,
            image_size=[h, w],
            preprocess=loaded.preprocess,
            tokenizer=loaded.tokenizer_cfg,
            image=TowerSpec(
                file=files["image"],
                input=TensorSpec(IMAGE_INPUT, dtypes["image"], shapes["image"]),
                output=TensorSpec(OUTPUT, "float32", [-1, loaded.embed_dim]),
            ),
            text=TowerSpec(
                file=files["text"],
                input=TensorSpec(TEXT_INPUT, dtypes["text"], shapes["text"]),
                output=TensorSpec(OUTPUT, "float32", [-1, loaded.embed_dim]),
            ),
            opset=opset,
            max_batch=max_batch,
            exporter=used["image"] if used["image"] == used["text"] else f"image:{used['image']},text:{used['text']}",
            versions=versions(),
            export_parity={"threshold": min_cosine, "seconds": timings, **parity},
        )
        manifest.files = {
            p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.name.startswith(("image_", "text_"))
        }
        if loaded.tokenizer_cfg.hf_file and loaded.tokenizer is not None:
            src = Path(getattr(loaded.tokenizer, "path", ""))
            if src.is_file():
                (tmp / loaded.tokenizer_cfg.hf_file).write_bytes(src.read_bytes())
        manifest.save(tmp)
    return manifest
