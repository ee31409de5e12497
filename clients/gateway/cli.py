"""The gateway command: `clip-triton gateway` and, for an install without the exporter, `clip-triton-gateway`.

Options are declared once, as GatewayOptions' fields (clients/cli_options.py). The HTTP stack (starlette,
uvicorn, prometheus-client) loads only when the server starts, so `--help` works without it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from clip_triton.clients import contract
from clip_triton.clients._core import ClientOptions
from clip_triton.clients.cli_options import dataclass_options, option
from clip_triton.clients.errors import ClipClientError, UsageError

KEYS_ENV = "CLIP_TRITON_API_KEYS"
MiB = 2**20


@dataclass(frozen=True)
class GatewayOptions:
    url: str = option("127.0.0.1:8001", help="Triton gRPC endpoint(s) HOST:PORT[,HOST:PORT...]: replicas of one "
                                             "model, spread and failed over as the client does.")
    host: str = option("127.0.0.1", help="Address the HTTP server binds to; 0.0.0.0 opens it to every network "
                                         "(said loudly, and with no --api-keys said louder).")
    port: int = option(8080, help="HTTP port (0: any free port, printed).")
    api_keys: Path | None = option(None, help=f"File of bearer keys, one per line ('#' comments); or set {KEYS_ENV} "
                                              "(comma-separated). Without either, no auth.")
    prefix: str = option(contract.DEFAULT_PREFIX, help="Model-name prefix the repository was written with.")
    model_id: str | None = option(None, help="Model id clients name (default: the served model_name).")
    max_in_flight: int = option(64, help="Requests worked on at once; more get 429.")
    max_body_bytes: int = option(64 * MiB, help="Largest request body (413 above it).")
    max_items: int = option(256, help="Most inputs per request.")
    max_image_bytes: int = option(16 * MiB, help="Largest decoded image (the served max_bytes, if lower, wins).")
    max_json_depth: int = option(8, help="Deepest JSON nesting accepted.")
    timeout: float = option(60.0, help="Seconds per Triton request.")
    batch_size: int = option(16, help="Items per Triton request.")
    concurrency: int = option(4, help="Triton requests in flight per HTTP request.")

    def client_options(self) -> ClientOptions:
        return ClientOptions(url=self.url, prefix=self.prefix, timeout=self.timeout, batch_size=self.batch_size,
                             concurrency=self.concurrency)


def read_keys(path: Path | None, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """Bearer keys from the file and the environment variable (both may be given)."""
    environ = dict(os.environ) if environ is None else environ
    keys: list[str] = [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --api-keys {path}: {exc}") from None
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise UsageError(f"--api-keys {path} holds no keys")
        keys += found
    for key in keys:
        if any(c.isspace() for c in key) or len(key) < 8:
            raise UsageError("API keys must be at least 8 characters without spaces")
    return tuple(dict.fromkeys(k.encode() for k in keys))


def _check(opts: GatewayOptions) -> None:
    opts.client_options()  # the url, --batch-size, --concurrency, --timeout: ClientOptions' own checks
    try:
        ipaddress.ip_address(opts.host)
    except ValueError:
        raise UsageError(f"--host must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got {opts.host!r}") from None
    if not 0 <= opts.port <= 65535:
        raise UsageError(f"--port must be 0-65535, got {opts.port}")
    for name in ("max_in_flight", "max_body_bytes", "max_items", "max_image_bytes", "max_json_depth"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # Inherited by every accepted connection (Linux): uvicorn writes a response's head and body separately,
    # and with Nagle on, each kept-alive request waited ~40 ms for the client's delayed ACK (measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def run_gateway(opts: GatewayOptions, *, quiet: bool = False) -> None:
    """Serve until SIGINT/SIGTERM. Raises ClipClientError (one line) for bad options or a busy port."""
    _check(opts)
    keys = read_keys(opts.api_keys)
    try:
        import uvicorn

        from clip_triton.clients.gateway import requests as req
        from clip_triton.clients.gateway.app import GatewaySettings, configure_logging, create_app
    except ImportError as exc:
        raise ClipClientError(f"the gateway needs its extra: pip install 'clip-triton[gateway]' ({exc})") from None
    configure_logging(quiet)
    limits = req.Limits(max_body_bytes=opts.max_body_bytes, max_json_depth=opts.max_json_depth,
                        max_items=opts.max_items, max_image_bytes=opts.max_image_bytes)
    settings = GatewaySettings(limits=limits, api_keys=keys, max_in_flight=opts.max_in_flight, model_id=opts.model_id)
    app = create_app(opts.client_options(), settings)
    sock = bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(opts.host).is_loopback:
        print(f"WARNING: the gateway listens on {opts.host}:{port}, reachable from other machines"
              + ("" if keys else ", with NO authentication (give --api-keys)"), file=sys.stderr, flush=True)
    if not quiet:
        shown = f"[{host}]" if ":" in host else host
        print(f"gateway: http://{shown}:{port}/v1 -> Triton {opts.url} ({'bearer auth' if keys else 'no auth'})",
              flush=True)
    config = uvicorn.Config(
        app, log_level="error" if quiet else "warning", access_log=False, server_header=False, date_header=True,
        proxy_headers=False, timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024, lifespan="on",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run(sockets=[sock])


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]


def gateway(opts: GatewayOptions, quiet: Quiet = False) -> None:
    """OpenAI-compatible /v1/embeddings in front of a clip-triton repository served by Triton (docs/gateway.md)."""
    run_gateway(opts, quiet=quiet)


def main() -> None:
    """`clip-triton-gateway`: the gateway alone (no exporter, no torch)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(dataclass_options(gateway))
    try:
        app()
    except ClipClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
