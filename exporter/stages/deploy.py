"""`clip-triton deploy`: Kubernetes or KServe manifests for a repository written by `clip-triton repository`.

Every default and the reason for it is in docs/deploy.md; the tests validate each document against the
Kubernetes and KServe schemas. The manifests never install anything at start: the repository carries
its python models' dependencies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clip_triton.clients import contract
from clip_triton.clients.cli_options import option
from clip_triton.exporter import runtimes
from clip_triton.exporter.base.common import REPOSITORY_SOURCES, ClipTritonError, Progress, staged_dir
from clip_triton.exporter.base.manifest import IMAGE_PLAN, TEXT_PLAN, repository_manifest
from clip_triton.exporter.base.releases import TritonRelease, repository_release
from clip_triton.exporter.base.server import MALLOC_ENV, admin_lock_args

TARGETS = ("k8s", "kserve")
KSERVE_PROTOCOLS = ("grpc", "http")
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
GATEWAY_PORT = 8080  # `clip-triton gateway` beside Triton (--gateway-image)
GATEWAY_KEYS_MOUNT = "/var/run/secrets/clip-triton/gateway"
GATEWAY_UID = 10001  # docker/gateway.Dockerfile's user
# KServe's Triton runtime listens here (its stock ServingRuntime's ports; Knative routes to one of them).
KSERVE_HTTP_PORT, KSERVE_GRPC_PORT = 8080, 9000
TRITON_UID = 1000  # the Triton image's triton-server user
MODELS_MOUNT = "/models"
CREDENTIALS_MOUNT = "/var/run/secrets/clip-triton/storage"
# Triton reads these object stores itself (--model-repository=s3://...); KServe's storage initializer
# downloads more kinds into /mnt/models before Triton starts.
K8S_URI_SCHEMES = ("s3://", "gs://", "as://")
KSERVE_URI_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "hdfs://", "webhdfs://", "hf://", "oci://")
# Triton's k8s-onprem Helm chart scales on this prometheus-adapter metric (docs/deploy.md).
QUEUE_METRIC = "avg_time_queue_us"
# Ensembles (no queue of their own) are named after these roles; encoders after *_encoder.
ENSEMBLE_ROLES = ("image", "image_pixels", "text")

# startupProbe budget (docs/deploy.md): a fixed part for the container and the python stubs, plus the
# encoders' load time, plus their download when Triton pulls the repository from an object store.
STARTUP_BASE_S = 120
STARTUP_LOAD_S_PER_GIB = 60
STARTUP_DOWNLOAD_MIB_S = 25
STARTUP_PERIOD_S = 10
GIB = 1024**3

_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names: a letter first
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RFC1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


@dataclass
class DeployOptions:
    """The `deploy` command's options: each field is one --option (clients/cli_options.py)."""

    target: str = option("k8s", help="k8s (Deployment, Service, HPA, PDB) or kserve (InferenceService).")
    name: str | None = option(None, help="Object name (default: <prefix>-triton).")
    # None: no namespace written (kubectl's current namespace).
    namespace: str | None = option(None, help="Namespace written into every object (default: none).")
    image: str | None = option(None, help="Triton image (default: the release the repository targets).")
    cpu: bool = option(False, flags=("--cpu",), help="CPU pods (the repository must be written with --device cpu).")
    pvc: str | None = option(None, help="k8s: PersistentVolumeClaim holding the repository (read-only).")
    pvc_subpath: str | None = option(None, help="k8s: the repository's folder inside the PVC.")
    storage_uri: str | None = option(
        None, help="The repository in an object store: k8s s3:// gs:// as://; kserve also pvc://."
    )
    credentials_secret: str | None = option(
        None, help="k8s: Secret with the object store's credentials (passed as environment)."
    )
    service_account: str | None = option(
        None,
        help="ServiceAccount the pods run as: k8s workload identity (IRSA, GKE, Azure) for --storage-uri; "
        "kserve: the one whose secrets hold the storage credentials.",
    )
    gpu_count: int = option(1, help="GPUs per pod.")
    min_replicas: int = option(2, help="Fewest pods (also the PDB's floor).")
    max_replicas: int = option(4, help="Most pods (equal to --min-replicas: no autoscaler).")
    queue_time_target_us: int | None = option(
        None, help="HPA target: average queue µs per request (default: 5x the batching delay)."
    )
    cpus: str | None = option(None, help="CPU request = limit (default: 4 GPU pod, 8 CPU pod).")
    memory: str | None = option(None, help="Memory request = limit (default: sized from the encoders).")
    shm_size: str = option("2Gi", help="/dev/shm size (memory-backed; counts against --memory).")
    node_selector: list[str] = option(
        default_factory=list,
        help="KEY=VALUE node label, repeatable (GPU default: nvidia.com/gpu.present=true).",
    )
    kserve_protocol: str = option("grpc", help="kserve: the one port Knative routes to, grpc or http.")
    # kserve --kserve-protocol http implies it.
    expose_http: bool = option(
        False,
        flags=("--expose-http",),
        help="Expose Triton's HTTP/JSON front beyond the pod (default: loopback, for the probes only).",
    )
    gateway_image: str | None = option(
        None,
        help="k8s: run the OpenAI-compatible gateway (an image from docker/gateway.Dockerfile) beside Triton in "
        f"each pod; the Service gains port {GATEWAY_PORT} (docs/gateway.md).",
    )
    gateway_keys_secret: str | None = option(
        None, help="k8s: Secret whose `keys` entry lists the gateway's bearer keys, one per line (else no auth)."
    )
    headless_service: bool = option(
        False,
        flags=("--headless-service",),
        help="k8s: also write a headless Service NAME-headless (clusterIP None, same pods): its DNS name lists "
        "every ready pod, for clients that spread over replicas themselves (docs/deploy.md).",
    )
    build_engines: bool = option(
        False,
        flags=("--build-engines",),
        help="k8s: a Job builds the TensorRT plans on a GPU node in nvcr.io/nvidia/tensorrt:<the release>-py3, "
        "gates them with parity and marks the repository ready; the pods wait for that mark (docs/deploy.md).",
    )
    engines_export_subpath: str | None = option(
        None, help="--build-engines: the export folder (with the FP16 graphs) inside the --pvc volume."
    )
    clip_triton_spec: str | None = option(
        None,
        help="--build-engines: what the Job pip-installs, e.g. a wheel path inside the volume "
        "(/work/pvc/wheels/clip_triton-0.1.0-py3-none-any.whl) or clip-triton==0.1.0.",
    )
    wheelhouse_subpath: str | None = option(
        None,
        help="--build-engines: a folder of wheels inside the --pvc volume; pip installs from it only (offline).",
    )
    tensorrt_image: str | None = option(
        None, help="--build-engines: TensorRT image (default: nvcr.io/nvidia/tensorrt:<the release>-py3)."
    )


@dataclass
class RepositoryFacts:
    """What the manifests need from a written repository."""

    path: Path
    model_name: str
    prefix: str
    runtime: str
    device: str
    models: dict[str, str]
    queue_delay_us: int
    dynamic_batching: bool
    release: TritonRelease
    encoder_bytes: int
    repository_bytes: int
    compute_capability: str | None  # of the GPU that built TensorRT plans (a plan runs only there)
    deps_python: str | None = None  # Python X.Y of the wheels the python models carry (None: none bundled)
    # What the repository publishes in its ensembles' config parameters (clients check them): role -> sha256.
    encoder_sha256: dict[str, str] = field(default_factory=dict)
    # sha256 over every model's config.pbtxt and, for plans, the plans' recorded checksums (_repository_digest).
    repository_sha256: str = ""
    record: dict[str, Any] = field(default_factory=dict)  # manifest.json's repository record, as written


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def repository_facts(repo: Path) -> RepositoryFacts:
    repo = Path(repo)
    if not repo.is_dir():
        raise ClipTritonError(f"{repo} is not a folder; pass the folder written by `clip-triton repository`")
    manifest = repository_manifest(repo)
    record = manifest.repository if manifest is not None else None
    if manifest is None or not record or not isinstance(record.get("models"), dict):
        raise ClipTritonError(
            f"{repo} is not a clip-triton model repository (no manifest.json with a repository record); "
            "write one with `clip-triton repository`"
        )
    models: dict[str, str] = record["models"]
    encoders = [repo / models[role] for role in ("image_encoder", "text_encoder") if role in models]
    missing = [p.name for p in encoders if not (p / "config.pbtxt").is_file()]
    if missing or not encoders:
        raise ClipTritonError(f"{repo} is incomplete: encoder model folder(s) missing: {', '.join(missing)}")
    engines = manifest.engines or {}
    # Only a repository serving plans is bound to the GPU family that built them.
    serves_plans = runtimes.serving(str(record.get("runtime"))).fmt == "plan"
    capability = engines.get("compute_capability") if serves_plans else None
    return RepositoryFacts(
        path=repo,
        model_name=manifest.model_name,
        prefix=str(record.get("prefix", "clip")),
        runtime=str(record.get("runtime")),
        device=str(record.get("device", "gpu")),
        models=models,
        queue_delay_us=int(record.get("queue_delay_us", 0)),
        dynamic_batching=bool(record.get("dynamic_batching", True)),
        release=repository_release(manifest),
        encoder_bytes=sum(_tree_bytes(p) for p in encoders),
        repository_bytes=_tree_bytes(repo),
        compute_capability=str(capability) if capability else None,
        deps_python=(record.get("python_deps") or {}).get("python"),
        encoder_sha256=published_checksums(repo, models),
        repository_sha256=_repository_digest(repo, models, engines if serves_plans else {}),
        record=dict(record),
    )


_PARAMETER = re.compile(r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}')
CHECKSUM_PARAMS = {"image": contract.PARAM_IMAGE_ENCODER_SHA256, "text": contract.PARAM_TEXT_ENCODER_SHA256}


def published_checksums(repo: Path, models: dict[str, str]) -> dict[str, str]:
    """tower -> the encoder sha256 the repository publishes in its ensembles' config parameters (what
    clients compare between replicas, clients/_core.py ModelInfo.key); towers without one are left out."""
    found: dict[str, str] = {}
    for role in ("image", "text"):
        config = repo / models.get(role, "") / "config.pbtxt"
        if role in models and config.is_file():
            params = dict(_PARAMETER.findall(config.read_text()))
            for tower, key in CHECKSUM_PARAMS.items():
                if re.fullmatch(r"[0-9a-f]{64}", params.get(key, "")):
                    found.setdefault(tower, params[key])
    return found


def _repository_digest(repo: Path, models: dict[str, str], engines: dict[str, Any]) -> str:
    """sha256 over each model's config.pbtxt (batching, instances, limits, the published checksums) and, for a
    plan repository, the plans' checksums recorded by `clip-triton engines`: cheap (no weights are read)."""
    digest = hashlib.sha256()
    for role in sorted(models):
        config = repo / models[role] / "config.pbtxt"
        if config.is_file():
            digest.update(f"{models[role]}/config.pbtxt\0".encode() + config.read_bytes() + b"\0")
    for name, item in sorted((engines.get("files") or {}).items()):
        digest.update(f"{name}\0{(item or {}).get('sha256', '')}\0".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- sizing


def startup_budget_s(encoder_bytes: int, download_bytes: int = 0) -> int:
    """Seconds the startupProbe allows before Kubernetes restarts a loading Triton (docs/deploy.md):
    120 s + 60 s per GiB of encoder files + the download at 25 MiB/s, rounded up to the probe period."""
    load = STARTUP_LOAD_S_PER_GIB * encoder_bytes / GIB
    download = download_bytes / (STARTUP_DOWNLOAD_MIB_S * 1024**2)
    raw = STARTUP_BASE_S + load + download
    return int(math.ceil(raw / STARTUP_PERIOD_S) * STARTUP_PERIOD_S)


def _gib(quantity: str) -> float:
    """A binary or decimal memory quantity in GiB (for the sums below; validated beforehand)."""
    m = re.match(r"^([0-9.]+)([A-Za-z]*)$", quantity)
    assert m is not None
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1024**2, "Gi": GIB, "Ti": 1024**4}
    return float(m.group(1)) * scale.get(m.group(2), 1) / GIB


def default_memory(facts: RepositoryFacts, on_gpu: bool, shm_size: str) -> str:
    """Memory request (= limit): 4 GiB for Triton and the python stubs, the encoders once in host memory
    (twice on CPU: weights plus ONNX Runtime's buffers), and /dev/shm, which counts against the pod."""
    encoders = facts.encoder_bytes / GIB * (1 if on_gpu else 2)
    return f"{math.ceil(4 + encoders + _gib(shm_size))}Gi"


def default_queue_target_us(facts: RepositoryFacts) -> int:
    """Scale out when requests wait well past what the dynamic batcher holds them on purpose: the batcher
    alone adds up to queue_delay_us per model at low load, so 5x that (at least 5 ms)."""
    delay = facts.queue_delay_us if facts.dynamic_batching else 0
    return max(5 * delay, 5000)


# ------------------------------------------------------------------------------------------ validation


def check_options(facts: RepositoryFacts, opts: DeployOptions) -> tuple[str, bool]:
    """Validate the options against the repository; returns (name, on_gpu)."""
    if opts.target not in TARGETS:
        raise ClipTritonError(f"--target must be one of {', '.join(TARGETS)}, got {opts.target!r}")
    name = opts.name or f"{facts.prefix.lower().replace('_', '-')}-triton"
    if len(name) > 63 or not _RFC1035.match(name):
        raise ClipTritonError(
            f"--name {name!r} is not a valid Kubernetes name (lower-case letters, digits and '-', a letter "
            "first, at most 63 characters)" + ("" if opts.name else "; pass --name")
        )
    if opts.namespace is not None and (len(opts.namespace) > 63 or not _RFC1123_LABEL.match(opts.namespace)):
        raise ClipTritonError(f"--namespace {opts.namespace!r} is not a valid namespace name")
    for flag, value in (
        ("--pvc", opts.pvc),
        ("--credentials-secret", opts.credentials_secret),
        ("--service-account", opts.service_account),
        ("--gateway-keys-secret", opts.gateway_keys_secret),
    ):
        if value is not None and (len(value) > 253 or not _RFC1123_SUBDOMAIN.match(value)):
            raise ClipTritonError(f"{flag} {value!r} is not a valid Kubernetes object name")
    if opts.pvc and opts.storage_uri:
        raise ClipTritonError("pass either --pvc or --storage-uri, not both")
    if opts.target == "k8s":
        if not opts.pvc and not opts.storage_uri:
            raise ClipTritonError("the k8s target needs the repository's location: --pvc NAME or --storage-uri URI")
        if opts.storage_uri and not opts.storage_uri.startswith(K8S_URI_SCHEMES):
            raise ClipTritonError(
                f"--storage-uri must start with {', '.join(K8S_URI_SCHEMES)} (what tritonserver reads itself), "
                f"got {opts.storage_uri!r}"
            )
        if opts.gateway_keys_secret and not opts.gateway_image:
            raise ClipTritonError("--gateway-keys-secret needs --gateway-image (the gateway it configures)")
    else:
        if opts.pvc:
            raise ClipTritonError("the kserve target takes the repository as --storage-uri pvc://NAME/PATH, not --pvc")
        if not opts.storage_uri:
            raise ClipTritonError(
                "the kserve target needs --storage-uri (s3://, gs://, pvc://NAME/PATH, https://, ...): "
                "KServe downloads the repository into the pod"
            )
        if not opts.storage_uri.startswith(KSERVE_URI_SCHEMES):
            raise ClipTritonError(
                f"--storage-uri must start with one of {', '.join(KSERVE_URI_SCHEMES)}, got {opts.storage_uri!r}"
            )
        if opts.credentials_secret:
            raise ClipTritonError(
                "KServe takes storage credentials from a service account (--service-account), not --credentials-secret"
            )
        if opts.gateway_image or opts.gateway_keys_secret:
            raise ClipTritonError("the gateway is offered for the k8s target (KServe routes one port to Triton)")
        if opts.kserve_protocol not in KSERVE_PROTOCOLS:
            raise ClipTritonError(f"--kserve-protocol must be grpc or http, got {opts.kserve_protocol!r}")
    if opts.pvc_subpath is not None and (not opts.pvc or opts.pvc_subpath.startswith("/") or ".." in opts.pvc_subpath):
        raise ClipTritonError("--pvc-subpath needs --pvc and must be a relative path inside the volume")
    if opts.storage_uri and len(opts.storage_uri.split("://", 1)[1].strip("/")) == 0:
        raise ClipTritonError(f"--storage-uri {opts.storage_uri!r} names no bucket or path")
    if opts.min_replicas < 1:
        raise ClipTritonError("--min-replicas must be at least 1 (GPU pods take minutes to start from zero)")
    if opts.max_replicas < opts.min_replicas:
        raise ClipTritonError("--max-replicas must be >= --min-replicas")
    if opts.gpu_count < 1:
        raise ClipTritonError("--gpu-count must be at least 1 (for a CPU pod pass --cpu)")
    if opts.queue_time_target_us is not None and opts.queue_time_target_us < 1:
        raise ClipTritonError("--queue-time-target-us must be positive")
    for flag, value in (("--cpus", opts.cpus), ("--memory", opts.memory), ("--shm-size", opts.shm_size)):
        if value is not None and not _QUANTITY.match(value):
            raise ClipTritonError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 8Gi)")
    for item in opts.node_selector:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value) or len(value) > 63:
            raise ClipTritonError(f"--node-selector {item!r} must be KEY=VALUE with a valid label key and value")
    _check_engines_options(facts, opts, name)
    if opts.headless_service:
        if opts.target != "k8s":
            raise ClipTritonError("--headless-service is offered for the k8s target (KServe routes through Knative)")
        if len(headless_name(name)) > 63:
            raise ClipTritonError(f"--name {name!r} is too long for the headless Service {headless_name(name)!r} "
                                  "(at most 63 characters)")
    on_gpu = facts.device == "gpu" and not opts.cpu
    if opts.cpu and facts.device == "gpu":
        raise ClipTritonError(
            f"{facts.path} was written for GPU ({facts.runtime}, KIND_GPU instance groups), which Triton cannot "
            "load without a GPU: write it with `clip-triton repository --device cpu` for a CPU deployment"
        )
    # Wheels for another Python would make every python model refuse to load in the container.
    if facts.deps_python and not opts.image and facts.deps_python != facts.release.python:
        raise ClipTritonError(
            f"{facts.path} carries python wheels for Python {facts.deps_python}, but {facts.release.image} runs "
            f"Python {facts.release.python}: write it again without --deps-python (or pass --image for your own)"
        )
    return name, on_gpu


def _relative(flag: str, value: str | None) -> None:
    if value is not None and (not value.strip("/") or value.startswith("/") or ".." in value.split("/")
                              or not re.fullmatch(r"[A-Za-z0-9._/+=@-]+", value)):
        raise ClipTritonError(f"{flag} {value!r} must be a relative path inside the volume (letters, digits, ._-/+=@)")


def _check_engines_options(facts: RepositoryFacts, opts: DeployOptions, name: str) -> None:
    engines_flags = {
        "--engines-export-subpath": opts.engines_export_subpath,
        "--clip-triton-spec": opts.clip_triton_spec,
        "--wheelhouse-subpath": opts.wheelhouse_subpath,
        "--tensorrt-image": opts.tensorrt_image,
    }
    if not opts.build_engines:
        given = [flag for flag, value in engines_flags.items() if value is not None]
        if given:
            raise ClipTritonError(f"{', '.join(given)} configure(s) the engine build: pass --build-engines too")
        return
    if opts.target != "k8s" or not opts.pvc:
        raise ClipTritonError("--build-engines needs the k8s target with --pvc: the Job writes the repository "
                              "into the volume (for one docker host: the build-engines/ scripts, docs/deploy.md)")
    if opts.cpu or facts.device != "gpu":
        raise ClipTritonError("--build-engines builds TensorRT plans for GPU pods: pass a GPU repository, not --cpu")
    if not opts.pvc_subpath:
        raise ClipTritonError("--build-engines needs --pvc-subpath: the new, versioned folder the Job writes the "
                              "repository to (never an existing model's)")
    for flag in ("--engines-export-subpath", "--clip-triton-spec"):
        if not engines_flags[flag]:
            raise ClipTritonError(f"--build-engines needs {flag} (docs/deploy.md, \"Engines built where they run\")")
    _relative("--engines-export-subpath", opts.engines_export_subpath)
    _relative("--wheelhouse-subpath", opts.wheelhouse_subpath)
    assert opts.engines_export_subpath is not None
    export, repo = (p.strip("/") for p in (opts.engines_export_subpath, opts.pvc_subpath))
    if export == repo or repo.startswith(export + "/") or export.startswith(repo + "/"):
        raise ClipTritonError("--engines-export-subpath and --pvc-subpath must be separate folders")
    spec = opts.clip_triton_spec or ""
    if not re.fullmatch(r"[A-Za-z0-9._/+=@:<>!~,\[\]-]+", spec):
        raise ClipTritonError(f"--clip-triton-spec {spec!r} must be one pip requirement or wheel path (no spaces)")
    extras = {e.strip() for group in re.findall(r"\[([^\]]*)\]", spec) for e in group.split(",")}
    if extras & REFUSED_EXTRAS:
        raise ClipTritonError("--clip-triton-spec must not ask for the tensorrt extra: the image's own TensorRT "
                              "builds the plans (a PyPI wheel matches no container release)")
    if not extras & {"export", "hf"}:
        raise ClipTritonError(f"--clip-triton-spec {spec!r} must ask for the export extra (the Job runs the toolchain; "
                              "the package alone is the client): e.g. clip_triton-0.1.0-py3-none-any.whl[export]")
    if len(engines_job_name(name, facts)) > 63:
        raise ClipTritonError(f"--name {name!r} is too long for the engine build Job {engines_job_name(name, facts)!r}")


# ----------------------------------------------------------------------------------------- documents


def _labels(name: str, release: TritonRelease) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "clip-triton",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/version": release.release,
    }


def _selector(name: str) -> dict[str, str]:
    # Only labels that never change between releases: a Deployment's selector is immutable.
    return {"app.kubernetes.io/name": "clip-triton", "app.kubernetes.io/instance": name}


def _meta(name: str, opts: DeployOptions, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = labels
    meta.update(extra)
    return meta


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRITON_UID,
        "runAsGroup": TRITON_UID,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRITON_UID,
        "runAsGroup": TRITON_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(facts: RepositoryFacts, opts: DeployOptions, on_gpu: bool) -> dict[str, Any]:
    # requests == limits: Guaranteed QoS (evicted last), and with the kubelet's static CPU manager whole
    # cores, which the preprocess model's thread pool sizes itself to (sched_getaffinity).
    cpus = opts.cpus or ("4" if on_gpu else "8")
    memory = opts.memory or default_memory(facts, on_gpu, opts.shm_size)
    amounts: dict[str, Any] = {"cpu": cpus, "memory": memory}
    if on_gpu:
        amounts["nvidia.com/gpu"] = str(opts.gpu_count)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _node_selector(opts: DeployOptions, on_gpu: bool) -> dict[str, str]:
    if opts.node_selector:
        return dict(item.split("=", 1) for item in opts.node_selector)  # type: ignore[misc]
    # Set by NVIDIA's GPU feature discovery (part of the GPU operator) on every node with a GPU.
    return {"nvidia.com/gpu.present": "true"} if on_gpu else {}


def _gpu_tolerations(on_gpu: bool) -> list[dict[str, Any]]:
    # GPU node pools are commonly tainted nvidia.com/gpu (GKE adds it itself); tolerating a taint that
    # is absent is harmless.
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if on_gpu else []


def _plan_affinity(facts: RepositoryFacts, on_gpu: bool) -> dict[str, Any] | None:
    """TensorRT plans run only on the compute capability that built them: require it (GFD's labels)."""
    if not on_gpu or not facts.compute_capability or "." not in facts.compute_capability:
        return None
    major, minor = facts.compute_capability.split(".", 1)
    terms = [
        {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": [major]},
        {"key": "nvidia.com/gpu.compute.minor", "operator": "In", "values": [minor]},
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": terms}]}
        }
    }


def _placement(facts: RepositoryFacts, opts: DeployOptions, on_gpu: bool) -> dict[str, Any]:
    """Where the pod may run (nodeSelector, GPU tolerations, the plans' GPU family), as pod-spec fields."""
    placement: dict[str, Any] = {}
    selector = _node_selector(opts, on_gpu)
    if selector:
        placement["nodeSelector"] = selector
    if on_gpu:
        placement["tolerations"] = _gpu_tolerations(on_gpu)
    affinity = _plan_affinity(facts, on_gpu)
    if affinity:
        placement["affinity"] = affinity
    return placement


def _shm_volume(opts: DeployOptions) -> dict[str, Any]:
    # The python backend moves every tensor through /dev/shm; the runtime's default is 64 MB.
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}


PROBE_MOUNT = "/opt/clip-triton"
PROBE_FILE = "health_probe.py"
ADMIN_KEY_ENV = "CLIP_TRITON_ADMIN_KEY"
# Probe timing (docs/deploy.md, "Health"): a dead python stub turns the pod not-ready within
# READY_PERIOD_S + one probe, and restarts it within LIVE_PERIOD_S x LIVE_FAILURES + one probe.
READY_PERIOD_S, LIVE_PERIOD_S, LIVE_FAILURES, PROBE_TIMEOUT_S = 10, 20, 3, 15


def _admin_secret_name(name: str) -> str:
    return f"{name}-admin"


def _probe_config_name(name: str) -> str:
    return f"{name}-health-probe"


def _triton_env(name: str) -> list[dict[str, Any]]:
    return [
        *({"name": name, "value": value} for name, value in MALLOC_ENV.items()),
        # The header value that unlocks the admin APIs; nothing in the pod uses them, no client gets it.
        {
            "name": ADMIN_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": _admin_secret_name(name), "key": "key"}},
        },
    ]


def _triton_args(repository: str, http: int, grpc: int, expose_http: bool) -> list[str]:
    return [
        f"--model-repository={repository}",
        # Triton's HTTP/JSON front has parser faults we cannot patch (docs/limits.md, "The public
        # surface"): on loopback it serves only the exec probes, unless the user asked to expose it.
        f"--http-address={'0.0.0.0' if expose_http else '127.0.0.1'}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={METRICS_PORT}",
        "--metrics-address=0.0.0.0",  # read-only; otherwise it would follow --http-address
        "--model-control-mode=none",  # no client loads, unloads or replaces a model
        *admin_lock_args(f"$({ADMIN_KEY_ENV})"),  # Kubernetes expands $(VAR) from the container's env
        # Pooled gRPC request objects keep the capacity of the largest payload they carried (docs/limits.md).
        "--grpc-infer-allocation-pool-size=0",
        "--exit-on-error=true",  # a model that fails to load fails the pod, visibly
        "--strict-readiness=true",  # ready only when every model is
    ]


def _probe(facts: RepositoryFacts, http: int, *extra: str) -> dict[str, Any]:
    command = ["python3", f"{PROBE_MOUNT}/{PROBE_FILE}", "--url", f"127.0.0.1:{http}", "--prefix", facts.prefix]
    return {"exec": {"command": command + list(extra)}}


def _probes(facts: RepositoryFacts, http: int, budget: int) -> dict[str, Any]:
    """Startup waits for Triton's readiness; readiness and liveness run a real tiny inference through every
    ensemble (health_probe.py), because Triton reports READY while a dead python stub fails every request."""
    return {
        "startupProbe": {
            **_probe(facts, http, "--ready-only"),
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": budget // STARTUP_PERIOD_S,
        },
        "livenessProbe": {
            **_probe(facts, http),
            "periodSeconds": LIVE_PERIOD_S,
            "timeoutSeconds": PROBE_TIMEOUT_S,
            "failureThreshold": LIVE_FAILURES,
        },
        "readinessProbe": {
            **_probe(facts, http),
            "periodSeconds": READY_PERIOD_S,
            "timeoutSeconds": PROBE_TIMEOUT_S,
            "failureThreshold": 1,
        },
    }


def _probe_volume(name: str) -> dict[str, Any]:
    return {"name": "health-probe", "configMap": {"name": _probe_config_name(name), "defaultMode": 0o444}}


_PROBE_VOLUME_MOUNT = {"name": "health-probe", "mountPath": PROBE_MOUNT, "readOnly": True}


def _gateway_container(facts: RepositoryFacts, opts: DeployOptions, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway beside Triton: it reaches Triton over the pod's loopback (gRPC), so each pod answers
    /v1/embeddings by itself and the Service spreads clients over pods. Ready only while a real tiny
    inference through Triton succeeds (its /health/ready)."""
    args = ["--url", f"127.0.0.1:{GRPC_PORT}", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--prefix", facts.prefix]
    mounts = []
    if opts.gateway_keys_secret:
        volumes.append({"name": "gateway-keys", "secret": {"secretName": opts.gateway_keys_secret,
                                                           "defaultMode": 0o440}})
        mounts.append({"name": "gateway-keys", "mountPath": GATEWAY_KEYS_MOUNT, "readOnly": True})
        args += ["--api-keys", f"{GATEWAY_KEYS_MOUNT}/keys"]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "gateway"}, "periodSeconds": period, "timeoutSeconds": 15,
                "failureThreshold": failures}

    security = {**_container_security(), "runAsUser": GATEWAY_UID, "runAsGroup": GATEWAY_UID,
                "readOnlyRootFilesystem": True}
    return {
        "name": "gateway",
        "image": opts.gateway_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "gateway", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "livenessProbe": probe("/health/live", 10, 3),
        "readinessProbe": probe("/health/ready", 10, 1),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "securityContext": security,
        "volumeMounts": mounts,
    }


def support_documents(name: str, opts: DeployOptions, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The probe script (a ConfigMap) and the admin-API key (a Secret), for both targets."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(_probe_config_name(name), opts, labels),
            "data": {PROBE_FILE: (REPOSITORY_SOURCES / PROBE_FILE).read_text()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(_admin_secret_name(name), opts, labels),
            "type": "Opaque",
            # Random per `deploy` run; changing it restarts nothing (read at container start).
            "stringData": {"key": secrets.token_hex(16)},
        },
    ]


def _download_bytes(facts: RepositoryFacts, opts: DeployOptions) -> int:
    return facts.repository_bytes if opts.storage_uri and not opts.storage_uri.startswith("pvc://") else 0


def _tmp_size(facts: RepositoryFacts, opts: DeployOptions) -> str:
    # Triton copies an object-store repository into a temporary folder before loading it.
    return f"{math.ceil(1 + 1.25 * _download_bytes(facts, opts) / GIB)}Gi"


def k8s_documents(facts: RepositoryFacts, opts: DeployOptions, name: str, on_gpu: bool) -> dict[str, list[dict]]:
    """Deployment, Service, PodDisruptionBudget and (when it can scale) the HPA, by file name."""
    release = facts.release
    labels = _labels(name, release)
    budget = startup_budget_s(facts.encoder_bytes, _download_bytes(facts, opts))
    repository = opts.storage_uri.rstrip("/") if opts.storage_uri else MODELS_MOUNT
    volumes: list[dict[str, Any]] = [
        _shm_volume(opts),
        {"name": "tmp", "emptyDir": {"sizeLimit": _tmp_size(facts, opts)}},
    ]
    volumes.append(_probe_volume(name))
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        _PROBE_VOLUME_MOUNT,
    ]
    if opts.pvc:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": opts.pvc, "readOnly": True}})
        mount: dict[str, Any] = {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}
        if opts.pvc_subpath:
            mount["subPath"] = opts.pvc_subpath
        mounts.append(mount)
    container: dict[str, Any] = {
        "name": "triton",
        "image": opts.image or release.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tritonserver"],
        "args": _triton_args(repository, HTTP_PORT, GRPC_PORT, opts.expose_http),
        "env": _triton_env(name),
        "ports": ([{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}] if opts.expose_http else [])
        + [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        **_probes(facts, HTTP_PORT, budget),
        # Let endpoints drop the pod before Triton stops accepting requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
        "resources": _resources(facts, opts, on_gpu),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if opts.credentials_secret:
        # S3 / Azure read their variables from the environment; a GCS key file is read from the mount
        # (put GOOGLE_APPLICATION_CREDENTIALS=<mount>/<key> into the same secret; docs/deploy.md).
        container["envFrom"] = [{"secretRef": {"name": opts.credentials_secret}}]
        volumes.append({"name": "storage-credentials", "secret": {"secretName": opts.credentials_secret}})
        mounts.append({"name": "storage-credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True})
    containers = [container]
    if opts.gateway_image:
        containers.append(_gateway_container(facts, opts, volumes))
    pod_spec: dict[str, Any] = {
        # Triton never calls the Kubernetes API. Workload identity needs no API token either: EKS (IRSA) and
        # Azure inject their own projected token volume, GKE answers on the metadata server.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": 60,  # preStop 10 s + Triton's 30 s exit timeout for in-flight requests
        "containers": containers,
        "volumes": volumes,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": _selector(name)},
            }
        ],
    }
    if opts.service_account:
        pod_spec["serviceAccountName"] = opts.service_account
    pod_spec.update(_placement(facts, opts, on_gpu))
    autoscale = opts.max_replicas > opts.min_replicas
    deployment_spec: dict[str, Any] = {}
    if not autoscale:
        deployment_spec["replicas"] = opts.min_replicas  # with an HPA, the HPA owns the count
    deployment_spec.update(
        {
            "selector": {"matchLabels": _selector(name)},
            # A new pod serves before an old one goes; a rollout may take the whole startup budget.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": max(600, budget + 300),
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        }
    )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            name,
            opts,
            labels,
            annotations={
                "clip-triton/model": facts.model_name,
                "clip-triton/runtime": facts.runtime,
                "clip-triton/triton-release": release.release,
                "clip-triton/startup-budget-seconds": str(budget),
            },
        ),
        "spec": deployment_spec,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, opts, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(name),
            "ports": (
                [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
                if opts.expose_http
                else []
            )
            + [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ]
            + (
                [{"name": "gateway", "port": GATEWAY_PORT, "targetPort": "gateway", "protocol": "TCP",
                  "appProtocol": "http"}]
                if opts.gateway_image
                else []
            ),
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, opts, labels),
        # maxUnavailable, not minAvailable: a one-replica deployment must still let nodes drain.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(name)}},
    }
    # Only the client API and the metrics come in (HTTP is on loopback anyway; this also holds if a
    # later edit exposes it by mistake). Enforced where the cluster's network plugin supports policies.
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name, opts, labels),
        "spec": {
            "podSelector": {"matchLabels": _selector(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": p["containerPort"]} for c in containers for p in c["ports"]]}
            ],
        },
    }
    docs: dict[str, list[dict]] = {
        "05-support.yaml": support_documents(name, opts, labels),
        "10-deployment.yaml": [deployment],
        "20-service.yaml": [service],
        "30-poddisruptionbudget.yaml": [pdb],
        "35-networkpolicy.yaml": [policy],
    }
    if autoscale:
        target = opts.queue_time_target_us or default_queue_target_us(facts)
        docs["40-horizontalpodautoscaler.yaml"] = [
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": _meta(name, opts, labels),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": opts.min_replicas,
                    "maxReplicas": opts.max_replicas,
                    "metrics": [
                        {
                            "type": "Pods",
                            "pods": {
                                "metric": {"name": QUEUE_METRIC},
                                "target": {"type": "AverageValue", "averageValue": str(target)},
                            },
                        }
                    ],
                    # GPU pods take minutes to become ready: add capacity early, remove it slowly.
                    "behavior": {
                        "scaleUp": {
                            "stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                        },
                        "scaleDown": {
                            "stabilizationWindowSeconds": 600,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                        },
                    },
                },
            }
        ]
    return docs


def prometheus_adapter_values() -> dict[str, Any]:
    """Values for the prometheus-community/prometheus-adapter chart: the rule that turns Triton's
    counters into avg_time_queue_us per pod (docs/deploy.md compares it with Triton's own chart)."""
    window = "1m"  # two scrapes at Prometheus' usual 30 s interval
    queue = f"sum(increase(nv_inference_queue_duration_us{{<<.LabelMatchers>>}}[{window}])) by (<<.GroupBy>>)"
    done = f"sum(increase(nv_inference_request_success{{<<.LabelMatchers>>}}[{window}])) by (<<.GroupBy>>)"
    return {
        "rules": {
            "custom": [
                {
                    "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                    "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_METRIC},
                    # +1 keeps an idle pod at 0 instead of 0/0.
                    "metricsQuery": f"{queue} / (1 + {done})",
                }
            ]
        }
    }


def kserve_documents(facts: RepositoryFacts, opts: DeployOptions, name: str, on_gpu: bool) -> dict[str, list[dict]]:
    """A ServingRuntime of our own (the stock one has no /dev/shm volume, memory flags or sized resources)
    and the InferenceService that names it."""
    release = facts.release
    labels = _labels(name, release)
    runtime_name = f"{name}-runtime"
    grpc = opts.kserve_protocol == "grpc"
    budget = startup_budget_s(facts.encoder_bytes, _download_bytes(facts, opts))
    runtime_container: dict[str, Any] = {
        "name": "kserve-container",  # the name KServe merges the InferenceService's model container into
        "image": opts.image or release.image,
        "command": ["tritonserver"],
        # Knative's queue-proxy reaches the container's port on the pod's address: an HTTP protocol
        # choice exposes Triton's HTTP front (docs/deploy.md says what that costs).
        "args": _triton_args("/mnt/models", KSERVE_HTTP_PORT, KSERVE_GRPC_PORT, opts.expose_http or not grpc),
        "env": _triton_env(name),
        "securityContext": _container_security(),
        "resources": _resources(facts, opts, on_gpu),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, _PROBE_VOLUME_MOUNT],
        **_probes(facts, KSERVE_HTTP_PORT, budget),
    }
    runtime_spec: dict[str, Any] = {
        "annotations": {"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"},
        "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
        "protocolVersions": ["v2", "grpc-v2"],
        "containers": [runtime_container],
        "volumes": [_shm_volume(opts), _probe_volume(name)],
    }
    runtime_spec.update(_placement(facts, opts, on_gpu))
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": _meta(runtime_name, opts, labels),
        "spec": runtime_spec,
    }
    assert opts.storage_uri is not None
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton", "version": "2"},
        "runtime": runtime_name,
        "protocolVersion": "v2",
        "storageUri": opts.storage_uri,
        # Knative routes to exactly one port; for gRPC it must be named h2c.
        "ports": [
            {"name": "h2c", "containerPort": KSERVE_GRPC_PORT, "protocol": "TCP"}
            if grpc
            else {"name": "http1", "containerPort": KSERVE_HTTP_PORT, "protocol": "TCP"}
        ],
        "resources": _resources(facts, opts, on_gpu),
    }
    if not opts.image:
        # KServe puts runtimeVersion in place of the runtime image's tag: "YY.MM-py3", as NGC tags it.
        model["runtimeVersion"] = f"{release.release}-py3"
    predictor: dict[str, Any] = {
        "minReplicas": opts.min_replicas,  # never 0: a GPU pod takes minutes to come back
        "maxReplicas": opts.max_replicas,
        "securityContext": _pod_security(),
        "model": model,
    }
    if opts.service_account:
        predictor["serviceAccountName"] = opts.service_account
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _meta(
            name,
            opts,
            labels,
            # Knative gives up on a revision that is not ready within its progress deadline (10 min).
            annotations={"serving.knative.dev/progress-deadline": f"{max(600, budget + 300)}s"},
        ),
        "spec": {"predictor": predictor},
    }
    return {
        "05-support.yaml": support_documents(name, opts, labels),
        "10-servingruntime.yaml": [runtime],
        "20-inferenceservice.yaml": [isvc],
    }


def deploy_documents(facts: RepositoryFacts, opts: DeployOptions) -> dict[str, list[dict]]:
    """Every Kubernetes document to write, by file name (validated options)."""
    return _documents(facts, opts, *check_options(facts, opts))


def _documents(facts: RepositoryFacts, opts: DeployOptions, name: str, on_gpu: bool) -> dict[str, list[dict]]:
    """The documents for options check_options passed (with the name and on_gpu it returned)."""
    if opts.target == "k8s":
        served = serving_facts(facts, opts)
        docs = k8s_documents(served, opts, name, on_gpu)
        _one_model_per_deployment(docs, served, opts, name)
        if opts.build_engines:
            _gate_on_engines(docs, served, opts, name)
        return docs
    docs = kserve_documents(facts, opts, name, on_gpu)
    # KServe adds the predictor's annotations to the pods it makes: a new model is a new revision too.
    docs["20-inferenceservice.yaml"][0]["spec"]["predictor"]["annotations"] = pod_annotations(facts, opts)
    return docs


# ------------------------------------------------------------------ one model per Deployment, headless Service


def headless_name(name: str) -> str:
    return f"{name}-headless"


def serving_facts(facts: RepositoryFacts, opts: DeployOptions) -> RepositoryFacts:
    """The repository the pods serve: with --build-engines, the one the Job writes (tensorrt; its plans' GPU
    family is the Job's node's, unknown here), else the one given."""
    if not opts.build_engines:
        return facts
    return dataclasses.replace(facts, runtime="tensorrt", compute_capability=None)


def pod_annotations(facts: RepositoryFacts, opts: DeployOptions) -> dict[str, str]:
    """What the pod template carries so that another model (or another repository) rolls the pods: the
    published encoder checksums, the repository digest and where the repository is read from."""
    annotations = {f"clip-triton/{tower}-encoder-sha256": sha for tower, sha in sorted(facts.encoder_sha256.items())}
    annotations["clip-triton/repository-sha256"] = facts.repository_sha256
    where = opts.storage_uri or f"pvc://{opts.pvc}/{(opts.pvc_subpath or '').strip('/')}"
    annotations["clip-triton/repository"] = where
    return annotations


def _one_model_per_deployment(docs: dict[str, list[dict]], facts: RepositoryFacts, opts: DeployOptions,
                              name: str) -> None:
    """The pod template's checksum annotations, and the headless Service when asked for."""
    (deployment,) = docs["10-deployment.yaml"]
    deployment["spec"]["template"]["metadata"]["annotations"].update(pod_annotations(facts, opts))
    if not opts.headless_service:
        return
    (service,) = docs["20-service.yaml"]
    ports = [p for p in service["spec"]["ports"] if p["name"] != "metrics"]  # metrics: scraped per pod anyway
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(headless_name(name), opts, service["metadata"]["labels"]),
        "spec": {
            "clusterIP": "None",  # DNS answers with every ready pod's IP instead of one virtual IP
            "selector": _selector(name),
            "publishNotReadyAddresses": False,
            "ports": ports,
        },
    }
    docs["21-service-headless.yaml"] = [headless]


# ------------------------------------------------------------------------ engines built where they run

TENSORRT_IMAGE = "nvcr.io/nvidia/tensorrt"
ENGINES_MARKER = "clip-triton-ready.sha256"  # sha256sum lines of the gated plans and the configs
PVC_MOUNT = "/work/pvc"  # the Job's (and the wait initContainer's) mount of the whole volume
BUILD_MOUNT = "/opt/clip-triton-build"
BUILD_SCRIPT = "build-engines.sh"
DOCKER_SCRIPT = "docker-build-engines.sh"
ENGINES_FOLDER = "build-engines"  # beside the manifests; `kubectl apply -f DIR` does not descend into it
ENGINES_DEADLINE_S = 4 * 3600  # pip install + two builds + parity; the pods wait this long plus an hour
# pip extras a --clip-triton-spec must not ask for: the TensorRT container's own TensorRT builds the plans.
REFUSED_EXTRAS = frozenset({"tensorrt"})
# Beside the export, as parity's own default folder (EXPORT-parity/): parity never writes into the export.
PARITY_REPORT = "$EXPORT_DIR-parity/parity-tensorrt.json"


def tensorrt_image(facts: RepositoryFacts, opts: DeployOptions) -> str:
    """NVIDIA's TensorRT container of the repository's Triton release: the same YY.MM ships the same TensorRT
    (docs/deploy.md says what is checked; the build script refuses an image whose TensorRT differs)."""
    return opts.tensorrt_image or f"{TENSORRT_IMAGE}:{facts.release.release}-py3"


def engines_job_name(name: str, facts: RepositoryFacts) -> str:
    """One Job per model: a Job's pod template is immutable, and a new model is a new folder anyway."""
    sha = facts.encoder_sha256.get("image") or facts.repository_sha256
    return f"{name}-engines-{sha[:8]}"


def engines_commands(facts: RepositoryFacts) -> list[list[str]]:
    """The clip-triton commands the build runs, in order (tokens with $VAR are expanded by the script): the
    plans, the tensorrt repository written with the options the given repository was written with, parity."""
    record = facts.record
    max_batch = record.get("max_batch_size")
    batch = ["--max-batch", str(max_batch)] if isinstance(max_batch, int) else []
    engines = ["clip-triton", "engines", "--export", "$EXPORT_DIR", "--timing-cache", "$EXPORT_DIR/timing.cache",
               *batch]
    repository = ["clip-triton", "repository", "--export", "$EXPORT_DIR", "--out", "$REPOSITORY_DIR",
                  "--runtime", "tensorrt", "--device", "gpu", "--prefix", facts.prefix,
                  "--triton-release", facts.release.release, "--copy-files", *batch]
    for key in ("queue_delay_us", "instances", "preprocess_instances", "preprocess_threads"):
        if isinstance(record.get(key), int):
            repository += [f"--{key.replace('_', '-')}", str(record[key])]
    repository.append("--dynamic-batching" if facts.dynamic_batching else "--no-dynamic-batching")
    for key, value in sorted((record.get("limits") or {}).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            repository += [f"--{key.replace('_', '-')}", repr(value)]
    deps = record.get("python_deps")
    repository += ["--deps-arch", str(deps.get("arch", "x86_64"))] if isinstance(deps, dict) else ["--no-python-deps"]
    parity = ["clip-triton", "parity", "--export", "$EXPORT_DIR", "--repository", "$REPOSITORY_DIR",
              "--report", PARITY_REPORT]
    return [engines, repository, parity]


def _shell(argv: list[str]) -> str:
    """One command line: $VAR tokens in double quotes (expanded), the rest quoted as literals."""
    return " ".join(f'"{t}"' if t.startswith("$") and re.fullmatch(r"\$[A-Z_]+[A-Za-z0-9_./-]*", t)
                    else shlex.quote(t) for t in argv)


def build_script(facts: RepositoryFacts) -> str:
    """The in-container steps (bash), for the Job and for docker-build-engines.sh alike."""
    engines, repository, parity = engines_commands(facts)
    image_model, text_model = facts.models["image_encoder"], facts.models["text_encoder"]
    values = {
        "@RELEASE@": facts.release.release,
        "@TENSORRT@": facts.release.tensorrt or "",
        "@MARKER@": ENGINES_MARKER,
        "@REPORT@": PARITY_REPORT,
        "@IMAGE_PLAN@": IMAGE_PLAN,
        "@TEXT_PLAN@": TEXT_PLAN,
        "@IMAGE_MODEL@": image_model,
        "@TEXT_MODEL@": text_model,
        "@ENGINES@": _shell(engines),
        "@REPOSITORY@": _shell(repository),
        "@PARITY@": _shell(parity),
    }
    text = _BUILD_SCRIPT
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def docker_script(facts: RepositoryFacts, opts: DeployOptions) -> str:
    """The same build on one GPU host with docker: build-engines.sh in the TensorRT container."""
    return _DOCKER_SCRIPT.replace("@IMAGE@", tensorrt_image(facts, opts)).replace("@RELEASE@", facts.release.release)


def _build_config_name(name: str) -> str:
    return f"{name}-build-engines"


def _gate_on_engines(docs: dict[str, list[dict]], facts: RepositoryFacts, opts: DeployOptions, name: str) -> None:
    """The Job that builds and gates the plans, and the Deployment's initContainer that waits for its mark."""
    assert opts.pvc and opts.pvc_subpath and opts.engines_export_subpath and opts.clip_triton_spec
    (deployment,) = docs["10-deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    labels = dict(deployment["metadata"]["labels"], **{"app.kubernetes.io/component": "engine-build"})
    repository = f"{PVC_MOUNT}/{opts.pvc_subpath.strip('/')}"
    env = [
        {"name": "EXPORT_DIR", "value": f"{PVC_MOUNT}/{opts.engines_export_subpath.strip('/')}"},
        {"name": "REPOSITORY_DIR", "value": repository},
        {"name": "CLIP_TRITON_SPEC", "value": opts.clip_triton_spec},
        {"name": "HOME", "value": "/tmp/clip-triton-home"},
        # The PyTorch reference's weights (a --pretrained tag): cached on the volume, so a second run and an
        # offline cluster (pre-filled cache) need no download.
        {"name": "HF_HOME", "value": f"{PVC_MOUNT}/.cache/huggingface"},
    ]
    if opts.wheelhouse_subpath:  # pip's own variables: install from the volume's wheels only
        env += [{"name": "PIP_NO_INDEX", "value": "1"},
                {"name": "PIP_FIND_LINKS", "value": f"{PVC_MOUNT}/{opts.wheelhouse_subpath.strip('/')}"},
                {"name": "HF_HUB_OFFLINE", "value": "1"}]
    gib = facts.encoder_bytes / GIB
    memory = f"{math.ceil(16 + 4 * gib)}Gi"  # torch reference + ONNX parse + builder, per tower in turn
    amounts = {"cpu": opts.cpus or "4", "memory": memory, "nvidia.com/gpu": "1"}
    job_pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": "build-engines",
                "image": tensorrt_image(facts, opts),
                "imagePullPolicy": "IfNotPresent",
                "command": ["bash", f"{BUILD_MOUNT}/{BUILD_SCRIPT}"],
                "env": env,
                "resources": {"requests": dict(amounts), "limits": dict(amounts)},
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "volume", "mountPath": PVC_MOUNT},
                    {"name": "script", "mountPath": BUILD_MOUNT, "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "volume", "persistentVolumeClaim": {"claimName": opts.pvc}},
            {"name": "script", "configMap": {"name": _build_config_name(name), "defaultMode": 0o555}},
            # pip's install of clip-triton and torch lands under $HOME in /tmp: several GiB.
            {"name": "tmp", "emptyDir": {"sizeLimit": "30Gi"}},
            _shm_volume(opts),
        ],
    }
    if opts.service_account:
        job_pod["serviceAccountName"] = opts.service_account
    # The serving pods' placement: the same nodeSelector and tolerations, so the plans are built on the GPU
    # family the pods get (pass --node-selector with a GPU product label where the cluster mixes families).
    job_pod.update(_placement(facts, opts, True))
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(engines_job_name(name, facts), opts, labels,
                          annotations={"clip-triton/tensorrt-image": tensorrt_image(facts, opts),
                                       **pod_annotations(facts, opts)}),
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": ENGINES_DEADLINE_S,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,  # kept a week for its logs
            "template": {"metadata": {"labels": labels}, "spec": job_pod},
        },
    }
    script = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(_build_config_name(name), opts, labels),
        "data": {BUILD_SCRIPT: build_script(facts)},
    }
    docs["08-build-engines.yaml"] = [script, job]
    # The gate: no Triton container starts before the Job's mark is there and matches the files. The volume's
    # root is mounted here (not the subPath, which the kubelet would create empty if the Job has not yet).
    relative = opts.pvc_subpath.strip("/")
    wait = (
        f'marker={PVC_MOUNT}/{relative}/{ENGINES_MARKER}; deadline=$((SECONDS + {ENGINES_DEADLINE_S + 3600}))\n'
        'until [ -f "$marker" ]; do\n'
        '  if [ "$SECONDS" -ge "$deadline" ]; then\n'
        f'    echo "no ready mark at $marker: the Job {engines_job_name(name, facts)} did not pass (kubectl logs job/'
        f'{engines_job_name(name, facts)})" >&2; exit 1\n'
        '  fi\n'
        f'  echo "waiting for Job {engines_job_name(name, facts)} to build and gate the plans ($marker)"; sleep 15\n'
        'done\n'
        f'cd {PVC_MOUNT}/{relative} && sha256sum --check --strict --quiet {ENGINES_MARKER} || '
        '{ echo "the repository differs from what the Job gated: it was changed in place" >&2; exit 1; }\n'
    )
    triton = pod["containers"][0]
    pod["initContainers"] = [
        {
            "name": "wait-for-engines",
            "image": triton["image"],  # already pulled for Triton; has bash and sha256sum
            "imagePullPolicy": "IfNotPresent",
            "command": ["bash", "-c", wait],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
            "securityContext": _container_security(),
            "volumeMounts": [{"name": "engines-volume", "mountPath": PVC_MOUNT, "readOnly": True}],
        }
    ]
    claim = {"claimName": opts.pvc, "readOnly": True}
    pod["volumes"].append({"name": "engines-volume", "persistentVolumeClaim": claim})
    deployment["metadata"]["annotations"]["clip-triton/engines-job"] = engines_job_name(name, facts)


_BUILD_SCRIPT = r"""#!/usr/bin/env bash
# Written by `clip-triton deploy --build-engines` (clip-triton's docs/deploy.md, "Engines built where they run").
# Runs INSIDE nvcr.io/nvidia/tensorrt:@RELEASE@-py3, on a GPU of the family that will serve the plans; the
# Kubernetes Job (08-build-engines.yaml) and docker-build-engines.sh both run it. Steps: install clip-triton
# beside the image's own TensorRT, build the plans, write the tensorrt repository for Triton @RELEASE@, gate
# it with parity against PyTorch, and only then write the ready mark that the serving pods wait for.
# Environment: EXPORT_DIR (the export, FP16 graphs made), REPOSITORY_DIR (a new, versioned folder),
# CLIP_TRITON_SPEC (pip requirement or wheel path); PIP_NO_INDEX / PIP_FIND_LINKS for an offline wheelhouse.
set -euo pipefail

: "${EXPORT_DIR:?set EXPORT_DIR: the export folder holding the FP16 graphs}"
: "${REPOSITORY_DIR:?set REPOSITORY_DIR: the new, versioned repository folder to write}"
: "${CLIP_TRITON_SPEC:?set CLIP_TRITON_SPEC: a pip requirement or wheel path for clip-triton}"
TRITON_RELEASE="@RELEASE@"
# What tritonserver:@RELEASE@-py3 ships, per clip-triton's release table ("": unconfirmed).
EXPECTED_TENSORRT="@TENSORRT@"
MARKER="@MARKER@"
REPORT="@REPORT@"
PLANS=("@IMAGE_MODEL@/1/model.plan" "@TEXT_MODEL@/1/model.plan")

say() { echo "build-engines: $*" >&2; }
fail() { say "error: $*"; exit 1; }

if [ -f "$REPOSITORY_DIR/$MARKER" ]; then
  if (cd "$REPOSITORY_DIR" && sha256sum --check --strict --quiet "$MARKER"); then
    say "$REPOSITORY_DIR is already built and gated; nothing to do (a new model goes to a new folder)"
    exit 0
  fi
  fail "$REPOSITORY_DIR has a ready mark that its files no longer match (changed in place?); write to a new folder"
fi

trt_version() { python3 -c 'import tensorrt; print(tensorrt.__version__)'; }
image_trt="$(trt_version)" ||
  fail "no tensorrt Python module here: run this in nvcr.io/nvidia/tensorrt:${TRITON_RELEASE}-py3"
if [ -z "$EXPECTED_TENSORRT" ]; then
  say "TensorRT $image_trt; which TensorRT tritonserver:${TRITON_RELEASE}-py3 ships is unconfirmed"
elif [ "$image_trt" != "$EXPECTED_TENSORRT" ]; then
  fail "this image ships TensorRT $image_trt, tritonserver:${TRITON_RELEASE}-py3 ships $EXPECTED_TENSORRT:" \
    "its plans would not load there"
else
  say "TensorRT $image_trt, as tritonserver:${TRITON_RELEASE}-py3 ships"
fi

# pip installs into $HOME/.local; the image's TensorRT must stay the one that builds the plans.
export HOME=/tmp/clip-triton-home PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$HOME/.local/bin:$PATH"
mkdir -p "$HOME"
say "installing $CLIP_TRITON_SPEC${PIP_FIND_LINKS:+ from $PIP_FIND_LINKS}"
python3 -m pip install --user "$CLIP_TRITON_SPEC"
[ "$(trt_version)" = "$image_trt" ] ||
  fail "installing $CLIP_TRITON_SPEC replaced the image's TensorRT $image_trt (drop the tensorrt extra)"

@ENGINES@

force=()
if [ -e "$REPOSITORY_DIR" ]; then
  say "replacing $REPOSITORY_DIR: an earlier attempt that was never marked ready"
  force=(--force)
fi
@REPOSITORY@ ${force[@]+"${force[@]}"}

@PARITY@
python3 - "$REPORT" <<'PY'
import json
import sys

result = json.load(open(sys.argv[1]))
status = {stage["stage"]: stage["status"] for stage in result["stages"]}
if not result.get("passed") or status.get("tensorrt") != "pass":
    sys.exit(f"build-engines: error: parity did not pass the TensorRT stage: {status}")
PY

# The repository serves exactly the plans parity judged.
cmp "$EXPORT_DIR/@IMAGE_PLAN@" "$REPOSITORY_DIR/${PLANS[0]}" || fail "the repository's image plan is not the gated one"
cmp "$EXPORT_DIR/@TEXT_PLAN@" "$REPOSITORY_DIR/${PLANS[1]}" || fail "the repository's text plan is not the gated one"
(cd "$REPOSITORY_DIR" && sha256sum "${PLANS[@]}" ./*/config.pbtxt > "$MARKER.tmp" && mv "$MARKER.tmp" "$MARKER")
say "ready: $REPOSITORY_DIR (TensorRT $image_trt, Triton $TRITON_RELEASE, parity report $REPORT)"
"""

_DOCKER_SCRIPT = r"""#!/usr/bin/env bash
# Written by `clip-triton deploy --build-engines`: the engine build on one GPU host with docker, in
# @IMAGE@ (Triton @RELEASE@'s TensorRT), running build-engines.sh beside this file.
# Usage: docker-build-engines.sh EXPORT_DIR REPOSITORY_DIR CLIP_TRITON_SPEC [WHEELHOUSE_DIR]
#   EXPORT_DIR        the export with the FP16 graphs (clip-triton export + fp16); plans are written into it
#   REPOSITORY_DIR    a new, versioned folder for the tensorrt repository (its parent must exist)
#   CLIP_TRITON_SPEC  a wheel file on this host, or a pip requirement (clip-triton==0.1.0)
#   WHEELHOUSE_DIR    optional: install from these wheels only (no index; offline hosts)
# TENSORRT_IMAGE overrides the image (a mirror of the same tag).
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$#" -gt 4 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
image="${TENSORRT_IMAGE:-@IMAGE@}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export_dir="$(cd "$1" && pwd)"
out_parent="$(cd "$(dirname "$2")" && pwd)"
out_name="$(basename "$2")"
spec="$3"
args=(
  --rm --gpus all --shm-size 2g --user "$(id -u):$(id -g)"
  -v "$export_dir:/work/export" -v "$out_parent:/work/out" -v "$here/build-engines.sh:/work/build-engines.sh:ro"
  -e EXPORT_DIR=/work/export -e "REPOSITORY_DIR=/work/out/$out_name"
)
if [ -f "$spec" ]; then  # a wheel on this host: mounted, and installed by its path in the container
  spec_dir="$(cd "$(dirname "$spec")" && pwd)"
  args+=(-v "$spec_dir:/work/spec:ro")
  spec="/work/spec/$(basename "$spec")"
fi
args+=(-e "CLIP_TRITON_SPEC=$spec")
if [ "$#" -eq 4 ]; then
  args+=(-v "$(cd "$4" && pwd):/work/wheels:ro" -e PIP_NO_INDEX=1 -e PIP_FIND_LINKS=/work/wheels -e HF_HUB_OFFLINE=1)
fi
if [ -n "${HF_HOME:-}" ]; then  # the PyTorch reference's weights, from this host's Hugging Face cache
  args+=(-v "$HF_HOME:/work/hf-home" -e HF_HOME=/work/hf-home)
fi
exec docker run "${args[@]}" "$image" bash /work/build-engines.sh
"""


class _PlainDumper(yaml.SafeDumper):
    """Writes shared dicts out in full: no &anchors / *aliases, which reviewers and some tools trip on."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(docs: list[dict]) -> str:
    return "---\n".join(
        yaml.dump(d, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=1000) for d in docs
    )


def _readme(facts: RepositoryFacts, opts: DeployOptions, files: list[str], on_gpu: bool) -> str:
    where = opts.storage_uri or f"PersistentVolumeClaim {opts.pvc}" + (
        f" (subPath {opts.pvc_subpath})" if opts.pvc_subpath else ""
    )
    lines = [
        f"# {facts.model_name} on Triton ({opts.target})",
        "",
        f"Written by `clip-triton deploy` for the {facts.runtime} repository at {facts.path}, "
        f"Triton release {facts.release.release} (`{opts.image or facts.release.image}`), "
        f"{'GPU pods (nodes with ' + facts.release.driver_note + ')' if on_gpu else 'CPU pods'}. "
        f"The repository is read from {where}: copy it there first.",
        "",
        "```",
        "kubectl apply -f ." if not opts.namespace else f"kubectl apply -n {opts.namespace} -f .",
        "```",
        "",
        "Files: " + ", ".join(files) + ".",
    ]
    if "prometheus-adapter/values.yaml" in files:
        lines += [
            "",
            "The HorizontalPodAutoscaler scales on the custom metric `avg_time_queue_us`, served by "
            "prometheus-adapter with the rule in prometheus-adapter/values.yaml (not a Kubernetes object: "
            "merge it into your adapter's values). See clip-triton's docs/deploy.md.",
        ]
    if opts.gateway_image:
        auth = (f"bearer keys from Secret `{opts.gateway_keys_secret}` (entry `keys`)" if opts.gateway_keys_secret
                else "NO authentication (pass --gateway-keys-secret, or keep the Service internal)")
        lines += [
            "",
            f"Each pod also runs the OpenAI-compatible gateway (`{opts.gateway_image}`) on port {GATEWAY_PORT} of the "
            f"Service: POST /v1/embeddings, /v1/classify, GET /v1/models; {auth}. It reaches Triton over the "
            "pod's loopback. See clip-triton's docs/gateway.md.",
        ]
    if opts.headless_service:
        lines += [
            "",
            f"Headless Service `{headless_name(name_of(facts, opts))}`: its DNS name answers with every ready pod's "
            "IP. clip-triton's client spreads over the endpoints listed in `--url`, one gRPC connection each, so "
            "resolve the name and list them: `--url \"$(getent ahosts "
            f"{headless_name(name_of(facts, opts))} | awk '{{print $1\":{GRPC_PORT}\"}}' | sort -u | paste -sd, -)\"` "
            "(the list is fixed when the client starts; see clip-triton's docs/deploy.md).",
        ]
    if opts.build_engines:
        job = engines_job_name(name_of(facts, opts), facts)
        lines += [
            "",
            f"Engines: Job `{job}` (08-build-engines.yaml) builds the TensorRT plans in "
            f"`{tensorrt_image(facts, opts)}` on a GPU node, writes the tensorrt repository to "
            f"`{opts.pvc_subpath}` in PersistentVolumeClaim `{opts.pvc}`, runs parity against PyTorch and only then "
            f"writes `{ENGINES_MARKER}` there; each pod's initContainer `wait-for-engines` waits for that mark and "
            f"checks the files against it. Follow it with `kubectl logs -f job/{job}`. Without a cluster: "
            f"`{ENGINES_FOLDER}/{DOCKER_SCRIPT} EXPORT_DIR REPOSITORY_DIR CLIP_TRITON_SPEC [WHEELHOUSE_DIR]` runs the "
            "same build with docker on one GPU host. Not run where this was generated (no GPU, cluster or docker).",
        ]
    return "\n".join(lines) + "\n"


def name_of(facts: RepositoryFacts, opts: DeployOptions) -> str:
    return check_options(facts, opts)[0]


def missing_credentials(opts: DeployOptions) -> str | None:
    """One line when an object-store repository is given no way to authenticate (a public bucket, or node-level
    identity, is the only way such pods start); None otherwise."""
    uri = opts.storage_uri or ""
    if opts.credentials_secret or opts.service_account or not uri.startswith(("s3://", "gs://", "as://")):
        return None
    return (f"--storage-uri {uri} has no credentials (--credentials-secret or --service-account): the pods read it "
            "only if the bucket is public or the nodes' own identity may; otherwise Triton fails to start")


def write_deploy(
    repo: Path, out: Path, opts: DeployOptions, *, force: bool = False, progress: Progress | None = None
) -> list[str]:
    """Validate, then write the manifests into `out` (atomically); returns the files written."""
    progress = progress or Progress("deploy", quiet=True)
    facts = repository_facts(repo)
    name, on_gpu = check_options(facts, opts)
    missing = missing_credentials(opts)
    if missing:
        progress.warn(missing)
    docs = _documents(facts, opts, name, on_gpu)
    files = sorted(docs)
    if opts.target == "k8s" and "40-horizontalpodautoscaler.yaml" in docs:
        files.append("prometheus-adapter/values.yaml")
    scripts = {}
    if opts.build_engines:
        scripts = {BUILD_SCRIPT: build_script(facts), DOCKER_SCRIPT: docker_script(facts, opts)}
    files += [f"{ENGINES_FOLDER}/{script}" for script in scripts]
    with staged_dir(out, force=force) as tmp:
        if scripts:  # its own folder too; the same build-engines.sh as the Job's ConfigMap
            (tmp / ENGINES_FOLDER).mkdir()
            for script, text in scripts.items():
                (tmp / ENGINES_FOLDER / script).write_text(text)
                (tmp / ENGINES_FOLDER / script).chmod(0o755)
        for filename, documents in docs.items():
            (tmp / filename).write_text(_dump(documents))
        if "prometheus-adapter/values.yaml" in files:
            # Its own folder: `kubectl apply -f DIR` does not descend into it.
            (tmp / "prometheus-adapter").mkdir()
            (tmp / "prometheus-adapter" / "values.yaml").write_text(_dump([prometheus_adapter_values()]))
        (tmp / "README.md").write_text(_readme(facts, opts, files, on_gpu))
    progress.info(f"{opts.target} manifests for {facts.path} in {out}: {', '.join(files)}")
    return files
