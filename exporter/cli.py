"""`clip-triton`: a thin Typer front end. Each command parses options and calls one stage.

A command's options that a stage takes as a dataclass are that dataclass's fields, each declared once
with its help text (`option()`); `@dataclass_options` turns them into Typer options and hands the
command the dataclass built from them (clients/cli_options.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clip_triton.clients.cli_options import dataclass_options
from clip_triton.clients.errors import ClipClientError
from clip_triton.clients.gateway.cli import gateway as gateway_command
from clip_triton.exporter.base.common import INT32_MAX, ClipTritonError, Progress, check_number, os_error_message
from clip_triton.exporter.build import DEMO_MODEL, BuildOptions, ExportOptions, run_build, run_demo, run_export
from clip_triton.exporter.parity.run import ParityOptions
from clip_triton.exporter.stages.deploy import DeployOptions, write_deploy
from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

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
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]


@app.command()
@dataclass_options
def export(
    opts: ExportOptions,
    out: Annotated[Path, typer.Option(help="Output folder for the ONNX graphs and manifest.json.")],
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Export the image and text encoders to ONNX (dynamic batch) and write manifest.json."""
    manifest = run_export(opts, out, force=force, progress=Progress("export", quiet))
    parity = manifest.export_parity
    typer.echo(
        f"exported {manifest.model_name} to {out}: image min cosine {parity['image']['min_cosine']:.7f}, "
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
    precision: Annotated[
        str, typer.Option(help="fp16 (the FP16 graphs) or int8 (the quantize stage's Q/DQ graphs; docs/int8.md).")
    ] = "fp16",
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
        precision=precision,
    )
    section = manifest.engines or {}
    typer.echo(
        f"built TensorRT {section.get('tensorrt')} engines in {export} for {section.get('gpu')}: "
        f"image min cosine {section['image']['min_cosine']:.7f}, "
        f"text min cosine {section['text']['min_cosine']:.7f}"
    )


@app.command()
def quantize(
    export: Annotated[Path, typer.Option("--export", help="Folder written by `clip-triton export`.")],
    calibration_images: Annotated[
        Path | None, typer.Option(help="A folder of your own images: calibration, and the top-1 caption check.")
    ] = None,
    calibration_texts: Annotated[
        Path | None, typer.Option(help="A UTF-8 file of your own captions, one per line (calibration, check).")
    ] = None,
    labelled_set: Annotated[
        str,
        typer.Option(help="Agreement gate's labelled set: auto (shapes for the builtin trained model), shapes, "
                     "none, a folder of class folders or a captions file (as `parity`)."),
    ] = "auto",
    labelled_samples: Annotated[int, typer.Option(help="Held-out shapes images of --labelled-set shapes.")] = 120,
    min_cosine: Annotated[float, typer.Option(help="Fail below this min cosine vs PyTorch FP32.")] = 0.98,
    min_agreement: Annotated[
        float, typer.Option(help="Fail below this top-1 agreement with PyTorch on the labelled set / your data.")
    ] = 0.95,
    quantizer: Annotated[str, typer.Option(help="nncf (default) or onnxruntime (docs/int8.md).")] = "nncf",
    no_smooth_quant: Annotated[
        bool, typer.Option("--no-smooth-quant", help="NNCF without SmoothQuant: less memory (docs/int8.md).")
    ] = False,
    keep_fp32: Annotated[
        str | None, typer.Option(help="Extra ONNX op types to leave unquantized, comma-separated (e.g. Gemm).")
    ] = None,
    no_default_policy: Annotated[
        bool,
        typer.Option("--no-default-policy", help="Drop the default keep-in-FP32 policy (only --keep-fp32 ops)."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Write image/text_encoder.int8.onnx (Q/DQ, per-channel INT8 weights, calibrated) after the gate."""
    from clip_triton.exporter.stages.fp16 import parse_op_list
    from clip_triton.exporter.stages.quantize import Int8Policy, QuantizeOptions, make_int8

    extra = parse_op_list(keep_fp32)
    opts = QuantizeOptions(
        calibration_images=calibration_images, calibration_texts=calibration_texts, labelled_set=labelled_set,
        labelled_samples=labelled_samples, min_cosine=min_cosine, min_agreement=min_agreement, quantizer=quantizer,
        policy=Int8Policy.none(extra) if no_default_policy else Int8Policy.default(extra),
        smooth_quant=not no_smooth_quant,
    )
    manifest = make_int8(export, opts, progress=Progress("quantize", quiet))
    section = manifest.int8 or {}
    typer.echo(
        f"wrote INT8 graphs to {export}: image min cosine {section['image']['min_cosine']:.6f}, "
        f"text min cosine {section['text']['min_cosine']:.6f}"
    )


from clip_triton.clients.cli import register as _register_client_commands  # noqa: E402 - typer only; tritonclient loads lazily

_register_client_commands(app)


@app.command()
@dataclass_options
def repository(
    export: Annotated[Path, typer.Option(help="Export folder (manifest.json, ONNX graphs, plans).")],
    out: Annotated[Path, typer.Option(help="Model repository folder to write.")],
    opts: RepositoryOptions,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing repository folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write a deployable Triton model repository (preprocess, tokenize, encoders, ensembles)."""
    write_repository(export, out, opts, force=force, progress=Progress("repository", quiet))
    typer.echo(f"wrote {opts.runtime} repository to {out}; serve it with: clip-triton serve --repository {out}")


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


app.command()(dataclass_options(gateway_command))


@app.command()
@dataclass_options
def deploy(
    repository: Annotated[Path, typer.Option(help="Triton model repository (from `clip-triton repository`).")],
    out: Annotated[Path, typer.Option(help="Folder for the manifests (`kubectl apply -f OUT`).")],
    opts: DeployOptions,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write Kubernetes (Deployment, Service, HPA, PDB, NetworkPolicy) or KServe manifests for a repository."""
    for flag, value in (
        ("--gpu-count", opts.gpu_count),
        ("--min-replicas", opts.min_replicas),
        ("--max-replicas", opts.max_replicas),
        ("--queue-time-target-us", opts.queue_time_target_us),
    ):
        check_number(flag, value, high=INT32_MAX)  # Kubernetes' int32 fields; the lower bounds: write_deploy
    write_deploy(repository, out, opts, force=force, progress=Progress("deploy", quiet))
    typer.echo(f"wrote {opts.target} manifests to {out}; apply them with: kubectl apply -f {out}")


@app.command()
@dataclass_options
def parity(
    export: Annotated[Path, typer.Option("--export", help="Export folder (manifest.json and graphs).")],
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository: a local tritonserver is started for it (with --url: the one served)."),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running Triton's gRPC HOST:PORT serving this export (replicas: a,b).")
    ] = None,
    *,
    checks: ParityOptions,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for parity.json and parity.md (default: EXPORT-parity, beside the export)."),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="JSON report (default: OUT/parity.json).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Markdown report (default: beside the JSON).")] = None,
    ort_providers: Annotated[
        str,
        typer.Option(
            help="ONNX Runtime execution providers to check, e.g. cpu,cuda,tensorrt (auto: CPU plus every GPU "
            "provider this host can run; $CLIP_TRITON_ORT_PROVIDERS sets the default)."
        ),
    ] = "auto",
    check_runtime: Annotated[
        list[str] | None,
        typer.Option(
            help="Also check a runtime parity otherwise runs only where the repository serves it (openvino), "
            "e.g. before writing a repository for it; repeatable."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Compare every stage that exists (ONNX FP32/FP16, TensorRT, live Triton) with PyTorch; exit 1 on drift."""
    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.runtimes.onnxruntime import parse_providers

    run_parity(
        export,
        repository=repository,
        url=url,
        **checks.parity_kwargs(),
        out=out,
        report=report,
        markdown=markdown,
        providers=parse_providers(ort_providers),
        check_runtimes=tuple(check_runtime or ()),
        progress=Progress("parity", quiet),
        echo=typer.echo,
    )


@app.command()
@dataclass_options
def build(opts: BuildOptions, quiet: Quiet = False) -> None:
    """CI entry point: export -> fp16 -> engines -> repository -> parity; exit 0 only if every stage passed."""
    run_build(opts, quiet=quiet, echo=typer.echo)
    out = opts.out
    typer.echo(f"build passed: {out}/export, {out}/repository, {out}/parity.json, {out}/parity.md")


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="Architecture: builtin weights when it ships them (the default does), else random.")
    ] = DEMO_MODEL,
    out: Annotated[
        Path, typer.Option(help="Build folder (reused when it holds a passing build).")
    ] = Path("build/demo"),
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if OUT holds a passing build.")] = False,
    quiet: Quiet = False,
) -> None:
    """Build (or reuse) a python-runtime repository, serve it, rank a held-out image's captions vs PyTorch."""
    run_demo(model, out, quiet=quiet, rebuild=rebuild, echo=typer.echo)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    try:
        app()  # standalone: usage errors print Typer's message and exit 2
    except (ClipTritonError, ClipClientError) as exc:  # the client library has its own error base
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # the client-only install (no `export` extra) runs a toolchain command
        root = (exc.name or "").split(".")[0]
        extra = {"transformers": "hf", "sentencepiece": "hf", "openvino": "openvino", "starlette": "gateway",
                 "uvicorn": "gateway", "prometheus_client": "gateway"}.get(root, "export")
        print(f"error: this command needs the `{extra}` extra (no module {root!r} here): "
              f"pip install 'clip-triton[{extra}]'", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a full disk, a vanished folder: the stages clean up their staged output
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
