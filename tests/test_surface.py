"""The server's public surface (issue 21): what listens where, what a client may call, what the probes see.

Against the real embedded tritonserver: admin APIs (model control, shared memory, trace, logging) refused
to clients on HTTP and gRPC while the supervisor keeps working; every socket on loopback by default; the
health probe the generated manifests run fails on a dead python stub while Triton's own readiness says 200.
docs/limits.md ("The public surface") describes what is tested here.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_hostile import _bytes_input, _call
from test_repository import _image_bytes

from clip_triton.exporter.base.common import REPOSITORY_SOURCES
from clip_triton.exporter.base.server import TritonServer, stub_processes, surface_lines
from helpers import run_cli

pytestmark = pytest.mark.server

PROBE = REPOSITORY_SOURCES / "health_probe.py"


def _http(server: TritonServer, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """A plain client's HTTP request (no admin header)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, from /proc (no ss/netstat needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            mapped = v6 and hex_addr[:24].upper() == "0000000000000000FFFF0000"  # ::ffff:a.b.c.d
            hex_addr = hex_addr[24:] if mapped else hex_addr
            if v6 and not mapped:
                addr = "::" if set(hex_addr) == {"0"} else f"ipv6:{hex_addr}"
            else:  # one little-endian word
                addr = ".".join(str(b) for b in bytes.fromhex(hex_addr)[::-1])
            found.add((addr, int(hex_port, 16)))
    return found


def test_every_port_binds_loopback_by_default(served_shapes) -> None:
    server, _, _ = served_shapes
    listening = _listening(server.process.pid)
    ports = {server.grpc_port, server.http_port, server.metrics_port}
    assert {port for _, port in listening} >= ports
    assert {addr for addr, port in listening if port in ports} == {"127.0.0.1"}, listening


def test_admin_apis_are_refused_to_clients(served_shapes, tmp_path: Path) -> None:
    """The red team's remote code execution: a load carrying `file:1/model.py` ran that file. Now every
    model-control, shared-memory, trace and logging call without the supervisor's key is refused, and
    the models stay loaded."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server, _, _ = served_shapes
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    config = json.dumps({"backend": "python", "max_batch_size": 0})
    attempts = [
        ("POST", "/v2/repository/models/evil/load", {"parameters": {"config": config, "file:1/model.py": code}}),
        ("POST", "/v2/repository/models/clip_image/unload", None),
        ("POST", "/v2/repository/index", {}),
        ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "cliptriton", "offset": 0, "byte_size": 64}),
        ("POST", "/v2/logging", {"log_verbose_level": 1}),
        ("POST", "/v2/trace/setting", {"trace_file": str(tmp_path / "trace.json")}),
    ]
    for method, path, body in attempts:
        status, text = _http(server, method, path, body)
        assert status == 403 and "restricted" in text, (path, status, text)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for call in (
            lambda: client.unload_model("clip_image"),
            lambda: client.load_model("evil", config=config, files={"file:1/model.py": code.encode()}),
            lambda: client.register_system_shared_memory("r", "cliptriton", 64),
            lambda: client.update_log_settings({"log_verbose_level": 1}),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        assert client.is_model_ready("clip_image") and client.is_model_ready("clip_text")
    time.sleep(0.5)
    assert not marker.exists()
    assert _http(server, "GET", "/v2/health/ready")[0] == 200
    # The supervisor (which holds the key) still sees the repository.
    assert server.model_states().get("clip_image") == "READY"


def test_serve_says_what_it_opens(served_shapes) -> None:
    """What `serve` prints is true: loopback by default, a loud warning when --host widens it."""
    _, repo, _ = served_shapes
    default = TritonServer(repo, 1, 2, 3)
    lines = "\n".join(surface_lines(default))
    assert "127.0.0.1:1 (this machine only)" in lines and "WARNING" not in lines
    wide = TritonServer(repo, 1, 2, 3, host="0.0.0.0")
    lines = "\n".join(surface_lines(wide))
    assert "0.0.0.0:1 (every interface" in lines and "127.0.0.1:2 (this machine only)" in lines
    assert "WARNING: --host 0.0.0.0" in lines and "--expose-http puts" not in lines
    exposed = "\n".join(surface_lines(TritonServer(repo, 1, 2, 3, host="0.0.0.0", expose_http=True)))
    assert "0.0.0.0:2 (every interface" in exposed and "WARNING: --expose-http" in exposed
    for args, message in (
        (["--host", "localhost"], "not an IPv4 address"),
        (["--host", "0.0.0.0.1"], "not an IPv4 address"),
        (["--grpc-port", "99999"], "--grpc-port 99999 is not a TCP port"),
    ):
        result = run_cli("serve", "--repository", str(repo), *args, timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def _probe(server: TritonServer) -> tuple[int, str, float, float]:
    """Run the manifests' probe as kubelet would: exit code, stderr, wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(PROBE), "--url", server.http_url, "--prefix", "clip"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.returncode, result.stderr.strip(), wall, cpu


def test_health_probe_sees_a_dead_stub(served_shapes, tmp_path: Path, record_property) -> None:
    """Plain tritonserver, no supervisor (as the generated Deployment runs it): after `kill -9` of a python
    stub Triton still answers /v2/health/ready 200, and the probe the manifests run fails at once."""
    _, repo, _ = served_shapes
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log").start(timeout=300)
    try:
        runs = [_probe(server) for _ in range(3)]
        assert [r[0] for r in runs] == [0, 0, 0], runs
        record_property("probe_wall_s", round(min(r[2] for r in runs), 3))
        record_property("probe_client_cpu_s", round(min(r[3] for r in runs), 3))
        for model in ("clip_text_tokenize", "clip_image_preprocess", "clip_image_encoder"):
            pid = next(p for p, name in stub_processes(server.process.pid).items() if name == model)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
            assert _http(server, "GET", "/v2/health/ready")[0] == 200  # Triton's own view: blind
            code, message, wall, _ = _probe(server)
            assert code == 1 and model in message and message.startswith("unhealthy:"), message
            assert wall < 15
            server.check_stubs()  # reload (as serve's supervisor would) before the next stub dies
            assert _probe(server)[0] == 0
    finally:
        server.stop()


def test_health_probe_fails_on_a_dead_server(served_shapes, tmp_path: Path) -> None:
    _, repo, _ = served_shapes
    server = TritonServer(repo, models=["clip_text_tokenize", "clip_text_encoder", "clip_text"]).start(timeout=300)
    try:
        code, message, _, _ = _probe(server)  # the image ensembles are missing
        assert code == 1 and "clip_image" in message
    finally:
        server.stop()
    code, message, wall, _ = _probe(server)
    assert code == 1 and "Connection refused" in message and wall < 15


def _group_memory(server: TritonServer) -> tuple[float, float]:
    """GiB of anonymous RSS (tritonserver and its stubs) and of the server's /dev/shm regions."""
    anon = 0
    for pid in [server.process.pid, *stub_processes(server.process.pid)]:
        status = Path(f"/proc/{pid}/status").read_text()
        anon += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")) * 1024
    shm = sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob(f"{server._shm_prefix}*"))
    return anon / 2**30, shm / 2**30


def _text_request(client, size: int, compression: str | None):
    return _call(client, "clip_text", _bytes_input("text", [b"a" * size]), compression_algorithm=compression)


def test_gzip_request_is_held_to_the_same_limits(served_shapes) -> None:
    """A gzip-compressed gRPC request (32 MiB of text in ~32 KB on the wire) is refused by the same limit as
    an uncompressed one, and the server answers the next request normally."""
    import tritonclient.grpc as grpcclient

    server, _, _ = served_shapes
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        status, message = _text_request(client, 32 * 2**20, "gzip")
        assert status == "INVALID_ARGUMENT" and "max_chars" in message, message
        assert _text_request(client, 20, "gzip")[0] == "OK"
        assert _text_request(client, 20, None)[0] == "OK"


@pytest.mark.slow
def test_memory_after_a_gigabyte_of_refused_requests(served_vitb32, tmp_path: Path, record_property) -> None:
    """The red team's case: ~1 GiB of refused gRPC requests (gzip and plain). Anonymous memory comes back
    within 0.5 GiB; the python stubs' shared memory keeps its largest request each (docs/limits.md, "Memory").
    Served from ViT-B-32 on purpose: the memory figures docs/limits.md gives for this case are this test's,
    with its large graphs loaded beside the refused payloads."""
    import tritonclient.grpc as grpcclient

    _, repo, _ = served_vitb32
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log").start(timeout=300)
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert _text_request(client, 20, None)[0] == "OK"
            anon0, shm0 = _group_memory(server)
            for i in range(4):
                if i % 2 == 0:
                    status, _ = _text_request(client, 256 * 2**20, "gzip")
                else:
                    status, _ = _call(client, "clip_image", _bytes_input("image", [b"\xff" * 256 * 2**20]))
                assert status == "INVALID_ARGUMENT"
            time.sleep(2)
            anon1, shm1 = _group_memory(server)
            assert _text_request(client, 20, None)[0] == "OK"
        record_property("anon_gib", f"{anon0:.2f} -> {anon1:.2f}")
        record_property("shm_gib", f"{shm0:.2f} -> {shm1:.2f}")
        assert anon1 - anon0 < 0.5, (anon0, anon1)
        assert shm1 - shm0 < 2 * 0.26 + 0.05, (shm0, shm1)  # two stubs, 256 MiB each, not 1 GiB
    finally:
        server.stop()


@pytest.mark.slow
def test_red_team_soak(served_shapes) -> None:
    """The red team's mixed soak, kept: 800 requests at concurrency 16, good and hostile interleaved (long
    words, non-UTF-8, garbage and thin images, gzip). Every good answer is bit-identical to its reference,
    every bad one INVALID_ARGUMENT, and the server ends healthy (the manifests' probe passes)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tritonclient.grpc as grpcclient

    server, _, _ = served_shapes

    good = [("clip_text", "text", t.encode()) for t in ("a photo of a cat", "a red circle", "zebra " * 40)]
    good += [("clip_image", "image", _image_bytes("RGB", (64 + 16 * i, 48 + 8 * i), "PNG", i)) for i in range(3)]
    bad = [
        ("clip_text", "text", b"\xff\xfe not utf-8"),
        ("clip_text", "text", b"a" * 100_001),
        ("clip_image", "image", b"GIF89a" + b"\0" * 50),
        ("clip_image", "image", _image_bytes("RGB", (1, 3000), "PNG", 9)),  # 3000:1
        ("clip_image", "image", b""),
    ]
    slow_ok = [("clip_text", "text", b"x" * 100_000)]  # one long word: linear-time BPE, still answered

    def call(case, compression=None):
        model, name, data = case
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            return _call(client, model, _bytes_input(name, [data]), compression_algorithm=compression)

    reference = {case[2]: call(case)[1] for case in good + slow_ok}
    rng = random.Random(0)
    plan = [(rng.choice(good + bad + slow_ok), rng.choice([None, None, "gzip"])) for _ in range(800)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda item: call(*item), plan))
    for (case, _), (status, value) in zip(plan, results, strict=True):
        if case in bad:
            assert status == "INVALID_ARGUMENT", (case[0], case[2][:20], status, value)
        else:
            assert status == "OK", (case[0], case[2][:20], status, value)
            assert np.array_equal(value, reference[case[2]])
    assert _probe(server)[0] == 0
