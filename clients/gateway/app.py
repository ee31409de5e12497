"""The gateway's ASGI app (Starlette): OpenAI's embeddings API, a zero-shot classification endpoint, health
and Prometheus metrics, in front of the served ensembles through AsyncClipClient (replica spreading and
failover as the client does them). docs/gateway.md is the reference.

Order of work per request: auth (401), the in-flight limit (429), headers and body size (415/413), JSON
depth and numbers (400), the request's fields (400/404), then Triton; the answer is complete or an error,
never a partial list.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_triton.clients import _core, contract
from clip_triton.clients._core import ClientOptions, ModelInfo
from clip_triton.clients.aio import AsyncClipClient, all_or_nothing
from clip_triton.clients.errors import (
    ClientTimeoutError,
    ClipClientError,
    ItemError,
    ModelMismatchError,
    ModelNotFoundError,
    RequestError,
    ServerUnavailableError,
)
from clip_triton.clients.gateway import requests as req
from clip_triton.clients.gateway.metrics import GatewayMetrics

log = logging.getLogger("clip_triton.gateway")

READY_TEXT = "a photo"


def _tiny_png() -> bytes:
    from PIL import Image

    return _core._png(Image.new("RGB", (32, 32), (120, 80, 40)))


@dataclass(frozen=True)
class GatewaySettings:
    """What the app needs besides the client: limits, keys, the in-flight bound, the model id override."""

    limits: req.Limits = req.Limits()
    api_keys: tuple[bytes, ...] = ()
    max_in_flight: int = 64
    model_id: str | None = None
    ready_timeout: float = 10.0
    ready_cache_seconds: float = 2.0


class Gateway:
    """One app, one AsyncClipClient (made inside the server's event loop at startup)."""

    def __init__(self, client_options: ClientOptions, settings: GatewaySettings) -> None:
        self.client_options = client_options
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.client: Any = None
        self.in_flight = 0
        self._ready: tuple[float, bool, str] = (0.0, False, "not probed yet")
        self._ready_lock: asyncio.Lock | None = None
        self._tiny_png = _tiny_png()

    # -- lifecycle

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.client = AsyncClipClient(options=self.client_options)
        self._ready_lock = asyncio.Lock()
        try:
            info = await asyncio.wait_for(self.client.model_info(), self.settings.ready_timeout)
            log.warning("serving %s (%d-d) from %s", self.model_id(info), info.dim, self.client_options.url)
        except (ClipClientError, asyncio.TimeoutError) as exc:
            log.warning("Triton not answering yet (%s); /health/ready stays 503 until it does", _one_line(exc))
        try:
            yield
        finally:
            await self.client.close()

    # -- the served model

    async def info(self) -> ModelInfo:
        try:
            return await self.client.model_info()
        except ClipClientError as exc:
            raise _upstream_problem(exc) from None

    def model_id(self, info: ModelInfo) -> str:
        return self.settings.model_id or info.parameters.get(contract.PARAM_MODEL_NAME) or info.prefix

    def limits_for(self, info: ModelInfo) -> req.Limits:
        """The gateway's limits, lowered to the served model's own (max_bytes, max_chars) where those are
        tighter, so an item the server would refuse is refused here with its index."""
        limits = self.settings.limits
        params = info.parameters
        served_bytes = _int(params.get(contract.PARAM_MAX_BYTES))
        served_chars = _int(params.get(contract.PARAM_MAX_CHARS))
        changes = {}
        if served_bytes and served_bytes < limits.max_image_bytes:
            changes["max_image_bytes"] = served_bytes
        if served_chars and served_chars < limits.max_text_chars:
            changes["max_text_chars"] = served_chars
        return dataclasses.replace(limits, **changes)

    # -- auth and admission

    def authorised(self, header: str | None) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        found = False
        for key in keys:  # every key compared, in constant time each: no early exit to time
            found |= hmac.compare_digest(given, key)
        return found

    # -- readiness

    async def ready(self) -> tuple[bool, str]:
        """A real tiny inference (one text and one small PNG through the ensembles), cached for a moment so
        probes cannot multiply into load."""
        at, ok, why = self._ready
        if time.monotonic() - at < self.settings.ready_cache_seconds:
            return ok, why
        assert self._ready_lock is not None
        async with self._ready_lock:
            at, ok, why = self._ready
            if time.monotonic() - at < self.settings.ready_cache_seconds:
                return ok, why
            try:
                await asyncio.wait_for(
                    all_or_nothing(self.client.embed_texts([READY_TEXT]), self.client.embed_images([self._tiny_png])),
                    self.settings.ready_timeout,
                )
                ok, why = True, "ready"
            except asyncio.TimeoutError:
                ok, why = False, f"a test inference took over {self.settings.ready_timeout}s"
            except ClipClientError as exc:
                ok, why = False, _one_line(exc)
            self._ready = (time.monotonic(), ok, why)
            return ok, why

    # -- work

    async def embed(self, items: list[req.Item], dim: int) -> tuple[np.ndarray, int]:
        """Embeddings for the items in their order, and the texts' token count (the served tokenizer's)."""
        texts = [it for it in items if it.kind == "text"]
        images = [it for it in items if it.kind == "image"]
        jobs: list[Any] = []
        if texts:
            values = [str(it.value) for it in texts]
            jobs += [_blaming(texts, self.client.embed_texts(values)),
                     _blaming(texts, self.client.token_counts(values))]
        if images:
            jobs.append(_blaming(images, self.client.embed_images([it.value for it in images])))
        try:
            results = await all_or_nothing(*jobs)
        except ClipClientError as exc:
            raise _upstream_problem(exc) from None
        out = np.zeros((len(items), dim), dtype=np.float32)
        tokens = 0
        if texts:
            out[[it.index for it in texts]] = results[0]
            tokens = int(results[1].sum())
        if images:
            out[[it.index for it in images]] = results[-1]
        return out, tokens

    async def classify(self, request: req.ClassifyRequest) -> np.ndarray:
        templates = request.templates if request.templates is not None else _core.DEFAULT_TEMPLATES
        try:
            job = self.client.classify([it.value for it in request.images], request.labels, templates)
            return await _blaming(request.images, job, "images")
        except ClipClientError as exc:
            raise _upstream_problem(exc) from None


async def _blaming(group: list[req.Item], job: Any, param: str = "input") -> Any:
    """Await `job` (a client call over `group`); an item the server refused becomes a 400 naming its index
    in the request (the client's index counts within `group`)."""
    try:
        return await job
    except ItemError as exc:
        where = group[exc.index].index if 0 <= exc.index < len(group) else exc.index
        raise req.Problem(400, f"{param}[{where}]: {exc.reason}", param=param) from None


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _upstream_problem(exc: ClipClientError) -> req.Problem:
    """The client's errors as HTTP: Triton down or serving something else 503, too slow 504, overloaded 429,
    anything else it answered wrongly 502."""
    message = _one_line(exc)
    if isinstance(exc, ServerUnavailableError | ModelNotFoundError | ModelMismatchError):
        return req.Problem(503, f"the model server is unavailable: {message}", code="upstream_unavailable")
    if isinstance(exc, ClientTimeoutError):
        return req.Problem(504, f"the model server did not answer in time: {message}", code="upstream_timeout")
    if isinstance(exc, RequestError) and "resource_exhausted" in message.lower():
        return req.Problem(429, f"the model server is overloaded: {message}", code="upstream_overloaded")
    return req.Problem(502, f"the model server failed: {message}", code="upstream_error")


# ------------------------------------------------------------------------------------------ the app

def create_app(client_options: ClientOptions, settings: GatewaySettings | None = None) -> Any:
    """The Starlette app. `settings.api_keys` empty: no auth (say so when binding beyond loopback)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    gw = Gateway(client_options, settings or GatewaySettings())
    limits = gw.settings.limits

    def error(problem: req.Problem, route: str, started: float) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if problem.status == 401 else {}
        if problem.status in (429, 503):
            headers["Retry-After"] = "1"
        gw.metrics.done(route, problem.status, time.perf_counter() - started)
        return JSONResponse(problem.body(), status_code=problem.status, headers=headers)

    async def read_body(request: Request) -> bytes:
        req.check_headers(request.headers.get("content-type"), request.headers.get("content-encoding"),
                          request.headers.get("content-length"), limits)
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies too: stop at the limit, not at the end
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise req.too_large(limits)
            chunks.append(chunk)
        return b"".join(chunks)

    def guarded(route: str, work: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            if not gw.authorised(request.headers.get("authorization")):
                return error(req.Problem(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                         code="invalid_api_key"), route, started)
            if gw.in_flight >= gw.settings.max_in_flight:
                return error(req.Problem(429, f"too many requests in flight (limit {gw.settings.max_in_flight}); "
                                              "retry shortly", code="too_many_requests"), route, started)
            gw.in_flight += 1
            gw.metrics.in_flight.set(gw.in_flight)
            try:
                body, items = await work(request)
            except req.Problem as problem:
                return error(problem, route, started)
            except Exception:  # a bug, not the client's fault: log it whole, answer one line
                log.exception("unexpected error on %s", route)
                return error(req.Problem(500, "internal error in the gateway (see its log)"), route, started)
            finally:
                gw.in_flight -= 1
                gw.metrics.in_flight.set(gw.in_flight)
            gw.metrics.done(route, 200, time.perf_counter() - started, items)
            return JSONResponse(body)

        return endpoint

    async def embeddings(request: Request) -> tuple[dict[str, Any], dict[str, int]]:
        body = await read_body(request)
        doc = req.parse_json(body, limits)
        info = await gw.info()
        model_id = gw.model_id(info)
        parsed = req.parse_embeddings(doc, model_id, info.dim, gw.limits_for(info))
        vectors, tokens = await gw.embed(parsed.items, info.dim)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, parsed.encoding_format)}
                for i, v in enumerate(vectors)]
        counts = {"text": sum(it.kind == "text" for it in parsed.items),
                  "image": sum(it.kind == "image" for it in parsed.items)}
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model_id, "usage": usage}, counts

    async def classify(request: Request) -> tuple[dict[str, Any], dict[str, int]]:
        body = await read_body(request)
        doc = req.parse_json(body, limits)
        info = await gw.info()
        model_id = gw.model_id(info)
        parsed = req.parse_classify(doc, model_id, gw.limits_for(info))
        probs = await gw.classify(parsed)
        data = [{"index": i, "label": parsed.labels[int(np.argmax(p))], "probabilities": [float(x) for x in p]}
                for i, p in enumerate(probs)]
        activation = "sigmoid" if info.logit_bias is not None else "softmax"
        return ({"object": "list", "data": data, "labels": parsed.labels, "model": model_id,
                 "activation": activation}, {"image": len(parsed.images)})

    async def models(request: Request) -> tuple[dict[str, Any], dict[str, int]]:
        info = await gw.info()
        entry = {"id": gw.model_id(info), "object": "model", "created": 0, "owned_by": "clip-triton",
                 "embedding_dimensions": info.dim}
        return {"object": "list", "data": [entry]}, {}

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(request: Request) -> Response:
        ok, why = await gw.ready()
        return JSONResponse({"status": "ready" if ok else "not ready", "detail": why}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        payload, media = gw.metrics.render()
        return Response(payload, media_type=media)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = {404: f"no route {request.url.path[:200]}", 405: f"method {request.method} not allowed here"}
        problem = req.Problem(status, message.get(status, str(getattr(exc, "detail", "error"))))
        return JSONResponse(problem.body(), status_code=status)

    routes = [
        Route("/v1/embeddings", guarded("embeddings", embeddings), methods=["POST"]),
        Route("/v1/classify", guarded("classify", classify), methods=["POST"]),
        Route("/v1/models", guarded("models", models), methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: http_error})
    app.state.gateway = gw
    return app


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the OpenAI SDKs ask for by default: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gateway: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False
