"""ClipClient: the blocking client, on `tritonclient.grpc`, with a thread pool for concurrent requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from clip_triton.clients import _core
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


class ClipClient:
    """Embed images and texts with a CLIP model served by Triton (the `<prefix>_image` / `<prefix>_text` ensembles).

    >>> with ClipClient("127.0.0.1:8001") as client:
    ...     images = client.embed_images(["cat.jpg", "dog.png"])   # float32 [2, D], L2-normalised
    ...     probs = client.classify(["cat.jpg"], ["cat", "dog"])   # float32 [1, 2]

    `url` may name several replicas of one model ("a:8001,b:8001" or a list): requests go to the least
    busy one, a replica that fails is set aside and its requests retried on the others (_core.EndpointPool).

    All options are keyword-only; see ClientOptions for their meaning and defaults.
    """

    def __init__(
        self, url: str | Sequence[str] = "127.0.0.1:8001", *, options: ClientOptions | None = None, **kwargs: Any
    ) -> None:
        self.options = options = resolve_options(url, options, kwargs)
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self._pool = EndpointPool(options)
        self._lock = threading.Lock()  # the pool's state is shared by the request threads
        for endpoint in self._pool.endpoints:
            try:
                endpoint.transport = grpcclient.InferenceServerClient(**options.grpc_kwargs(endpoint.url))
            except Exception as exc:  # noqa: BLE001 - bad TLS files, malformed url
                self.close()
                raise ClipClientError(f"cannot create a gRPC client for {endpoint.url}: {exc}") from None

    # -- lifecycle

    def close(self) -> None:
        for endpoint in self._pool.endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
                endpoint.transport = None

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- discovery

    @property
    def model_info(self) -> ModelInfo:
        """Names, dims, logit scale/bias and identity of the served model (read once from the servers).

        The first call discovers every endpoint and raises ModelMismatchError when they serve different
        models; endpoints that are down are set aside and probed again later."""
        info = self._pool.info
        if info is None:
            with self._lock:
                due = self._pool.unprobed(_core.now())
            if len(due) > 1:
                with ThreadPoolExecutor(max_workers=len(due), thread_name_prefix="clip-connect") as pool:
                    answers = list(pool.map(self._probe, due))
            else:
                answers = [self._probe(e) for e in due]
            with self._lock:
                self._pool.probed(list(zip(due, answers, strict=True)), _core.now())
            while (info := self._pool.info) is None:  # all down: retry with backoff, or give up
                self._pool.release(self._acquire())
        return info

    def _probe(self, endpoint: Endpoint) -> ModelInfo | ClipClientError:
        try:
            return self._discover(endpoint)
        except ClipClientError as exc:
            return exc

    def _acquire(self) -> Endpoint:
        """An endpoint to send one request to: probes the ones due first, waits while all are set aside."""
        while True:
            with self._lock:
                got = self._pool.acquire(_core.now())
            if isinstance(got, float):
                time.sleep(got)
                continue
            endpoint, probe_first = got
            if not probe_first:
                return endpoint
            answer = self._probe(endpoint)
            with self._lock:
                self._pool.probed([(endpoint, answer)], _core.now())

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One RPC with the client's timeout and headers (retries happen across endpoints, in the pool)."""
        opts = self.options
        return fn(*args, headers=opts.headers or None, client_timeout=opts.timeout, **kwargs)

    def _config(self, endpoint: Endpoint, model: str) -> Any:
        return self._call(endpoint.transport.get_model_config, model, self.options.model_version).config

    def _tower(self, endpoint: Endpoint, model: str, preferred_input: str) -> tuple[TowerInfo, Any]:
        version = self.options.model_version
        try:
            metadata = self._call(endpoint.transport.get_model_metadata, model, version)
            config = self._config(endpoint, model)
        except self._grpc.InferenceServerException as exc:
            raise _core.discovery_error(exc, endpoint.url, self.options, model) from None
        return _core.tower_info(metadata, config, preferred_input, version), config

    def _discover(self, endpoint: Endpoint) -> ModelInfo:
        prefix = self.options.prefix
        image, image_cfg = self._tower(endpoint, *_core.image_model(self.options))
        text, text_cfg = self._tower(endpoint, *_core.text_model(self.options))
        param_sets = [_core.config_parameters(image_cfg), _core.config_parameters(text_cfg)]
        steps: dict[str, dict[str, str]] = {}
        # The ensembles' steps (preprocess, encoder, ...) may carry the parameters instead; read them too.
        for cfg in (image_cfg, text_cfg):
            for step in cfg.ensemble_scheduling.step:
                if step.model_name in steps:
                    continue
                try:
                    steps[step.model_name] = _core.config_parameters(self._config(endpoint, step.model_name))
                except self._grpc.InferenceServerException:
                    steps[step.model_name] = {}
        param_sets.extend(steps.values())
        return _core.model_info(prefix, image, text, param_sets, {"steps": steps})

    # -- embedding

    def _infer(self, endpoint: Endpoint, tower: TowerInfo, payloads: list[Any]) -> np.ndarray:
        batched = tower.max_batch_size > 0
        array = _core.request_array(payloads, batched)
        inp = self._grpc.InferInput(tower.input_name, list(array.shape), tower.input_datatype)
        inp.set_data_from_numpy(array)
        out = self._grpc.InferRequestedOutput(tower.output_name)
        result = self._call(endpoint.transport.infer, tower.model, [inp], model_version=tower.version, outputs=[out])
        return _core.parse_embeddings(result.as_numpy(tower.output_name), tower, len(payloads))

    def _blame(self, endpoint: Endpoint, tower: TowerInfo, index: int, label: str, exc: Exception) -> ClipClientError:
        """An item-level error, unless the server itself is going away (then say so instead)."""
        try:
            ready = endpoint.transport.is_model_ready(tower.model, tower.version, client_timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure here means the server is not answering
            ready = False
        return _core.item_error(exc, endpoint.url, tower.model, index, label, ready)

    def _run_chunk(
        self, tower: TowerInfo, items: Sequence[Any], part: range, encode: Callable, label: Callable
    ) -> np.ndarray:
        payloads = [encode(i, items[i]) for i in part]
        while True:  # until an endpoint answers, or the pool gives up on all of them
            endpoint = self._acquire()
            try:
                return self._send(endpoint, tower, items, part, payloads, label)
            except (ServerUnavailableError, ClientTimeoutError) as exc:
                with self._lock:
                    moves = self._pool.failed(endpoint, exc, _core.now())
                if not moves:
                    raise
            finally:
                with self._lock:
                    self._pool.release(endpoint)

    def _send(
        self, endpoint: Endpoint, tower: TowerInfo, items: Sequence[Any], part: range, payloads: list, label: Callable
    ) -> np.ndarray:
        try:
            return self._infer(endpoint, tower, payloads)
        except self._grpc.InferenceServerException as exc:
            mapped = _core.transport_error(exc, endpoint.url, self.options, tower.model)
            if mapped is not None:
                raise mapped from None
            if len(payloads) == 1:
                raise self._blame(endpoint, tower, part[0], label(items[part[0]]), exc) from None
        # The batch was rejected: send its items one by one to find the culprit (or succeed item by item).
        rows = []
        for i, payload in zip(part, payloads, strict=True):
            try:
                rows.append(self._infer(endpoint, tower, [payload]))
            except self._grpc.InferenceServerException as exc:
                mapped = _core.transport_error(exc, endpoint.url, self.options, tower.model)
                raise (mapped or self._blame(endpoint, tower, i, label(items[i]), exc)) from None
        return np.concatenate(rows)

    def _embed(
        self,
        tower: TowerInfo,
        items: Sequence[Any],
        encode: Callable,
        label: Callable,
        progress: ProgressCallback | None,
    ) -> np.ndarray:
        total = len(items)
        if total == 0:
            return np.zeros((0, max(tower.dim, 0)), dtype=np.float32)
        parts = _core.chunks(total, _core.effective_batch(self.options, tower))
        results: list[np.ndarray | None] = [None] * len(parts)
        done = 0
        workers = min(self._pool.window(), len(parts))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-client")
        pending: dict[Future, int] = {}
        try:
            next_part = 0
            while next_part < len(parts) or pending:
                # A bounded window: at most `concurrency` requests (and their encoded payloads) at once.
                while next_part < len(parts) and len(pending) < workers:
                    future = pool.submit(self._run_chunk, tower, items, parts[next_part], encode, label)
                    pending[future] = next_part
                    next_part += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                done += _core.collect_finished(finished, pending, results, parts)
                if progress is not None:
                    progress(done, total)
        finally:
            # On error: drop what has not started; running requests end within the timeout on their own.
            pool.shutdown(wait=False, cancel_futures=True)
        return np.concatenate([r for r in results if r is not None]).astype(np.float32, copy=False)

    def embed_images(self, items: Iterable[Any], *, progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed images: file paths, encoded bytes, PIL images or uint8 HxWx3 arrays (sent as PNG).

        With `preprocess="client"` each is decoded and cropped here, exactly as the server's preprocess
        model would, and sent as uint8 pixels to `<prefix>_image_pixels` (a quarter of FP32's bytes).

        Returns float32 [N, D], L2-normalised, in input order. Raises ItemError naming the failing item.
        """
        items = list(items)
        _core.check_paths(items)
        info = self.model_info
        encode = _core.image_encoder(info, self.options.preprocess)
        return self._embed(info.image, items, encode, _core.item_label, progress)

    def embed_texts(self, texts: Iterable[str], *, progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed texts (tokenised on the server). Returns float32 [N, D], L2-normalised, in input order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tower = self.model_info.text
        return self._embed(tower, texts, _core.encode_text, _core.text_label, progress)

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """One embedding per label: the re-normalised mean of its prompt embeddings (prompt ensembling)."""
        labels, templates = _core.check_labels(labels), _core.check_templates(templates)
        text = self.embed_texts(_core.prompts(labels, templates))
        return _core.label_embeddings(text, len(labels), len(templates))

    def classify(
        self,
        images: Iterable[Any],
        labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        *,
        progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """Zero-shot classification: float32 [N_images, N_labels] probabilities.

        softmax(logit_scale * cos) over the labels for CLIP; sigmoid(logit_scale * cos + logit_bias) per label
        when the server declares a logit_bias (SigLIP).
        """
        images = list(images)
        _core.check_paths(images)  # a missing file or a FIFO fails before the labels are embedded
        label_emb = self.label_embeddings(labels, templates)
        image_emb = self.embed_images(images, progress=progress)
        info = self.model_info
        _core.warn_default_scale(info)
        return _core.probabilities(image_emb, label_emb, info.logit_scale, info.logit_bias)

    def rank(
        self, text: str, images: Iterable[Any], *, top: int | None = None, progress: ProgressCallback | None = None
    ) -> list[RankedItem]:
        """Images ordered by cosine similarity to `text`: [RankedItem(index, score), ...], best first."""
        if not isinstance(text, str):
            raise ClipClientError("rank() takes one query text (str)")
        query = self.embed_texts([text])[0]
        return _core.ranking(query, self.embed_images(images, progress=progress), top)

