"""Start and stop a local `tritonserver` (the binary shipped in nvidia-pytriton) for a repository.

The recipe (docs/design.md, "The local server"): copy the server folder into a work dir,
put the python backend stub built for this interpreter's X.Y into backends/python/, run with
LD_LIBRARY_PATH = nvidia_pytriton.libs + this interpreter's LIBDIR and PATH = this venv's bin
first (the stub's embedded Python finds its packages through the first python3 on PATH), a
unique shared-memory prefix, free ports, and a readiness wait on HTTP /v2/health/ready.

The server has only the python backend. A python-based backend `backends/onnxruntime/model.py`
(ONNX Runtime on CPU, the same source as the `python` runtime's encoder) is installed too, so an
`onnxruntime` repository written for NVIDIA's container loads unchanged; its KIND_GPU instance
groups are overridden to KIND_CPU at load (explicit model control, load with a config). Likewise
`backends/openvino/model.py` (OpenVINO's Python API, model_repository/openvino_encoder) serves an `openvino`
repository unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from clip_triton.clients.files import pid_alive
from clip_triton.exporter.base.common import REPOSITORY_SOURCES, ClipTritonError, MissingDependencyError

LOG_TAIL_LINES = 40
# Triton's shutdown, once every in-flight inference is done, logs this and unloads the models. A model whose
# python stub died while it held a request never finishes unloading (Triton waits out its exit timeout), so
# after this line the server gets UNLOAD_GRACE seconds, then the process group is ended.
UNLOADING_LINE = "All models are stopped, unloading models"
UNLOAD_GRACE = 5.0
LOOPBACK = "127.0.0.1"
# APIs no client needs and every client could abuse: load/unload (code execution, a model silently
# gone), registering shared memory (mapping the python stubs' regions), trace and log files.
ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "clip-triton-admin"
# glibc's allocator settings for tritonserver and its stubs, wherever they run (serve, the manifests, the
# repository README's docker command): docs/limits.md, "Memory".
#  - MALLOC_ARENA_MAX: glibc gives each gRPC thread its own heap arena and keeps freed large payloads
#    there; two arenas return them (measured: +1.9 GB RSS after ten refused 300 MB requests without, none with).
#  - MALLOC_MMAP_THRESHOLD_: fixed, because glibc raises its dynamic one after a large free and later large
#    payloads then come from the heap and stay resident (measured: +0.33 GiB anonymous memory kept after four
#    refused 256 MiB requests without it, +0.20 GiB with it).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}


def admin_lock_args(key: str) -> list[str]:
    """tritonserver flags that refuse ADMIN_APIS on HTTP and gRPC to any request without `key` in ADMIN_HEADER."""
    locked = f"{ADMIN_APIS}:{ADMIN_HEADER}={key}"
    return [f"--http-restricted-api={locked}", f"--grpc-restricted-protocol={locked}"]


def check_host(host: str) -> str:
    """An IPv4 address to bind to: an address, not a name (a name could resolve elsewhere tomorrow);
    IPv4 only because tritonserver's three fronts each spell IPv6 addresses their own way."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ClipTritonError(f"--host {host!r} is not an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0)") from None


def is_loopback(host: str) -> bool:
    return ipaddress.IPv4Address(host).is_loopback


def _connect_host(host: str) -> str:
    return LOOPBACK if ipaddress.IPv4Address(host).is_unspecified else host


def _pytriton_server_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise MissingDependencyError(
            "the embedded server needs nvidia-pytriton (pip install nvidia-pytriton)"
        ) from None
    path = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (path / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no tritonserver binary at {path}")
    return path


def _libs_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clip-triton"


# backends/onnxruntime/model.py: the repository's onnx_encoder model, run as a backend. A native
# backend carries its own ONNX Runtime; this stand-in takes the launching environment's, appended
# after the serving interpreter's own packages (which may lack it: tests/test_python_deps.py).
_BACKEND_WRAPPER = """\"\"\"The embedded server's stand-in for Triton's onnxruntime backend (clip-triton serve).\"\"\"
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("CLIP_TRITON_BACKEND_SITE"):
    sys.path.append(os.environ["CLIP_TRITON_BACKEND_SITE"])
from onnx_encoder import TritonPythonModel  # noqa: E402,F401
"""


def prepare_server_dir(root: Path | None = None) -> Path:
    """A private copy of the server folder with this interpreter's stub and our onnxruntime backend.

    Built once per (pytriton version, python X.Y) under the cache, atomically (a rename).
    """
    src = _pytriton_server_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    backend_files = {
        "onnx_encoder.py": REPOSITORY_SOURCES / "onnx_encoder" / "model.py",
        "bundled_deps.py": REPOSITORY_SOURCES / "common" / "bundled_deps.py",
    }
    try:
        import importlib.metadata as md

        tag = md.version("nvidia-pytriton")
    except Exception:  # noqa: BLE001
        tag = "unknown"
    # backends/openvino: the `openvino` runtime's stand-in (model_repository/openvino_encoder, on onnx_encoder).
    openvino_files = {**backend_files, "openvino_encoder.py": REPOSITORY_SOURCES / "openvino_encoder" / "model.py"}
    openvino_wrapper = _BACKEND_WRAPPER.replace("onnx_encoder", "openvino_encoder").replace("onnxruntime", "OpenVINO")
    digest = hashlib.sha256(_BACKEND_WRAPPER.encode() + openvino_wrapper.encode())
    for path in openvino_files.values():
        digest.update(path.read_bytes() if path.is_file() else b"")
    runner_tag = digest.hexdigest()[:12]  # a changed runner source gets a fresh copy
    root = Path(root) if root is not None else cache_root()
    dest = root / f"tritonserver-{tag}-py{version}-{runner_tag}"
    if (dest / "bin" / "tritonserver").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=root))
    try:
        work = tmp / "tritonserver"
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("python_backend_stubs"), symlinks=True)
        shutil.copy2(stub, work / "backends" / "python" / "triton_python_backend_stub")
        for backend_name, files, wrapper in (
            ("onnxruntime", backend_files, _BACKEND_WRAPPER),
            ("openvino", openvino_files, openvino_wrapper),
        ):
            backend = work / "backends" / backend_name
            backend.mkdir(parents=True, exist_ok=True)
            for name, path in files.items():
                shutil.copy2(path, backend / name)
            (backend / "model.py").write_text(wrapper)
        (work / "caches").mkdir(exist_ok=True)
        try:
            work.rename(dest)
        except OSError:
            if not (dest / "bin" / "tritonserver").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _backend_site() -> str:
    """The site folder holding this environment's onnxruntime (for the stand-in backend), or ""."""
    spec = importlib.util.find_spec("onnxruntime")
    origin = spec.origin if spec is not None else None
    return str(Path(origin).parent.parent) if origin else ""


def _server_env(python: Path | None = None) -> dict[str, str]:
    """`python`: the interpreter whose packages the python models import (default: this one); it
    must be this interpreter's X.Y, the version of the stub (docs/design.md, "The local server")."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [str(_libs_dir()), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(python or sys.executable).parent}:{env.get('PATH', '')}"
    env["CLIP_TRITON_BACKEND_SITE"] = _backend_site()
    # Bundled wheels built for the container's Python, not this one, are skipped here (bundled_deps.py).
    env["CLIP_TRITON_EMBEDDED_SERVER"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, value in MALLOC_ENV.items():
        env.setdefault(name, value)
    return env


def _gpu_kinds_to_cpu(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Replace KIND_GPU instance groups (no GPU here) by KIND_CPU; drop GPU-only settings."""
    changed = False
    for group in config.get("instance_group", []) or []:
        if group.get("kind") in ("KIND_GPU", "KIND_AUTO") or group.get("gpus"):
            group["kind"] = "KIND_CPU"
            group.pop("gpus", None)
            changed = True
    if config.get("optimization", {}).get("execution_accelerators", {}).get("gpu_execution_accelerator"):
        config["optimization"]["execution_accelerators"].pop("gpu_execution_accelerator")
        changed = True
    return config, changed


class TritonServer:
    """A tritonserver child process serving one repository; a context manager.

    Ports left as None are picked free (and re-picked if the server loses a race for them).
    `models`: load only these (explicit model control; ensembles need their steps listed too),
    or None for every model of the repository.
    `supervise`: watch the python-backend stubs and reload a model whose stub died (Triton 2.51
    never restarts one and keeps reporting the model READY: docs/limits.md).
    `python`: the interpreter (same X.Y as this one) whose packages the python models import;
    default this one. A repository with bundled wheels needs only numpy there (docs/deploy.md).

    The server runs in its own process group: stopping it (or finding it dead) also ends its stubs,
    and its /dev/shm regions are removed; regions and stubs of a server that was killed before it
    could clean up are removed at the next start.
    """

    def __init__(
        self,
        repository: Path,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        models: list[str] | None = None,
        supervise: bool = False,
        supervise_interval: float = 1.0,
        python: Path | None = None,
        host: str = LOOPBACK,
        expose_http: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        # gRPC and metrics bind to `host`; HTTP/JSON stays on loopback unless `expose_http` (docs/limits.md,
        # "The public surface"): its parser faults cannot be patched here, and the supervisor needs it.
        self.host = check_host(host)
        self.http_host = self.host if expose_http else LOOPBACK
        # Model control, shared memory, trace and logging are refused without this header (a secret
        # the supervisor alone knows): no client can load code, unload a model or map our /dev/shm.
        self.admin_key = secrets.token_hex(16)
        self.python = Path(python) if python is not None else None
        self._requested = (grpc_port, http_port, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.log_path = Path(log_path) if log_path is not None else None
        self.models = list(models) if models is not None else None
        self.supervise = supervise
        self.supervise_interval = supervise_interval
        self.process: subprocess.Popen | None = None
        self._log_handle: Any = None
        self._own_log: Path | None = None
        self._shm_prefix = ""
        self._stubs_at_ready: dict[int, str] = {}
        self._supervisor: threading.Thread | None = None
        self._stop_supervisor = threading.Event()
        self.restarts: list[dict[str, Any]] = []  # models the supervisor reloaded: name, pid, seconds

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        """Where a client on this machine connects (loopback when bound to every interface)."""
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{_connect_host(self.http_host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.metrics_port}/metrics"

    # -- lifecycle ----------------------------------------------------------------------------
    def _command(self, server_dir: Path) -> list[str]:
        shm_prefix = f"{SHM_TAG}{os.getpid()}x{uuid.uuid4().hex[:8]}_"
        self._shm_prefix = shm_prefix
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.http_host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            *admin_lock_args(self.admin_key),
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--log-verbose=0",
            # Triton keeps up to 8 gRPC request objects for reuse, each holding the capacity of the
            # largest payload it carried: after 300 MB requests that is GBs that never return
            # (docs/limits.md). Allocating per request costs nothing next to the models.
            "--grpc-infer-allocation-pool-size=0",
        ]
        # Always explicit model control, so the supervisor can reload a model whose python stub died.
        cmd.append("--model-control-mode=explicit")
        if not self._needs_explicit_control():
            cmd.append("--load-model=*")  # everything at start, in parallel, as Triton's default mode does
        # Otherwise nothing loads at start; _load_selected loads the selection (GPU groups made CPU).
        return cmd

    def _repo_models(self) -> list[str]:
        return sorted(p.name for p in self.repository.iterdir() if (p / "config.pbtxt").is_file())

    def _gpu_models(self) -> list[str]:
        """Models of the selection whose config asks for a GPU (KIND_GPU or a GPU-only backend)."""
        out = []
        for name in self.models if self.models is not None else self._repo_models():
            path = self.repository / name / "config.pbtxt"
            text = path.read_text() if path.is_file() else ""
            if "KIND_GPU" in text or "gpu_execution_accelerator" in text:
                out.append(name)
        return out

    def _needs_explicit_control(self) -> bool:
        return self.models is not None or bool(self._gpu_models())

    def start(self, timeout: float = 120.0, attempts: int = 3) -> TritonServer:
        if self.process is not None:
            raise ClipTritonError("this server is already started")
        if not self.repository.is_dir():
            raise ClipTritonError(f"model repository {self.repository} does not exist")
        server_dir = prepare_server_dir()
        clean_stale_processes()
        last_error = ""
        for _attempt in range(attempts):
            self.grpc_port, self.http_port, self.metrics_port = (
                p if p is not None else free_port() for p in self._requested
            )
            self._open_log()
            self.process = subprocess.Popen(
                self._command(server_dir),
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_server_env(self.python),
                cwd=str(server_dir),
                preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
            )
            try:
                self._wait_live(timeout)
                self._load_selected()
                self._wait_ready(timeout)
                self._stubs_at_ready = stub_processes(self.process.pid)
                if self.supervise:
                    self._start_supervisor()
                return self
            except _Retryable as exc:
                last_error = str(exc)
                self._terminate()
                if isinstance(exc, _PortClash) and all(p is not None for p in self._requested):
                    break  # the user's own ports: retrying cannot help
            except BaseException:
                self._terminate()
                raise
        raise ClipTritonError(f"tritonserver could not start: {last_error} (log {self.log_file})")

    def _open_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._own_log = Path(name)
            path = self._own_log
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            path = self.log_path
        self._log_handle = open(path, "wb")  # noqa: SIM115 - closed in stop()

    @property
    def log_file(self) -> Path | None:
        return self.log_path or self._own_log

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_file
        if path is None or not path.is_file():
            return "(no log)"
        return "\n".join(self._log_end().splitlines()[-lines:])

    def _http(self, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        if path.startswith("/v2/repository"):
            request.add_header(ADMIN_HEADER, self.admin_key)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return
        tail = self.log_tail()
        if "already in use" in tail:
            clash = [line.strip() for line in tail.splitlines() if "already in use" in line]
            raise _PortClash(clash[-1] if clash else f"exit {code}")
        if "epoll_wait error" in tail:
            # Seen once in CI (exit -6): the gRPC client library in *this* process restarts its poller
            # thread in the forked child (a fork handler), Popen then closes that child's fds, and the
            # child aborts before it execs tritonserver (grpc/grpc#43055). A fresh launch gets through.
            raise _LaunchCrash(f"the launch aborted before tritonserver ran (grpc/grpc#43055), exit {code}")
        raise ClipTritonError(
            f"tritonserver exited with code {code} before it was ready; log {self.log_file}:\n{tail}"
        )

    def _wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                status, _ = self._http("GET", "/v2/health/live", timeout=2.0)
                if status == 200:
                    return
            time.sleep(0.1)
        raise ClipTritonError(
            f"tritonserver was not live after {timeout:.0f}s; log {self.log_file}:\n{self.log_tail()}"
        )

    def _load_selected(self) -> None:
        """Explicit model control: load the selection, GPU instance groups turned into CPU ones."""
        if not self._needs_explicit_control():
            return
        names = self.models if self.models is not None else self._repo_models()
        gpu = set(self._gpu_models())
        # Steps before ensembles: an ensemble loads only once its steps are there.
        ordered = sorted(names, key=lambda n: "platform: \"ensemble\"" in self._config_text(n))
        for name in ordered:
            status, text = self._load_model(name, gpu)
            if status != 200:
                self._check_alive()
                raise ClipTritonError(f"tritonserver could not load model {name}: {text}\n{self.log_tail()}")

    def _load_model(self, name: str, gpu_models: set[str]) -> tuple[int, str]:
        """Ask the server to load `name`; a model that asks for a GPU gets its config with CPU instances."""
        body = None
        if name in gpu_models:
            body = {"parameters": {"config": json.dumps(_gpu_kinds_to_cpu(self._config_json(name))[0])}}
        return self._http("POST", f"/v2/repository/models/{name}/load", body, timeout=300.0)

    def _config_text(self, name: str) -> str:
        path = self.repository / name / "config.pbtxt"
        return path.read_text() if path.is_file() else ""

    def _config_json(self, name: str) -> dict[str, Any]:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        config = text_format.Parse(self._config_text(name), model_config_pb2.ModelConfig())
        return json_format.MessageToDict(config, preserving_proto_field_name=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                status, _ = self._http("GET", "/v2/health/ready", timeout=2.0)
                if status == 200:
                    return
            time.sleep(0.2)
        raise ClipTritonError(
            f"tritonserver models were not READY after {timeout:.0f}s; log {self.log_file}:\n{self.log_tail()}"
        )

    def _exited_after_drain(self, process: subprocess.Popen, grace: float) -> bool:
        """Wait for the signalled server to exit: up to `grace` seconds while in-flight inferences drain, then
        at most UNLOAD_GRACE once its log says only unloading is left (see UNLOADING_LINE)."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return True
            if UNLOADING_LINE in self._log_end():
                deadline = min(deadline, time.monotonic() + UNLOAD_GRACE)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                return process.poll() is not None
            time.sleep(0.1)
        return process.poll() is not None

    def _log_end(self, size: int = 1 << 16) -> str:
        """The log's last `size` bytes, from a line start (cheap enough to poll: the log grows for as long
        as the server runs)."""
        path = self.log_file
        if path is None or not path.is_file():
            return ""
        with open(path, "rb") as handle:
            start = max(0, path.stat().st_size - size)
            handle.seek(start)
            data = handle.read()
        if start:
            data = data.split(b"\n", 1)[-1]  # the first line began before `start`
        return data.decode(errors="replace")

    def model_states(self) -> dict[str, str]:
        status, text = self._http("POST", "/v2/repository/index", {})
        if status != 200:
            return {}
        return {m["name"]: m.get("state", "") for m in json.loads(text)}

    def _terminate(self, grace: float = 15.0, clean: bool = False) -> None:
        self._stop_supervisor.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=30)
        self._supervisor = None
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # our own child only: Triton drains, unloads and exits
            if not self._exited_after_drain(process, grace):
                process.kill()
                process.wait(timeout=10)
        # Stubs outlive a killed server (one was seen deadlocked holding 837 MB): end the group.
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        remove_shm_regions(self._shm_prefix)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if clean and process.returncode == 0 and self._own_log is not None:
            # A temporary log is kept only when something went wrong.
            self._own_log.unlink(missing_ok=True)
            self._own_log = None

    def stop(self) -> None:
        self._terminate(clean=True)

    # -- supervision ---------------------------------------------------------------------------
    def _start_supervisor(self) -> None:
        self._stop_supervisor.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="clip-triton-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stop_supervisor.wait(self.supervise_interval):
            if not self.running():
                return
            with contextlib.suppress(Exception):  # a transient /proc or HTTP hiccup: look again next tick
                self.check_stubs()

    def check_stubs(self) -> list[str]:
        """Reload every model one of whose python stubs has died; returns the models reloaded."""
        if self.process is None:
            return []
        alive = stub_processes(self.process.pid)
        dead: dict[str, int] = {}
        for pid, model in self._stubs_at_ready.items():
            if pid not in alive:
                dead.setdefault(model, pid)
        reloaded = []
        for model, pid in sorted(dead.items()):
            start = time.monotonic()
            # Unload, then load: a plain load of a loaded model whose files did not change is a no-op
            # that leaves the dead stub in place. Between the two the server reports not ready.
            self._http("POST", f"/v2/repository/models/{model}/unload", None, timeout=60.0)
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline and self._http("GET", f"/v2/models/{model}/ready")[0] == 200:
                time.sleep(0.05)
            status, text = self._load_model(model, set(self._gpu_models()))
            seconds = round(time.monotonic() - start, 2)
            self.restarts.append({"model": model, "stub_pid": pid, "status": status, "seconds": seconds})
            message = (
                f"clip-triton: python stub of {model} (pid {pid}) died; model reloaded in {seconds}s"
                if status == 200 else f"clip-triton: python stub of {model} (pid {pid}) died; reload failed: {text}"
            )
            print(message, file=sys.stderr, flush=True)
            reloaded.append(model)
        if dead:
            self._stubs_at_ready = stub_processes(self.process.pid)
        return reloaded

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Retryable(Exception):
    """A failed start that a fresh launch can fix."""


class _PortClash(_Retryable):
    pass


class _LaunchCrash(_Retryable):
    pass


# -- python-backend stubs and their shared memory ----------------------------------------------
# A stub's argv (python backend 2.51): stub, model.py, shm region, shm default size, shm growth,
# parent (tritonserver) pid, backend dir, ipc handle, instance name (<model>_<group>_<index>), runtime.
SHM_TAG = "cliptriton"  # our servers' shm prefix: cliptriton<launcher pid>x<random>_
STUB_NAME = "triton_python_backend_stub"


def _stub_argvs() -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(STUB_NAME.encode()) or len(argv) < 9:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a dead stub its server has not reaped yet
        except OSError:
            continue
        out[int(entry.name)] = [a.decode(errors="replace") for a in argv]
    return out


def stub_processes(server_pid: int) -> dict[int, str]:
    """Live python-backend stubs of one tritonserver: pid -> model name."""
    return {
        pid: argv[8].rsplit("_", 2)[0]
        for pid, argv in _stub_argvs().items()
        if argv[5] == str(server_pid)
    }


def _launcher_pid(shm_name: str) -> int | None:
    digits = shm_name[len(SHM_TAG):].split("x", 1)[0]
    return int(digits) if shm_name.startswith(SHM_TAG) and digits.isdigit() else None


def remove_shm_regions(prefix: str) -> None:
    if not prefix:
        return
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


def clean_stale_processes() -> None:
    """Remove what servers killed before they could clean up left behind: our stubs whose
    tritonserver is gone, and /dev/shm regions whose launcher is gone."""
    for pid, argv in _stub_argvs().items():
        if argv[2].startswith(SHM_TAG) and argv[5].isdigit() and not pid_alive(int(argv[5])):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    shm = Path("/dev/shm")
    for region in shm.glob(f"{SHM_TAG}*") if shm.is_dir() else []:
        launcher = _launcher_pid(region.name)
        if launcher is not None and launcher != os.getpid() and not pid_alive(launcher):
            region.unlink(missing_ok=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _child_setup() -> None:
    """In the child: its own process group (stubs included), SIGTERM when its parent dies."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    _die_with_parent()


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM the server if its parent dies (no orphaned servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not on every platform
        pass


def _where(host: str, port: int | None) -> str:
    if ipaddress.IPv4Address(host).is_unspecified:
        return f"{host}:{port} (every interface: reachable from other machines)"
    if is_loopback(host):
        return f"{host}:{port} (this machine only)"
    return f"{host}:{port} (reachable from that interface's network)"


def surface_lines(server: TritonServer) -> list[str]:
    """What `serve` listens on, said as it is (docs/limits.md, "The public surface")."""
    lines = [
        f"  gRPC    {_where(server.host, server.grpc_port)}: the client API",
        f"  HTTP    {_where(server.http_host, server.http_port)}: "
        + ("Triton's HTTP/JSON front, EXPOSED (--expose-http)" if not is_loopback(server.http_host)
           else "health and the supervisor; --expose-http to widen"),
        f"  metrics {_where(server.host, server.metrics_port)}: Prometheus, read-only",
        "  model control, shared memory, trace and logging APIs: refused to clients",
    ]
    if not is_loopback(server.host):
        lines.append(
            f"WARNING: --host {server.host} serves gRPC and metrics beyond this machine with no authentication "
            "or TLS: put it behind a firewall or a gateway you trust (docs/limits.md)."
        )
    if not is_loopback(server.http_host):
        lines.append(
            "WARNING: --expose-http puts Triton's HTTP/JSON parser in front of clients; one crafted request "
            "can crash or mislead it (docs/limits.md, \"The public surface\")."
        )
    return lines


def serve_forever(
    repository: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    echo: Any = print,
    host: str = LOOPBACK,
    expose_http: bool = False,
) -> None:
    """`clip-triton serve`: run until Ctrl-C, print the endpoints once every model is READY."""
    repository = Path(repository)
    if not repository.is_dir() or not any((p / "config.pbtxt").is_file() for p in repository.iterdir()):
        raise ClipTritonError(f"{repository} is not a Triton model repository (no model with a config.pbtxt)")
    # Ctrl-C and SIGTERM both end in a clean stop (even where the shell started us with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    for port, flag in ((grpc_port, "--grpc-port"), (http_port, "--http-port"), (metrics_port, "--metrics-port")):
        if not 1 <= port <= 65535:
            raise ClipTritonError(f"{flag} {port} is not a TCP port (1-65535)")
    server = TritonServer(
        repository, grpc_port, http_port, metrics_port, supervise=True, host=host, expose_http=expose_http
    )
    server.start(timeout=600)
    try:
        states = server.model_states()
        echo(f"serving {repository} ({len(states)} models READY: {', '.join(sorted(states))})")
        for line in surface_lines(server):
            echo(line)
        echo(f"  log     {server.log_file}")
        echo("Ctrl-C to stop")
        while server.running():
            time.sleep(0.5)
        raise ClipTritonError(f"tritonserver stopped unexpectedly; log {server.log_file}:\n{server.log_tail()}")
    finally:
        server.stop()
