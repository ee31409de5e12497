"""The repository stage: an export folder -> a complete, deployable Triton model repository.

Every config.pbtxt is built as Triton's own `ModelConfig` protobuf and written with
text_format, so a misspelt field cannot be written. Python-backend sources live once in
`model_repository/` and are copied in; encoder files are hard-linked from the export when
they share a filesystem (link_or_copy). The repository is written to a temporary folder and
moved into place (staged_dir): never half-written.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clip_triton.clients import clip_preprocess, contract
from clip_triton.clients.cli_options import option
from clip_triton.exporter import runtimes
from clip_triton.exporter.base import python_deps
from clip_triton.exporter.base.common import (
    INT32_MAX,
    REPOSITORY_SOURCES,
    ClipTritonError,
    Progress,
    check_number,
    link_or_copy,
    staged_dir,
)
from clip_triton.exporter.base.export_inputs import check_export, read_graph
from clip_triton.exporter.base.manifest import TOWERS, Manifest, load_manifest
from clip_triton.exporter.base.pixels import save_normalize_graph
from clip_triton.exporter.base.releases import (
    DEFAULT_MIN_DRIVER,
    TritonRelease,
    choose_release,
    engines_tensorrt,
)
from clip_triton.exporter.base.server import MALLOC_ENV, admin_lock_args

PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("gpu", "cpu")
DEFAULT_QUEUE_DELAY_US = 2000
# Per-item limits of the python steps (docs/limits.md): written into their configs as parameters.
# The image ones are the preprocess model's own defaults (clients/clip_preprocess.py, copied into it).
_IMAGE_DEFAULTS = clip_preprocess.ImageLimits()
DEFAULT_MAX_PIXELS = _IMAGE_DEFAULTS.max_pixels
DEFAULT_MAX_BYTES = _IMAGE_DEFAULTS.max_bytes
DEFAULT_MAX_ASPECT_RATIO = _IMAGE_DEFAULTS.max_aspect_ratio
DEFAULT_MAX_RESIZED_PIXELS = _IMAGE_DEFAULTS.max_resized_pixels
DEFAULT_MAX_CHARS = 100_000
DEFAULT_MAX_REQUEST_SECONDS = 10.0  # both python models' per-request time budget (0: none)
# Their names (RepositoryOptions fields, config parameters, manifest keys), by the python step reading
# them, are the contract's IMAGE_LIMITS, TEXT_LIMITS and REQUEST_LIMITS (clients/contract.py).
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEPS_LOADER = "bundled_deps.py"  # beside each python model.py: puts its deps/ on sys.path
REQUEST_BUDGET = "request_budget.py"  # beside the preprocess and tokenize model.py: max_request_seconds
# /dev/shm of the README's `docker run`: the same as deploy's --shm-size default, 2Gi (tests/test_repository.py).
DOCKER_SHM_SIZE = "2g"


def _pb() -> Any:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@dataclass
class RepositoryOptions:
    """The `repository` command's options: each field is one --option (clients/cli_options.py)."""

    runtime: str = option(
        "tensorrt",
        help=f"One of {', '.join(runtimes.serving_names())} (docs/runtimes.md); tensorrt needs plans.",
    )
    precision: str = option(
        "fp32",
        help="fp32, fp16 or int8 ONNX graphs (onnxruntime/python); tensorrt: fp16 plans, or int8 plans built "
        "from the Q/DQ graphs (docs/int8.md).",
    )
    prefix: str = option(contract.DEFAULT_PREFIX, help="Model name prefix: <prefix>_image, <prefix>_text, ...")
    # The manifest's max_batch, capped by the engine profile, unless given.
    max_batch: int | None = option(None, help="max_batch_size (default: the manifest's, capped by the engines).")
    queue_delay_us: int = option(DEFAULT_QUEUE_DELAY_US, help="Dynamic batching max queue delay (µs).")
    # Off: each request runs as it comes (a latency floor to compare with).
    dynamic_batching: bool = option(True, help="Dynamic batching on every step (off: each request runs alone).")
    instances: int = option(1, help="Instances per encoder and tokenize model.")
    # The preprocess model: one instance whose thread pool spans the serving host's cores (0: found at
    # load time, so a repository written on a laptop uses a 32-core server fully; docs/serving.md).
    preprocess_instances: int = option(
        1, help="Instances of the image preprocess model (each runs its own thread pool)."
    )
    preprocess_threads: int = option(
        0, help="Decode threads per preprocess instance (0: the serving host's cores / instances)."
    )
    device: str | None = option(None, help="gpu or cpu instance groups (default: gpu, cpu for python).")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="Refuse images with more decoded pixels than this.")
    max_bytes: int = option(
        DEFAULT_MAX_BYTES, help="Refuse encoded images over this many bytes (checked before decoding)."
    )
    max_aspect_ratio: float = option(
        DEFAULT_MAX_ASPECT_RATIO, help="Refuse images whose long side / short side exceeds this."
    )
    max_resized_pixels: int = option(
        DEFAULT_MAX_RESIZED_PIXELS,
        help="Refuse images whose resize step (before the crop) would exceed this many pixels.",
    )
    max_chars: int = option(DEFAULT_MAX_CHARS, help="Refuse texts longer than this many characters.")
    max_request_seconds: float = option(
        DEFAULT_MAX_REQUEST_SECONDS,
        help="Fail a request still being preprocessed/tokenized after this many seconds (0: off).",
    )
    copy_files: bool = option(
        False,
        flags=("--copy-files",),
        help="Copy encoder files (default: hard-link them when on one filesystem).",
    )
    # The NVIDIA container it is written for (exporter/base/releases.py, docs/releases.md): default, the one
    # shipping the engines' TensorRT, else the newest one whose driver floor is at most --min-driver.
    # Decides the Python of the bundled wheels (docs/deploy.md).
    triton_release: str | None = option(
        None,
        help="NVIDIA Triton container YY.MM it is for (default: the engines' TensorRT, else the newest for "
        "--min-driver).",
    )
    min_driver: str | None = option(
        None,
        help=f"NVIDIA driver branch the serving nodes have, e.g. 535, 570, 580 (default: {DEFAULT_MIN_DRIVER}): "
        "picks the newest Triton release that runs on it (docs/releases.md).",
    )
    # Bundle the python models' wheels (Pillow, tokenizers, ...) inside the repository, pinned, for the
    # target release's Python, so a stock container serves it with nothing installed at start.
    python_deps: bool = option(
        True, help="Bundle the python models' wheels, pinned, for that release's Python (docs/deploy.md)."
    )
    # E.g. to serve locally.
    deps_python: str | None = option(None, help="Python X.Y of the bundled wheels (default: the release's).")
    deps_arch: str = option("x86_64", help="x86_64 or aarch64 wheels.")  # aarch64: NVIDIA's arm64 / sbsa containers

    def limits(self) -> dict[str, Any]:
        """The per-item limits, by name (IMAGE_LIMITS, then TEXT_LIMITS), then the per-request REQUEST_LIMITS."""
        names = (*contract.IMAGE_LIMITS, *contract.TEXT_LIMITS, *contract.REQUEST_LIMITS)
        return {name: getattr(self, name) for name in names}


def _limit_parameters(opts: RepositoryOptions, names: tuple[str, ...]) -> dict[str, str]:
    """Config parameters for some limits, each written as its default's type (max_aspect_ratio: float)."""
    defaults = RepositoryOptions().limits()
    values = opts.limits()
    return {n: repr(float(values[n])) if isinstance(defaults[n], float) else str(values[n]) for n in names}


def _triton_type(dtype: str) -> str:
    if dtype not in contract.NP_TO_TRITON:
        raise ClipTritonError(f"the manifest records dtype {dtype!r}, which this stage cannot map to Triton")
    return contract.NP_TO_TRITON[dtype]


def _check_options(opts: RepositoryOptions) -> str:
    serving = runtimes.serving(opts.runtime)
    if opts.precision not in PRECISIONS:
        raise ClipTritonError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    device = opts.device or serving.devices[0]
    if device not in DEVICES:
        raise ClipTritonError(f"--device must be gpu or cpu, got {device!r}")
    serving.check_device(opts.runtime, device)
    if not opts.prefix or not all(c.isalnum() or c in "_-" for c in opts.prefix):
        raise ClipTritonError(f"--prefix must be letters, digits, '_' or '-', got {opts.prefix!r}")
    # Config fields are protobuf int32/uint64: out of range would be a traceback at the write.
    check_number("--max-batch", opts.max_batch, 1, INT32_MAX)
    check_number("--queue-delay-us", opts.queue_delay_us, 0, INT32_MAX)
    check_number("--instances", opts.instances, 1, INT32_MAX)
    check_number("--preprocess-instances", opts.preprocess_instances, 1, INT32_MAX)
    check_number("--preprocess-threads", opts.preprocess_threads, 0, INT32_MAX, note="0: the serving host's cores")
    for name, value in opts.limits().items():
        # 0 turns a limit off; an aspect ratio (long side / short side) under 1 would refuse every image.
        check_number("--" + name.replace("_", "-"), value, 1 if name == "max_aspect_ratio" else 0, off=0)
    return device


def _max_batch(manifest: Manifest, opts: RepositoryOptions) -> int:
    wanted = opts.max_batch if opts.max_batch is not None else manifest.max_batch
    return runtimes.serving(opts.runtime).max_batch(manifest, int(wanted), explicit=opts.max_batch is not None)


def _encoder_files(export_dir: Path, manifest: Manifest, opts: RepositoryOptions) -> dict[str, Path]:
    """tower -> the export artifact the runtime serves (manifest.ARTIFACTS, as the manifest records it)."""
    serving = runtimes.serving(opts.runtime)
    names = manifest.artifacts(*serving.artifact(opts.precision))
    files = {tower: export_dir / name for tower, name in names.items()}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise ClipTritonError(f"{export_dir} has no {', '.join(missing)}: {serving.missing_hint(opts.precision)}")
    return files


def _external_data(path: Path) -> list[Path]:
    """Sidecar files an ONNX graph refers to (external weights), read without loading any weights."""
    return [path.parent / loc for loc in sorted(set(read_graph(path).external.values()))]


def _place_onnx(src: Path, version_dir: Path, copy: bool) -> None:
    """1/model.onnx: the graph itself, or a folder holding the graph and its external data."""
    sidecars = _external_data(src)
    if not sidecars:
        link_or_copy(src, version_dir / "model.onnx", copy)
        return
    folder = version_dir / "model.onnx"
    folder.mkdir()
    link_or_copy(src, folder / "model.onnx", copy)
    for sidecar in sidecars:
        if not sidecar.is_file():
            raise ClipTritonError(f"{src.name} refers to external data {sidecar.name}, which is missing")
        link_or_copy(sidecar, folder / sidecar.name, copy)


def _tensor(pb: Any, name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": pb.DataType.Value(dtype), "dims": dims}


def _base_config(
    pb: Any, name: str, max_batch: int, opts: RepositoryOptions, kind: str, instances: int | None = None
) -> Any:
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if opts.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    count = opts.instances if instances is None else instances
    config.instance_group.add(count=count, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    return config


def _set_params(config: Any, params: dict[str, str]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = value


def _model_parameters(manifest: Manifest) -> dict[str, str]:
    params = {
        contract.PARAM_MODEL_NAME: manifest.model_name,
        contract.PARAM_EMBED_DIM: str(manifest.embed_dim),
        contract.PARAM_LOGIT_SCALE: repr(manifest.logit_scale),
        contract.PARAM_IMAGE_ENCODER_SHA256: manifest.files.get(manifest.image.file, {}).get("sha256", ""),
        contract.PARAM_TEXT_ENCODER_SHA256: manifest.files.get(manifest.text.file, {}).get("sha256", ""),
    }
    if manifest.logit_bias is not None:
        params[contract.PARAM_LOGIT_BIAS] = repr(manifest.logit_bias)
    return params


PIXEL_MARGIN = 10.0  # beyond what mean/std allow: room for other pipelines, far below float32 overflow


def _valid_range(manifest: Manifest, tower: str) -> str:
    if tower == "text":
        return f"0,{manifest.tokenizer.vocab_size}"
    pre = manifest.preprocess
    ends = [(edge - m) / s for m, s in zip(pre.mean, pre.std, strict=True) for edge in (0.0, 1.0)]
    return f"{min(ends) - PIXEL_MARGIN:.6g},{max(ends) + PIXEL_MARGIN:.6g}"


def build_configs(manifest: Manifest, opts: RepositoryOptions, max_batch: int, device: str) -> dict[str, Any]:
    """The eight ModelConfig protobufs, keyed by role (see contract.model_names)."""
    pb = _pb()
    names = contract.model_names(opts.prefix)
    encoder_kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    h, w = manifest.preprocess.size
    dim = manifest.embed_dim
    img_in, txt_in = manifest.image.input, manifest.text.input
    img_out, txt_out = manifest.image.output, manifest.text.output
    img_dims = list(img_in.shape[1:])
    txt_dims = list(txt_in.shape[1:])
    configs: dict[str, Any] = {}

    # Python steps: CPU work (PIL, BPE) whatever --device says; scale them with --instances.
    pre = _base_config(pb, names["image_preprocess"], max_batch, opts, "KIND_CPU", opts.preprocess_instances)
    pre.backend = "python"
    pre.input.add(**_tensor(pb, contract.IMAGE_TENSOR.name, contract.IMAGE_TENSOR.config_type, [1]))
    pre.output.add(**_tensor(pb, img_in.name, _triton_type(img_in.dtype), img_dims))
    preprocess_params = {
        contract.PARAM_PREPROCESS: json.dumps(asdict(manifest.preprocess)),
        **_limit_parameters(opts, contract.IMAGE_LIMITS),
    }
    _set_params(
        pre,
        {
            **preprocess_params,
            **_limit_parameters(opts, contract.REQUEST_LIMITS),
            contract.PARAM_OUTPUT_NAME: img_in.name,
            contract.PARAM_THREADS: str(opts.preprocess_threads),
        },
    )
    configs["image_preprocess"] = pre

    # The pixels entry point's first step: uint8 HWC -> the encoder's normalised CHW input, an ONNX
    # graph (exporter/base/pixels.py) on ONNX Runtime beside the encoder: no python per image on that path.
    norm = _base_config(pb, names["image_normalize"], max_batch, opts, encoder_kind)
    norm.backend = "onnxruntime"
    norm.input.add(**_tensor(pb, contract.PIXELS_TENSOR.name, contract.PIXELS_TENSOR.config_type, [h, w, 3]))
    norm.output.add(**_tensor(pb, img_in.name, _triton_type(img_in.dtype), img_dims))
    # Five elementwise ops on one crop take under a millisecond: one thread, so no ONNX Runtime thread pool
    # spins on the cores the encoder and the preprocess pool need (Triton onnxruntime backend parameters).
    _set_params(norm, {contract.PARAM_INTRA_OP_THREAD_COUNT: "1", contract.PARAM_INTER_OP_THREAD_COUNT: "1"})
    configs["image_normalize"] = norm

    tok = _base_config(pb, names["text_tokenize"], max_batch, opts, "KIND_CPU")
    tok.backend = "python"
    tok.input.add(**_tensor(pb, contract.TEXT_TENSOR.name, contract.TEXT_TENSOR.config_type, [1]))
    tok.output.add(**_tensor(pb, txt_in.name, _triton_type(txt_in.dtype), txt_dims))
    _set_params(
        tok,
        {
            contract.PARAM_TOKENIZER: json.dumps(asdict(manifest.tokenizer)),
            contract.PARAM_OUTPUT_NAME: txt_in.name,
            contract.PARAM_OUTPUT_DTYPE: txt_in.dtype,
            **_limit_parameters(opts, contract.TEXT_LIMITS),
            **_limit_parameters(opts, contract.REQUEST_LIMITS),
        },
    )
    configs["text_tokenize"] = tok

    for tower, spec_in, spec_out, dims in (
        ("image", img_in, img_out, img_dims),
        ("text", txt_in, txt_out, txt_dims),
    ):
        enc = _base_config(pb, names[f"{tower}_encoder"], max_batch, opts, encoder_kind)
        runtimes.serving(opts.runtime).configure(enc, opts.precision)
        # Inputs no client of the ensembles can produce, refused by the encoder (python runtime; the
        # real backends ignore the parameter, see docs/limits.md): token ids outside the embedding
        # table fault the runtime; pixels far outside the normalised range overflow to NaN.
        _set_params(enc, {contract.PARAM_VALID_RANGE: _valid_range(manifest, tower)})
        enc.input.add(**_tensor(pb, spec_in.name, _triton_type(spec_in.dtype), dims))
        enc.output.add(**_tensor(pb, spec_out.name, _triton_type(spec_out.dtype), [dim]))
        configs[f"{tower}_encoder"] = enc

    embedding = contract.EMBEDDING_TENSOR
    for role, tower, first, public_dims, mid in (
        ("image", "image", "image_preprocess", [1], img_in),
        ("image_pixels", "image", "image_normalize", [h, w, 3], img_in),
        ("text", "text", "text_tokenize", [1], txt_in),
    ):
        public = contract.ENSEMBLE_INPUTS[role]
        # Ensembles carry no instance_group (Triton rejects one; server#4341) and no batching of
        # their own: the steps batch.
        ens = pb.ModelConfig(name=names[role], platform="ensemble", max_batch_size=max_batch)
        ens.input.add(**_tensor(pb, public.name, public.config_type, public_dims))
        ens.output.add(**_tensor(pb, embedding.name, embedding.config_type, [dim]))
        step1 = ens.ensemble_scheduling.step.add(model_name=names[first], model_version=-1)
        step1.input_map[public.name] = public.name
        step1.output_map[mid.name] = mid.name
        spec_out = manifest.tower(tower).output
        step2 = ens.ensemble_scheduling.step.add(model_name=names[f"{tower}_encoder"], model_version=-1)
        step2.input_map[mid.name] = mid.name
        step2.output_map[spec_out.name] = embedding.name
        # What clients need for zero-shot scores, readable from the server alone (no manifest); the
        # pixels entry point adds the transform and limits a client must apply to crop as the server would.
        served = {contract.PARAM_RUNTIME: opts.runtime, contract.PARAM_PRECISION: opts.precision}
        pixels = preprocess_params if role == "image_pixels" else {}
        _set_params(ens, {**_model_parameters(manifest), **served, **pixels})
        configs[role] = ens
    return configs


def config_text(config: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def _copy_sources(dest: Path, model_file: str, commons: list[str]) -> None:
    if not (REPOSITORY_SOURCES / model_file).is_file():
        raise ClipTritonError(f"python model source {REPOSITORY_SOURCES / model_file} is missing (broken install?)")
    shutil.copy2(REPOSITORY_SOURCES / model_file, dest / "model.py")
    for name in commons:
        shutil.copy2(REPOSITORY_SOURCES / "common" / name, dest / name)








def _readme(
    manifest: Manifest,
    opts: RepositoryOptions,
    max_batch: int,
    device: str,
    dest: Path,
    row: TritonRelease,
    target: python_deps.Target | None,
    reason: str = "",
) -> str:
    names = contract.model_names(opts.prefix)
    h, w = manifest.preprocess.size
    trt = engines_tensorrt(manifest)
    weights = (
        f"pretrained tag `{manifest.pretrained}`"
        if manifest.pretrained
        else f"checkpoint sha256 `{manifest.checkpoint['sha256'][:16]}…`"
        if manifest.checkpoint
        else f"RANDOM weights (seed {manifest.seed}): embeddings are meaningless"
    )
    parity_lines = []
    for tower in TOWERS:
        rec = manifest.export_parity.get(tower) or {}
        if "min_cosine" in rec:
            parity_lines.append(
                f"- export, {tower} tower, ONNX Runtime FP32 vs PyTorch: min cosine {rec['min_cosine']:.7f}"
            )
    for section in ("fp16", "engines", "parity"):
        data = getattr(manifest, section) or {}
        for tower in TOWERS:
            rec = data.get(tower) if isinstance(data.get(tower), dict) else None
            if rec and "min_cosine" in rec:
                parity_lines.append(f"- {section}, {tower}: min cosine {rec['min_cosine']:.7f}")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.versions.items()))
    shipped = f"tritonserver {row.triton}, TensorRT {row.tensorrt or 'not confirmed'}, Python {row.python}"
    release_note = f"Written for `{row.image}` ({shipped}; chosen: {reason})" + (
        f": it ships the TensorRT that built the engines ({trt}); another release will not deserialize the plans."
        if trt
        else "; another release works if its Python matches the bundled wheels (rewrite with --triton-release, "
        "or --min-driver for the newest your nodes' driver runs)."
    )
    on_gpu = device == "gpu"
    # Only a repository with GPU instances needs the GPU, and with it the driver floor (docs/releases.md).
    if on_gpu:
        host = (
            f"On a GPU host, NVIDIA's Triton container. The GPU nodes need {row.driver_note}; "
            "data-center GPUs on an older LTS branch can run it with NVIDIA's CUDA forward-compatibility package."
        )
        gpus = "--gpus all "
    else:
        host = "On any host, NVIDIA's Triton container: the models run on CPU instances, no GPU or driver needed."
        gpus = ""
    image, pixels, text = contract.IMAGE_TENSOR, contract.PIXELS_TENSOR, contract.TEXT_TENSOR
    out = contract.EMBEDDING_TENSOR
    emb = f"`{out.name}` {out.datatype} [{manifest.embed_dim}], L2-normalised"
    ids = f"{manifest.text.input.dtype.upper()} [{manifest.tokenizer.context_length}]"
    rows = [
        "| model | input | output |",
        "|---|---|---|",
        f"| `{names['image']}` (ensemble) | `{image.name}` {image.config_type} [1]: encoded JPEG/PNG/WebP/BMP/GIF "
        f"bytes | {emb} |",
        f"| `{names['image_pixels']}` (ensemble) | `{pixels.name}` {pixels.config_type} [{h},{w},3]: RGB, already "
        f'resized and cropped (ClipClient(preprocess="client")) | {emb} |',
        f"| `{names['text']}` (ensemble) | `{text.name}` {text.config_type} [1]: UTF-8 | {emb} |",
        f"| `{names['image_preprocess']}` (python) | `{image.name}` | `{manifest.image.input.name}` FP32 [3,H,W] |",
        f"| `{names['image_normalize']}` (onnxruntime) | `{pixels.name}` | `{manifest.image.input.name}` FP32 |",
        f"| `{names['text_tokenize']}` (python) | `{text.name}` | `{manifest.text.input.name}` {ids} |",
        f"| `{names['image_encoder']}`, `{names['text_encoder']}` ({opts.runtime}) | ids / pixels | `{out.name}` |",
    ]
    table = "\n".join(rows)
    pip = " ".join(sorted({p for wanted in _python_packages(manifest, opts).values() for p in wanted}))
    # Triton's HTTP front on the container's loopback (health only), admin APIs locked by a key nobody
    # is given (docs/limits.md, "The public surface").
    start = " ".join(
        [
            "tritonserver --model-repository=/models --grpc-infer-allocation-pool-size=0 --http-address=127.0.0.1",
            *admin_lock_args("$(openssl rand -hex 16)"),
        ]
    )
    malloc_env = " ".join(f"-e {name}={value}" for name, value in MALLOC_ENV.items())
    if target is not None:
        deps_note = (
            f"The python models carry their wheels (`<model>/1/deps/`: {pip}, pinned, for Python "
            f"{target.python}): nothing is installed at start, and the container needs no network."
        )
    else:
        start = f'bash -c "pip install {pip} && {start}"'
        deps_note = f"Written with --no-python-deps: the python models need `{pip}` installed in the container."
    batching = (
        f"dynamic batching queue delay: {opts.queue_delay_us} µs" if opts.dynamic_batching else "dynamic batching off"
    )
    return f"""# Triton model repository: {manifest.model_name}

Written by `clip-triton repository` on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.

- model: `{manifest.model_name}`, {weights}
- runtime: `{opts.runtime}`, precision: `{opts.precision}`, device: `{device}`, max batch size: {max_batch},
  {batching}, instances per step: {opts.instances}
- image: {manifest.preprocess.size[0]}x{manifest.preprocess.size[1]}, resize `{manifest.preprocess.resize_mode}`,
  `{manifest.preprocess.interpolation}`, mean {manifest.preprocess.mean}, std {manifest.preprocess.std}
- tokenizer: `{manifest.tokenizer.kind}`, context length {manifest.tokenizer.context_length}
- versions: {versions}
- `manifest.json` (copied here) is the full record.

## Models (the public API is the three ensembles)
{table}

Two entry points for images, the same embeddings:
- `{names["image"]}` takes encoded bytes; the server decodes and resizes (python, a thread pool of
  {opts.preprocess_threads or "all the host's"} threads per instance, {opts.preprocess_instances} instance(s)).
- `{names["image_pixels"]}` takes the crop itself: open_clip's transform up to and including the
  crop, uint8 RGB. Its config's parameters (`preprocess`, limits) say how; `ClipClient(preprocess="client")`
  runs the server's own code (clients/clip_preprocess.py). The server only normalises (ONNX) and encodes.

Token ids are **INT32**, not INT64: open_clip pools the text tower with ArgMax over the ids, ONNX
Runtime has no int64 ArgMax kernel and TensorRT before 10 took no int64 inputs. Images larger than
{opts.max_pixels / 1e6:g} megapixels are refused (parameter `max_pixels` of the preprocess model).
The python steps (preprocess, tokenize) run on CPU instances whatever the device.

## Parity (from the manifest)
{chr(10).join(parity_lines) or "- none recorded yet: run `clip-triton parity`"}

## Serve it
Locally, no Docker, no GPU (the tritonserver shipped in nvidia-pytriton; python runtime or
onnxruntime runtime on CPU):

    clip-triton serve --repository {dest}

{host} {release_note}

    docker run {gpus}--rm --shm-size={DOCKER_SHM_SIZE} -p 8001:8001 -p 8002:8002 {malloc_env} \\
      --health-cmd "python3 /models/health_probe.py" --health-interval 10s \\
      -v "$PWD/{dest.name}":/models:ro {row.image} \\
      {start}

gRPC (8001) is the client API; Triton's HTTP/JSON front stays inside the container (its parser has
faults a client can trigger), where `health_probe.py` sends one tiny request through each ensemble:
Triton's own readiness stays 200 while a dead python stub fails every request.

{deps_note}
Kubernetes or KServe: `clip-triton deploy --repository {dest.name} --out manifests/` writes the manifests.
"""


def _python_packages(manifest: Manifest, opts: RepositoryOptions) -> dict[str, list[str]]:
    """Role -> the packages its python model imports (beyond numpy, which the container has)."""
    packages = {
        "image_preprocess": ["pillow"],
        "text_tokenize": ["ftfy", "regex", *(["tokenizers"] if manifest.tokenizer.kind == "hf" else [])],
    }
    serving = runtimes.serving(opts.runtime)
    if serving.python_source is not None:
        for role in ("image_encoder", "text_encoder"):
            packages[role] = list(serving.pip)
    return packages


def _bundle_python_deps(
    repo: Path,
    names: dict[str, str],
    packages: dict[str, list[str]],
    target: python_deps.Target | None,
    progress: Progress,
) -> dict[str, Any] | None:
    """Fetch each python model's pinned wheels for `target` and place them in `<model>/1/deps`."""
    if target is None:
        return None
    placed: dict[str, dict[str, str]] = {}
    with progress.step(f"fetching the python models' wheels for Python {target.python} ({target.arch})"):
        for role, wanted in packages.items():
            cached = python_deps.fetch(python_deps.pins(wanted), target)
            placed[names[role]] = python_deps.place(cached, repo / names[role] / "1")
    return {"python": target.python, "arch": target.arch, "models": placed}


def write_repository(
    export_dir: Path,
    out: Path,
    opts: RepositoryOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write the repository for `export_dir` into `out` (atomically); returns `out`."""
    opts = opts or RepositoryOptions()
    progress = progress or Progress("repository", quiet=True)
    export_dir = Path(export_dir)
    out = Path(out)
    manifest = load_manifest(export_dir)
    device = _check_options(opts)
    # Every file the manifest names inside the export, and the graphs served checked against it: before
    # anything is written (exporter/base/export_inputs.py).
    check_export(export_dir, manifest, [runtimes.serving(opts.runtime).artifact(opts.precision)])
    if manifest.tokenizer.kind not in ("clip", "hf"):
        raise ClipTritonError(f"tokenizer kind {manifest.tokenizer.kind!r} cannot be served by the tokenize model")
    if manifest.tokenizer.kind == "hf" and not (
        manifest.tokenizer.hf_file and (export_dir / manifest.tokenizer.hf_file).is_file()
    ):
        raise ClipTritonError(
            "this model's Hugging Face tokenizer file is not in the export folder; re-export with "
            "--tokenizer-file tokenizer.json"
        )
    if export_dir.resolve() == out.resolve() or export_dir.resolve() in out.resolve().parents:
        raise ClipTritonError("--out must not be the export folder or inside it")
    files = _encoder_files(export_dir, manifest, opts)
    release, reason = choose_release(manifest, opts.triton_release, opts.min_driver)
    target = python_deps.Target.for_release(release, opts.deps_python, opts.deps_arch) if opts.python_deps else None
    max_batch = _max_batch(manifest, opts)
    configs = build_configs(manifest, opts, max_batch, device)
    names = contract.model_names(opts.prefix)
    needs = release.driver_note if device == "gpu" else "CPU instances, no GPU driver needed"
    progress.info(f"Triton {release.release} ({release.image}; {reason}): {needs}")
    with staged_dir(out, force=force) as tmp:
        with progress.step(f"writing {len(configs)} models ({opts.runtime}, {opts.precision}) to {out}"):
            for role, config in configs.items():
                model_dir = tmp / names[role]
                version = model_dir / "1"
                version.mkdir(parents=True)
                text = config_text(config)
                parse_config(text)  # round trip: what we write is what Triton will read
                (model_dir / "config.pbtxt").write_text(text)
                if role == "image_preprocess":
                    _copy_sources(version, "image_preprocess/model.py", [DEPS_LOADER, REQUEST_BUDGET])
                    shutil.copy2(clip_preprocess.__file__, version / "clip_preprocess.py")
                elif role == "image_normalize":
                    spec = manifest.image.input
                    save_normalize_graph(version / "model.onnx", manifest.preprocess, spec.name, spec.dtype)
                elif role == "text_tokenize":
                    _copy_sources(
                        version, "text_tokenize/model.py", ["clip_tokenizer.py", BPE_FILE, DEPS_LOADER, REQUEST_BUDGET]
                    )
                    if manifest.tokenizer.kind == "hf":
                        hf = manifest.tokenizer.hf_file or ""
                        shutil.copy2(export_dir / hf, version / hf)
                elif role.endswith("_encoder"):
                    serving = runtimes.serving(opts.runtime)
                    src = files[role.split("_")[0]]
                    if serving.fmt == "onnx":
                        _place_onnx(src, version, opts.copy_files)
                    else:
                        link_or_copy(src, version / serving.model_file, opts.copy_files)
                    if serving.python_source is not None:
                        _copy_sources(version, serving.python_source, [DEPS_LOADER])
        bundled = _bundle_python_deps(tmp, names, _python_packages(manifest, opts), target, progress)
        record = {
            "runtime": opts.runtime,
            "precision": opts.precision,
            "prefix": opts.prefix,
            "path": str(out.resolve()),
            "device": device,
            "max_batch_size": max_batch,
            "queue_delay_us": opts.queue_delay_us,
            "dynamic_batching": opts.dynamic_batching,
            "instances": opts.instances,
            "preprocess_instances": opts.preprocess_instances,
            "preprocess_threads": opts.preprocess_threads,
            "max_pixels": opts.max_pixels,
            "limits": opts.limits(),
            "models": names,
            "triton_release": release.release,
            "triton_image": release.image,
            # Why that release, and the driver its GPU nodes need (docs/releases.md; None: not confirmed).
            "triton_release_reason": reason,
            "triton_cuda": release.cuda,
            "triton_min_driver": release.driver,
            # Per python model, the wheels it carries (None: --no-python-deps; docs/deploy.md).
            "python_deps": bundled,
            # The public API: what a client sends to each ensemble (docs/serving.md).
            "entry_points": {
                names["image"]: f"{contract.IMAGE_INPUT}: encoded image bytes ({contract.TYPE_STRING} [1])",
                names["image_pixels"]: f"{contract.PIXELS_INPUT}: the crop, uint8 RGB [{manifest.preprocess.size[0]}, "
                f"{manifest.preprocess.size[1]}, 3] (ClipClient(preprocess='client'))",
                names["text"]: f"{contract.TEXT_INPUT}: UTF-8 ({contract.TYPE_STRING} [1])",
            },
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest.repository = record
        manifest.save(tmp)
        shutil.copy2(REPOSITORY_SOURCES / "health_probe.py", tmp / "health_probe.py")
        (tmp / "README.md").write_text(_readme(manifest, opts, max_batch, device, out, release, target, reason))
    # The record lives in the repository's own manifest.json: the export (another stage's artifact) is
    # left byte-identical (docs/parity.md, "What parity tests").
    progress.info(f"repository {out}: {', '.join(sorted(names.values()))}")
    return out
