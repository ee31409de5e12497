"""AsyncClipClient: the asyncio client, on `tritonclient.grpc.aio`; concurrency is a window of tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from clip_triton.clients import _core, contract
from clip_triton.clients._core import (
    DEFAULT_TEMPLATES,
    ClientOptions,
    Endpoint,
    EndpointPool,
    ModelInfo,
    ProgressCallback,
    RankedItem,
    TowerInfo,
    resolve_options,
)
from clip_triton.clients.errors import ClientTimeoutError, ClipClientError, ServerUnavailableError


class AsyncClipClient:
    """The asyncio twin of ClipClient: same options, same results, awaitable methods.

    >>> async with AsyncClipClient("127.0.0.1:8001", concurrency=8) as client:
    ...     vectors = await client.embed_images(paths)       # float32 [N, D]
    ...     best = await client.rank("a red car", paths, top=5)

    Use one instance from one event loop (tritonclient's aio client is not thread-safe). Several
    endpoints spread and fail over exactly as in ClipClient (the rules live in _core.EndpointPool).
    """

    def __init__(
        self, url: str | Sequence[str] = "127.0.0.1:8001", *, options: ClientOptions | None = None, **kwargs: Any
    ) -> None:
        self.options = options = resolve_options(url, options, kwargs)
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException

        self._aio = aioclient
        self._error_type = InferenceServerException
        # Transports are created inside the running loop (grpc.aio channels bind to it).
        self._pool = EndpointPool(options)
        self._info_lock: asyncio.Lock | None = None
        self._tokenize: tuple[TowerInfo, int] | None = None

    # -- lifecycle

    def _ensure(self, endpoint: Endpoint) -> Any:
        if endpoint.transport is None:
            try:
                endpoint.transport = self._aio.InferenceServerClient(**self.options.grpc_kwargs(endpoint.url))
            except Exception as exc:  # noqa: BLE001 - bad TLS files, malformed url
                raise ClipClientError(f"cannot create a gRPC client for {endpoint.url}: {exc}") from None
        return endpoint.transport

    async def close(self) -> None:
        for endpoint in self._pool.endpoints:
            if endpoint.transport is not None:
                await endpoint.transport.close()
                endpoint.transport = None

    async def __aenter__(self) -> AsyncClipClient:
        for endpoint in self._pool.endpoints:
            self._ensure(endpoint)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- discovery

    async def model_info(self) -> ModelInfo:
        """See ClipClient.model_info."""
        if self._pool.info is None:
            if self._info_lock is None:
                self._info_lock = asyncio.Lock()
            async with self._info_lock:
                if self._pool.info is None:
                    due = self._pool.unprobed(_core.now())
                    answers = await asyncio.gather(*(self._probe(e) for e in due))
                    self._pool.probed(list(zip(due, answers, strict=True)), _core.now())
                while self._pool.info is None:  # all down: retry with backoff, or give up
                    self._pool.release(await self._acquire())
        return self._pool.info

    async def _probe(self, endpoint: Endpoint) -> ModelInfo | ClipClientError:
        try:
            return await self._discover(endpoint)
        except ClipClientError as exc:
            return exc

    async def _acquire(self) -> Endpoint:
        """See ClipClient._acquire."""
        while True:
            got = self._pool.acquire(_core.now())
            if isinstance(got, float):
                await asyncio.sleep(got)
                continue
            endpoint, probe_first = got
            if not probe_first:
                return endpoint
            answer = await self._probe(endpoint)
            self._pool.probed([(endpoint, answer)], _core.now())

    async def _call(self, endpoint: Endpoint, name: str, *args: Any, **kwargs: Any) -> Any:
        opts = self.options
        fn = getattr(self._ensure(endpoint), name)
        return await fn(*args, headers=opts.headers or None, client_timeout=opts.timeout, **kwargs)

    async def _config(self, endpoint: Endpoint, model: str) -> Any:
        return (await self._call(endpoint, "get_model_config", model, self.options.model_version)).config

    async def _tower(self, endpoint: Endpoint, model: str, preferred_input: str) -> tuple[TowerInfo, Any]:
        version = self.options.model_version
        try:
            metadata = await self._call(endpoint, "get_model_metadata", model, version)
            config = await self._config(endpoint, model)
        except self._error_type as exc:
            raise _core.discovery_error(exc, endpoint.url, self.options, model) from None
        return _core.tower_info(metadata, config, preferred_input, version), config

    async def _discover(self, endpoint: Endpoint) -> ModelInfo:
        prefix = self.options.prefix
        (image, image_cfg), (text, text_cfg) = await asyncio.gather(
            self._tower(endpoint, *_core.image_model(self.options)),
            self._tower(endpoint, *_core.text_model(self.options)),
        )
        param_sets = [_core.config_parameters(image_cfg), _core.config_parameters(text_cfg)]
        steps: dict[str, dict[str, str]] = {}
        for cfg in (image_cfg, text_cfg):
            for step in cfg.ensemble_scheduling.step:
                if step.model_name in steps:
                    continue
                try:
                    steps[step.model_name] = _core.config_parameters(await self._config(endpoint, step.model_name))
                except self._error_type:
                    steps[step.model_name] = {}
        param_sets.extend(steps.values())
        return _core.model_info(prefix, image, text, param_sets, {"steps": steps})

    # -- embedding

    async def _infer(
        self, endpoint: Endpoint, tower: TowerInfo, payloads: list[Any], parse: Callable = _core.parse_embeddings
    ) -> np.ndarray:
        array = _core.request_array(payloads, tower.max_batch_size > 0)
        inp = self._aio.InferInput(tower.input_name, list(array.shape), tower.input_datatype)
        inp.set_data_from_numpy(array)
        out = self._aio.InferRequestedOutput(tower.output_name)
        result = await self._call(endpoint, "infer", tower.model, [inp], model_version=tower.version, outputs=[out])
        return parse(result.as_numpy(tower.output_name), tower, len(payloads))

    async def _blame(
        self, endpoint: Endpoint, tower: TowerInfo, index: int, label: str, exc: Exception
    ) -> ClipClientError:
        try:
            ready = await self._ensure(endpoint).is_model_ready(tower.model, tower.version, client_timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure here means the server is not answering
            ready = False
        return _core.item_error(exc, endpoint.url, tower.model, index, label, ready)

    async def _run_chunk(
        self,
        tower: TowerInfo,
        items: Sequence[Any],
        part: range,
        encode: Callable,
        label: Callable,
        offload: bool,
        parse: Callable,
    ) -> np.ndarray:
        def encode_all() -> list[Any]:
            return [encode(i, items[i]) for i in part]

        # File reads and PNG encoding block: keep them off the event loop.
        payloads = await asyncio.to_thread(encode_all) if offload else encode_all()
        while True:  # until an endpoint answers, or the pool gives up on all of them
            endpoint = await self._acquire()
            try:
                return await self._send(endpoint, tower, items, part, payloads, label, parse)
            except (ServerUnavailableError, ClientTimeoutError) as exc:
                if not self._pool.failed(endpoint, exc, _core.now()):
                    raise
            finally:
                self._pool.release(endpoint)

    async def _send(
        self,
        endpoint: Endpoint,
        tower: TowerInfo,
        items: Sequence[Any],
        part: range,
        payloads: list,
        label: Callable,
        parse: Callable,
    ) -> np.ndarray:
        try:
            return await self._infer(endpoint, tower, payloads, parse)
        except self._error_type as exc:
            mapped = _core.transport_error(exc, endpoint.url, self.options, tower.model)
            if mapped is not None:
                raise mapped from None
            if len(payloads) == 1:
                raise await self._blame(endpoint, tower, part[0], label(items[part[0]]), exc) from None
        rows = []
        for i, payload in zip(part, payloads, strict=True):
            try:
                rows.append(await self._infer(endpoint, tower, [payload], parse))
            except self._error_type as exc:
                mapped = _core.transport_error(exc, endpoint.url, self.options, tower.model)
                raise (mapped or await self._blame(endpoint, tower, i, label(items[i]), exc)) from None
        return np.concatenate(rows)

    async def _embed(
        self,
        tower: TowerInfo,
        items: Sequence[Any],
        encode: Callable,
        label: Callable,
        progress: ProgressCallback | None,
        offload: bool,
        parse: Callable = _core.parse_embeddings,
    ) -> np.ndarray:
        total = len(items)
        if total == 0:
            return np.zeros((0, max(tower.dim, 0)), dtype=np.float32)
        parts = _core.chunks(total, _core.effective_batch(self.options, tower))
        results: list[np.ndarray | None] = [None] * len(parts)
        window = min(self._pool.window(), len(parts))
        pending: dict[asyncio.Task, int] = {}
        done = 0
        try:
            next_part = 0
            while next_part < len(parts) or pending:
                while next_part < len(parts) and len(pending) < window:
                    coro = self._run_chunk(tower, items, parts[next_part], encode, label, offload, parse)
                    pending[asyncio.ensure_future(coro)] = next_part
                    next_part += 1
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done += _core.collect_finished(finished, pending, results, parts)
                if progress is not None:
                    progress(done, total)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return np.concatenate([r for r in results if r is not None]).astype(np.float32, copy=False)

    async def embed_images(self, items: Iterable[Any], *, progress: ProgressCallback | None = None) -> np.ndarray:
        """See ClipClient.embed_images."""
        items = list(items)
        _core.check_paths(items)
        info = await self.model_info()
        encode = _core.image_encoder(info, self.options.preprocess)
        return await self._embed(info.image, items, encode, _core.item_label, progress, offload=True)

    async def embed_texts(self, texts: Iterable[str], *, progress: ProgressCallback | None = None) -> np.ndarray:
        """See ClipClient.embed_texts."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tower = (await self.model_info()).text
        return await self._embed(tower, texts, _core.encode_text, _core.text_label, progress, offload=False)

    async def token_counts(self, texts: Iterable[str]) -> np.ndarray:
        """Tokens per text as the served tokenizer (`<prefix>_text_tokenize`) counts them: int64 [N], special
        tokens included, at most the context length (the tokenizer truncates longer texts there)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tower, pad_id = await self._tokenizer()
        counts = await self._embed(
            tower, texts, _core.encode_text, _core.text_label, None, offload=False,
            parse=_core.token_count_parser(pad_id),
        )
        return counts.reshape(-1).astype(np.int64)

    async def _tokenizer(self) -> tuple[TowerInfo, int]:
        if self._tokenize is None:
            await self.model_info()
            name = contract.model_names(self.options.prefix)["text_tokenize"]
            endpoint = await self._acquire()
            try:
                metadata = await self._call(endpoint, "get_model_metadata", name, "")
                config = (await self._call(endpoint, "get_model_config", name, "")).config
            except self._error_type as exc:
                raise _core.discovery_error(exc, endpoint.url, self.options, name) from None
            finally:
                self._pool.release(endpoint)
            self._tokenize = _core.tokenizer_info(metadata, config, "")
        return self._tokenize

    async def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """See ClipClient.label_embeddings."""
        labels, templates = _core.check_labels(labels), _core.check_templates(templates)
        text = await self.embed_texts(_core.prompts(labels, templates))
        return _core.label_embeddings(text, len(labels), len(templates))

    async def classify(
        self,
        images: Iterable[Any],
        labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        *,
        progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """See ClipClient.classify."""
        images = list(images)
        _core.check_paths(images)  # a missing file or a FIFO fails before the labels are embedded
        label_emb, image_emb = await all_or_nothing(
            self.label_embeddings(labels, templates), self.embed_images(images, progress=progress)
        )
        info = await self.model_info()
        _core.warn_default_scale(info)
        return _core.probabilities(image_emb, label_emb, info.logit_scale, info.logit_bias)

    async def rank(
        self, text: str, images: Iterable[Any], *, top: int | None = None, progress: ProgressCallback | None = None
    ) -> list[RankedItem]:
        """See ClipClient.rank."""
        if not isinstance(text, str):
            raise ClipClientError("rank() takes one query text (str)")
        query, image_emb = await all_or_nothing(self.embed_texts([text]), self.embed_images(images, progress=progress))
        return _core.ranking(query[0], image_emb, top)


async def all_or_nothing(*jobs: Any) -> list[Any]:
    """Run coroutines concurrently and return their results in order; if one fails, cancel the others
    (gather would leave them running) and raise its error: never a partial answer."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
