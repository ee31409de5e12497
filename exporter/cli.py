"""`clip-triton`: a thin Typer front end. Each command parses options and calls one stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clip_triton.clients.errors import ClipClientError
from clip_triton.exporter.base.common import INT32_MAX, ClipTritonError, Progress, check_number, os_error_message
from clip_triton.exporter.runtimes import serving_names

app = typer.Typer(
    name="clip-triton",
    help="Export OpenCLIP models to ONNX / FP16 / TensorRT and serve them from a Triton repository.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Export OpenCLIP models to ONNX / FP16 / TensorRT and serve them from a Triton repository."""


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Silence progress lines (warnings still show).")]
# Options shared by `export` and `build`: where the weights come from and how images are preprocessed.
ModelName = Annotated[str, typer.Option(help="open_clip architecture name, e.g. ViT-B-32.")]
Pretrained = Annotated[str | None, typer.Option(help="open_clip pretrained tag (downloads).")]
Checkpoint = Annotated[Path | None, typer.Option(help="Local state-dict file to load.")]
RandomWeights = Annotated[bool, typer.Option("--random-weights", help="Random weights (offline tests, demos).")]
Seed = Annotated[int, typer.Option(help="Torch seed for --random-weights.")]
Opset = Annotated[int, typer.Option(help="ONNX opset.")]
PreprocessFrom = Annotated[
    str | None, typer.Option(help="Take preprocessing from this pretrained tag's config (no download).")
]
ImageMean = Annotated[str | None, typer.Option(help="Override: 'r,g,b' or one value.")]
ImageStd = Annotated[str | None, typer.Option(help="Override: 'r,g,b' or one value.")]
ImageInterpolation = Annotated[str | None, typer.Option(help="bicubic, bilinear or nearest.")]
ImageResizeMode = Annotated[str | None, typer.Option(help="shortest, longest or squash.")]
TokenizerFile = Annotated[
    Path | None, typer.Option(help="A Hugging Face tokenizer.json for models whose tokenizer is on the hub.")
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]


def _preprocess(
    model: str, tag: str | None, mean: str | None, std: str | None, interpolation: str | None, resize: str | None
) -> dict:
    """The preprocessing overlay: a tag's config (if named), then the explicit --image-* options."""
    from clip_triton.exporter.sources.open_clip import preprocess_overrides, tag_preprocess

    overrides = preprocess_overrides(mean, std, interpolation, resize)
    return {**tag_preprocess(model, tag), **overrides} if tag is not None else overrides


@app.command()
def export(
    model: ModelName,
    out: Annotated[Path, typer.Option(help="Output folder for the ONNX graphs and manifest.json.")],
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    random_weights: RandomWeights = False,
    seed: Seed = 0,
    opset: Opset = 18,
    max_batch: Annotated[int, typer.Option(help="Largest batch later stages configure.")] = 128,
    exporter: Annotated[str, typer.Option(help="torchscript (default), dynamo, or auto.")] = "torchscript",
    preprocess_from: PreprocessFrom = None,
    image_mean: ImageMean = None,
    image_std: ImageStd = None,
    image_interpolation: ImageInterpolation = None,
    image_resize_mode: ImageResizeMode = None,
    tokenizer_file: TokenizerFile = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Export the image and text encoders to ONNX (dynamic batch) and write manifest.json."""
    from clip_triton.exporter.sources.open_clip import load_model
    from clip_triton.exporter.stages.export import check_export_options, export_model

    progress = Progress("export", quiet)
    check_export_options(opset, max_batch, exporter)  # before the (slow) model load
    overrides = _preprocess(model, preprocess_from, image_mean, image_std, image_interpolation, image_resize_mode)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        # Checked before the (slow) model load as well as at the write.
        raise ClipTritonError(f"{out} already exists; pass --force to replace it")
    with progress.step(f"loading {model}"):
        loaded = load_model(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            random_weights=random_weights,
            seed=seed,
            preprocess=overrides,
            tokenizer_file=tokenizer_file,
            progress=progress,
        )
    # release_model: one tower's weights alive at a time (docs/engines.md, "Memory").
    manifest = export_model(
        loaded, out, opset=opset, max_batch=max_batch, exporter=exporter, force=force, progress=progress,
        release_model=True,
    )
    parity = manifest.export_parity
    typer.echo(
        f"exported {model} to {out}: image min cosine {parity['image']['min_cosine']:.7f}, "
        f"text min cosine {parity['text']['min_cosine']:.7f}"
    )


@app.command()
def fp16(
    export: Annotated[Path, typer.Option("--export", help="Folder written by `clip-triton export`.")],
    keep_fp32: Annotated[
        str | None, typer.Option(help="Extra ONNX op types to keep in FP32, comma-separated (e.g. Erf,Gemm).")
    ] = None,
    no_default_policy: Annotated[
        bool,
        typer.Option(
            "--no-default-policy",
            help="Drop the default keep-in-FP32 policy (only --keep-fp32 ops stay FP32): shows what breaks.",
        ),
    ] = False,
    overflow_threshold: Annotated[
        float | None,
        typer.Option(help="Keep tensors whose calibrated |max| exceeds this in FP32 (default 65504/4)."),
    ] = None,
    min_cosine: Annotated[float, typer.Option(help="Fail below this min cosine vs PyTorch FP32.")] = 0.999,
    calibration_bytes: Annotated[
        str | None,
        typer.Option(help="Range-calibration activation bytes per run, e.g. 256M (default: 1G or the env var)."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Write image/text_encoder.fp16.onnx (FP16 weights and compute, FP32 I/O) after a parity check."""
    from clip_triton.exporter.stages.fp16 import Fp16Policy, make_fp16, parse_op_list

    extra = parse_op_list(keep_fp32)
    policy = Fp16Policy.none(extra) if no_default_policy else Fp16Policy.default(extra)
    if overflow_threshold is not None:  # make_fp16 checks it (finite, positive)
        policy.overflow_threshold = overflow_threshold
    progress = Progress("fp16", quiet)
    manifest = make_fp16(
        export, policy=policy, min_cosine=min_cosine, progress=progress, calibration_budget=calibration_bytes
    )
    section = manifest.fp16 or {}
    typer.echo(
        f"wrote FP16 graphs to {export}: image min cosine {section['image']['min_cosine']:.7f}, "
        f"text min cosine {section['text']['min_cosine']:.7f}"
    )


@app.command()
def engines(
    export: Annotated[Path, typer.Option("--export", help="Folder with the FP16 graphs (`clip-triton fp16`).")],
    min_batch: Annotated[int, typer.Option(help="Smallest batch of the optimisation profile.")] = 1,
    opt_batch: Annotated[
        int | None, typer.Option(help="Batch TensorRT tunes kernels for (default: min(32, max)).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch (default: the manifest's max_batch).")
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file: loaded if present, saved after the build.")
    ] = None,
    workspace_gib: Annotated[float | None, typer.Option(help="Builder workspace limit in GiB.")] = None,
    builder_level: Annotated[int, typer.Option(help="Builder optimisation level 0-5.")] = 3,
    min_cosine: Annotated[float, typer.Option(help="Fail below this min cosine vs PyTorch FP32.")] = 0.999,
    quiet: Quiet = False,
) -> None:
    """Build image/text_encoder.plan with TensorRT (on the GPU that will serve them) and check parity."""
    from clip_triton.exporter.stages.engines import build_engines

    progress = Progress("engines", quiet)
    manifest = build_engines(
        export,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        timing_cache=timing_cache,
        workspace_gib=workspace_gib,
        builder_level=builder_level,
        min_cosine=min_cosine,
        progress=progress,
    )
    section = manifest.engines or {}
    typer.echo(
        f"built TensorRT {section.get('tensorrt')} engines in {export} for {section.get('gpu')}: "
        f"image min cosine {section['image']['min_cosine']:.7f}, "
        f"text min cosine {section['text']['min_cosine']:.7f}"
    )


from clip_triton.clients.cli import register as _register_client_commands  # noqa: E402 - typer only; tritonclient loads lazily

_register_client_commands(app)


@app.command()
def repository(
    export: Annotated[Path, typer.Option(help="Export folder (manifest.json, ONNX graphs, plans).")],
    out: Annotated[Path, typer.Option(help="Model repository folder to write.")],
    runtime: Annotated[
        str, typer.Option(help=f"One of {', '.join(serving_names())} (docs/runtimes.md); tensorrt needs plans.")
    ] = "tensorrt",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 ONNX graphs (onnxruntime/python).")] = "fp32",
    prefix: Annotated[str, typer.Option(help="Model name prefix: <prefix>_image, <prefix>_text, ...")] = "clip",
    max_batch: Annotated[
        int | None, typer.Option(help="max_batch_size (default: the manifest's, capped by the engines).")
    ] = None,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batching max queue delay (µs).")] = 2000,
    dynamic_batching: Annotated[
        bool, typer.Option(help="Dynamic batching on every step (off: each request runs alone).")
    ] = True,
    instances: Annotated[int, typer.Option(help="Instances per encoder and tokenize model.")] = 1,
    preprocess_instances: Annotated[
        int, typer.Option(help="Instances of the image preprocess model (each runs its own thread pool).")
    ] = 1,
    preprocess_threads: Annotated[
        int, typer.Option(help="Decode threads per preprocess instance (0: the serving host's cores / instances).")
    ] = 0,
    device: Annotated[
        str | None, typer.Option(help="gpu or cpu instance groups (default: gpu, cpu for python).")
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more decoded pixels than this.")] = 64_000_000,
    max_bytes: Annotated[
        int, typer.Option(help="Refuse encoded images over this many bytes (checked before decoding).")
    ] = 32 * 1024 * 1024,
    max_aspect_ratio: Annotated[
        float, typer.Option(help="Refuse images whose long side / short side exceeds this.")
    ] = 100.0,
    max_resized_pixels: Annotated[
        int, typer.Option(help="Refuse images whose resize step (before the crop) would exceed this many pixels.")
    ] = 16_000_000,
    max_chars: Annotated[int, typer.Option(help="Refuse texts longer than this many characters.")] = 100_000,
    max_request_seconds: Annotated[
        float, typer.Option(help="Fail a request still being preprocessed/tokenized after this many seconds (0: off).")
    ] = 10.0,
    copy_files: Annotated[
        bool,
        typer.Option("--copy-files", help="Copy encoder files (default: hard-link them when on one filesystem)."),
    ] = False,
    triton_release: Annotated[
        str | None,
        typer.Option(help="NVIDIA Triton container YY.MM it is for (default: the engines' TensorRT, else the newest)."),
    ] = None,
    python_deps: Annotated[
        bool, typer.Option(help="Bundle the python models' wheels, pinned, for that release's Python (docs/deploy.md).")
    ] = True,
    deps_python: Annotated[
        str | None, typer.Option(help="Python X.Y of the bundled wheels (default: the release's).")
    ] = None,
    deps_arch: Annotated[str, typer.Option(help="x86_64 or aarch64 wheels.")] = "x86_64",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing repository folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write a deployable Triton model repository (preprocess, tokenize, encoders, ensembles)."""
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    opts = RepositoryOptions(
        runtime=runtime,
        precision=precision,
        prefix=prefix,
        max_batch=max_batch,
        queue_delay_us=queue_delay_us,
        dynamic_batching=dynamic_batching,
        instances=instances,
        preprocess_instances=preprocess_instances,
        preprocess_threads=preprocess_threads,
        device=device,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        max_aspect_ratio=max_aspect_ratio,
        max_resized_pixels=max_resized_pixels,
        max_chars=max_chars,
        max_request_seconds=max_request_seconds,
        copy_files=copy_files,
        triton_release=triton_release,
        python_deps=python_deps,
        deps_python=deps_python,
        deps_arch=deps_arch,
    )
    write_repository(export, out, opts, force=force, progress=Progress("repository", quiet))
    typer.echo(f"wrote {runtime} repository to {out}; serve it with: clip-triton serve --repository {out}")


@app.command()
def serve(
    repository: Annotated[Path, typer.Option(help="Triton model repository (from `clip-triton repository`).")],
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Metrics port.")] = 8002,
    host: Annotated[
        str,
        typer.Option(help="IPv4 address gRPC and metrics bind to; 0.0.0.0 opens them to every network (said loudly)."),
    ] = "127.0.0.1",
    expose_http: Annotated[
        bool,
        typer.Option(
            "--expose-http",
            help="Bind Triton's HTTP/JSON front to --host too (default: loopback only; docs/limits.md).",
        ),
    ] = False,
) -> None:
    """Run the embedded tritonserver (from nvidia-pytriton; CPU) in the foreground until Ctrl-C."""
    from clip_triton.exporter.base.server import serve_forever

    serve_forever(
        repository, grpc_port, http_port, metrics_port, echo=typer.echo, host=host, expose_http=expose_http
    )


@app.command()
def deploy(
    repository: Annotated[Path, typer.Option(help="Triton model repository (from `clip-triton repository`).")],
    out: Annotated[Path, typer.Option(help="Folder for the manifests (`kubectl apply -f OUT`).")],
    target: Annotated[
        str, typer.Option(help="k8s (Deployment, Service, HPA, PDB) or kserve (InferenceService).")
    ] = "k8s",
    name: Annotated[str | None, typer.Option(help="Object name (default: <prefix>-triton).")] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Namespace written into every object (default: none).")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="Triton image (default: the release the repository targets).")
    ] = None,
    cpu: Annotated[
        bool, typer.Option("--cpu", help="CPU pods (the repository must be written with --device cpu).")
    ] = False,
    pvc: Annotated[
        str | None, typer.Option(help="k8s: PersistentVolumeClaim holding the repository (read-only).")
    ] = None,
    pvc_subpath: Annotated[str | None, typer.Option(help="k8s: the repository's folder inside the PVC.")] = None,
    storage_uri: Annotated[
        str | None, typer.Option(help="The repository in an object store: k8s s3:// gs:// as://; kserve also pvc://.")
    ] = None,
    credentials_secret: Annotated[
        str | None, typer.Option(help="k8s: Secret with the object store's credentials (passed as environment).")
    ] = None,
    service_account: Annotated[
        str | None, typer.Option(help="kserve: ServiceAccount whose secrets hold the storage credentials.")
    ] = None,
    gpu_count: Annotated[int, typer.Option(help="GPUs per pod.")] = 1,
    min_replicas: Annotated[int, typer.Option(help="Fewest pods (also the PDB's floor).")] = 2,
    max_replicas: Annotated[int, typer.Option(help="Most pods (equal to --min-replicas: no autoscaler).")] = 4,
    queue_time_target_us: Annotated[
        int | None, typer.Option(help="HPA target: average queue µs per request (default: 5x the batching delay).")
    ] = None,
    cpus: Annotated[
        str | None, typer.Option(help="CPU request = limit (default: 4 GPU pod, 8 CPU pod).")
    ] = None,
    memory: Annotated[
        str | None, typer.Option(help="Memory request = limit (default: sized from the encoders).")
    ] = None,
    shm_size: Annotated[str, typer.Option(help="/dev/shm size (memory-backed; counts against --memory).")] = "2Gi",
    node_selector: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE node label, repeatable (GPU default: nvidia.com/gpu.present=true)."),
    ] = None,
    kserve_protocol: Annotated[
        str, typer.Option(help="kserve: the one port Knative routes to, grpc or http.")
    ] = "grpc",
    expose_http: Annotated[
        bool,
        typer.Option(
            "--expose-http",
            help="Expose Triton's HTTP/JSON front beyond the pod (default: loopback, for the probes only).",
        ),
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write Kubernetes (Deployment, Service, HPA, PDB, NetworkPolicy) or KServe manifests for a repository."""
    from clip_triton.exporter.stages.deploy import DeployOptions, write_deploy

    for flag, value in (
        ("--gpu-count", gpu_count),
        ("--min-replicas", min_replicas),
        ("--max-replicas", max_replicas),
        ("--queue-time-target-us", queue_time_target_us),
    ):
        check_number(flag, value, high=INT32_MAX)  # Kubernetes' int32 fields; the lower bounds: write_deploy
    opts = DeployOptions(
        target=target,
        name=name,
        namespace=namespace,
        image=image,
        cpu=cpu,
        pvc=pvc,
        pvc_subpath=pvc_subpath,
        storage_uri=storage_uri,
        credentials_secret=credentials_secret,
        service_account=service_account,
        gpu_count=gpu_count,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        queue_time_target_us=queue_time_target_us,
        cpus=cpus,
        memory=memory,
        shm_size=shm_size,
        node_selector=list(node_selector or []),
        kserve_protocol=kserve_protocol,
        expose_http=expose_http,
    )
    write_deploy(repository, out, opts, force=force, progress=Progress("deploy", quiet))
    typer.echo(f"wrote {target} manifests to {out}; apply them with: kubectl apply -f {out}")


SamplesOpt = Annotated[int, typer.Option(help="Built-in images and captions to compare (plus --images/--texts).")]
MinFp32 = Annotated[float, typer.Option(help="Min cosine vs PyTorch for FP32 stages.")]
MinFp16 = Annotated[float, typer.Option(help="Min cosine vs PyTorch for FP16 and TensorRT stages.")]
ImagesOpt = Annotated[Path | None, typer.Option(help="A folder of your own images to add to the samples.")]
TextsOpt = Annotated[Path | None, typer.Option(help="A UTF-8 file of your own captions, one per line.")]


@app.command()
def parity(
    export: Annotated[Path, typer.Option("--export", help="Export folder (manifest.json and graphs).")],
    repository: Annotated[
        Path | None, typer.Option(help="Model repository: a local tritonserver is started for it.")
    ] = None,
    url: Annotated[str | None, typer.Option(help="A running Triton's gRPC HOST:PORT serving this export.")] = None,
    samples: SamplesOpt = 16,
    min_cosine_fp32: MinFp32 = 0.99999,
    min_cosine_fp16: MinFp16 = 0.999,
    images: ImagesOpt = None,
    texts: TextsOpt = None,
    report: Annotated[Path | None, typer.Option(help="JSON report (default: EXPORT/parity.json).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Markdown report (default: beside the JSON).")] = None,
    ort_providers: Annotated[
        str,
        typer.Option(
            help="ONNX Runtime execution providers to check, e.g. cpu,cuda,tensorrt (auto: CPU plus every GPU "
            "provider this host can run; $CLIP_TRITON_ORT_PROVIDERS sets the default)."
        ),
    ] = "auto",
    quiet: Quiet = False,
) -> None:
    """Compare every stage that exists (ONNX FP32/FP16, TensorRT, live Triton) with PyTorch; exit 1 on drift."""
    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.runtimes.onnxruntime import parse_providers

    run_parity(
        export,
        repository=repository,
        url=url,
        samples=samples,
        min_cosine_fp32=min_cosine_fp32,
        min_cosine_fp16=min_cosine_fp16,
        images=images,
        texts=texts,
        report=report,
        markdown=markdown,
        providers=parse_providers(ort_providers),
        progress=Progress("parity", quiet),
        echo=typer.echo,
    )


@app.command()
def build(
    model: ModelName,
    out: Annotated[Path, typer.Option(help="Output folder: export/, repository/, parity.json, parity.md.")],
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    random_weights: RandomWeights = False,
    seed: Seed = 0,
    runtime: Annotated[
        str, typer.Option(help=f"auto (tensorrt if engines were built, else python) or {', '.join(serving_names())}.")
    ] = "auto",
    precision: Annotated[
        str, typer.Option(help="fp32 or fp16 graphs in the repository (python/onnxruntime).")
    ] = "fp32",
    skip_engines: Annotated[bool, typer.Option("--skip-engines", help="Do not try to build TensorRT engines.")] = False,
    require_engines: Annotated[
        bool, typer.Option("--require-engines", help="Fail (exit 3) when engines cannot be built here.")
    ] = False,
    samples: SamplesOpt = 16,
    min_cosine_fp32: MinFp32 = 0.99999,
    min_cosine_fp16: MinFp16 = 0.999,
    images: ImagesOpt = None,
    texts: TextsOpt = None,
    opset: Opset = 18,
    max_batch: Annotated[int, typer.Option(help="Largest batch the repository and engines accept.")] = 128,
    preprocess_from: PreprocessFrom = None,
    image_mean: ImageMean = None,
    image_std: ImageStd = None,
    image_interpolation: ImageInterpolation = None,
    image_resize_mode: ImageResizeMode = None,
    tokenizer_file: TokenizerFile = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """CI entry point: export -> fp16 -> engines -> repository -> parity; exit 0 only if every stage passed."""
    from clip_triton.exporter.build import BuildOptions, run_build

    opts = BuildOptions(
        model=model,
        out=out,
        pretrained=pretrained,
        checkpoint=checkpoint,
        random_weights=random_weights,
        seed=seed,
        runtime=runtime,
        precision=precision,
        skip_engines=skip_engines,
        require_engines=require_engines,
        samples=samples,
        min_cosine_fp32=min_cosine_fp32,
        min_cosine_fp16=min_cosine_fp16,
        images=images,
        texts=texts,
        opset=opset,
        max_batch=max_batch,
        preprocess=_preprocess(model, preprocess_from, image_mean, image_std, image_interpolation, image_resize_mode),
        tokenizer_file=tokenizer_file,
        force=force,
    )
    run_build(opts, quiet=quiet, echo=typer.echo)
    typer.echo(f"build passed: {out}/export, {out}/repository, {out}/parity.json, {out}/parity.md")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="open_clip architecture (random weights).")] = "ViT-B-32",
    out: Annotated[
        Path, typer.Option(help="Build folder (reused when it holds a passing build).")
    ] = Path("build/demo"),
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if OUT holds a passing build.")] = False,
    quiet: Quiet = False,
) -> None:
    """Build (or reuse) a random-weights python-runtime repository, serve it, embed an image and a caption."""
    from clip_triton.exporter.build import run_demo

    run_demo(model, out, quiet=quiet, rebuild=rebuild, echo=typer.echo)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    try:
        app()  # standalone: usage errors print Typer's message and exit 2
    except (ClipTritonError, ClipClientError) as exc:  # the client library has its own error base
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk, a vanished folder: the stages clean up their staged output
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
