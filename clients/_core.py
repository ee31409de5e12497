"""What the sync and asyncio clients share: options, model discovery, item encoding, error mapping, CLIP maths.

Nothing here does I/O on the network; `sync.py` and `aio.py` only differ in how they wait.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.clients import contract
from clip_triton.clients.errors import (
    ClientTimeoutError,
    ClipClientError,
    InvalidItemError,
    InvalidUrlError,
    ItemError,
    ModelMismatchError,
    ModelNotFoundError,
    RequestError,
    ServerFaultError,
    ServerResponseError,
    ServerUnavailableError,
)

# A few of OpenAI's ImageNet prompt templates: enough for prompt ensembling to help, cheap to embed.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)
DEFAULT_LOGIT_SCALE = 100.0

PREPROCESS_WHERE = ("server", "client")

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(done_items, total_items)` after each finished request."""


@dataclass(frozen=True)
class ClientOptions:
    """Connection and scheduling options shared by ClipClient and AsyncClipClient."""

    # One endpoint HOST:PORT, or several replicas of one model: "a:8001,b:8001" (or a list, joined here).
    url: str = "127.0.0.1:8001"
    prefix: str = contract.DEFAULT_PREFIX
    model_version: str = ""  # "" = the server's latest/only version
    batch_size: int = 16  # items per request; capped by the model's max_batch_size
    concurrency: int = 4  # requests in flight at once
    timeout: float | None = 60.0  # seconds per request (gRPC deadline)
    retries: int = 3  # extra attempts per endpoint while every endpoint is unavailable
    backoff: float = 0.25  # first re-probe delay in seconds, doubled each time (capped at 4 s)
    headers: dict[str, str] = field(default_factory=dict)
    ssl: bool = False
    root_certificates: str | None = None  # PEM file paths, passed through to tritonclient
    private_key: str | None = None
    certificate_chain: str | None = None
    # "server": send encoded bytes to <prefix>_image (the server decodes). "client": decode and crop here,
    # with the server's own code (clients/clip_preprocess.py), and send uint8 pixels to <prefix>_image_pixels.
    preprocess: str = "server"

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_WHERE:
            raise ClipClientError(f"preprocess must be 'server' or 'client', got {self.preprocess!r}")
        object.__setattr__(self, "url", ",".join(parse_urls(self.url)))
        if self.batch_size < 1:
            raise ClipClientError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency < 1:
            raise ClipClientError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise ClipClientError(f"retries must be >= 0, got {self.retries}")
        if self.timeout is not None and self.timeout <= 0:
            raise ClipClientError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name in ("root_certificates", "private_key", "certificate_chain"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ClipClientError(f"{name} file not found: {value}")

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self.url.split(","))

    def grpc_kwargs(self, url: str) -> dict[str, Any]:
        return {
            "url": url,
            "ssl": self.ssl,
            "root_certificates": self.root_certificates,
            "private_key": self.private_key,
            "certificate_chain": self.certificate_chain,
        }

    def retry_delay(self, attempt: int) -> float:
        return min(self.backoff * (2**attempt), 4.0)


def parse_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """'a:8001,b:8001' or ['a:8001', 'b:8001'] -> ('a:8001', 'b:8001'): stripped, each checked by
    check_endpoint, duplicates dropped. Raises InvalidUrlError (a ValueError) naming the bad entry."""
    parts = [url] if isinstance(url, str) else list(url)
    urls: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise InvalidUrlError(f"url must be HOST:PORT strings, got {part!r}")
        for one in part.split(","):
            one = one.strip()
            if one and (one := check_endpoint(one)) not in urls:
                urls.append(one)
    if not urls:
        raise InvalidUrlError(f"url must name at least one HOST:PORT endpoint, got {url!r}")
    return tuple(urls)


# A host name or IPv4 address: letters, digits, '.', '-', '_' (no spaces, slashes or '@').
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def check_endpoint(url: str) -> str:
    """'HOST:PORT' or '[IPV6]:PORT' with a port in 1-65535, as 'host:port' (leading zeros dropped).

    gRPC itself takes '127.0.0.1:99999' and connects to port 34463 (the port wraps at 16 bits), so
    every url is checked here before a channel is made."""
    example = "e.g. 127.0.0.1:8001 or [::1]:8001"
    if "://" in url:
        raise InvalidUrlError(f"url must be HOST:PORT (no scheme), got {url!r}")
    if url.startswith("["):
        host, bracket, rest = url[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise InvalidUrlError(f"url {url!r} is not [IPV6]:PORT ({example})")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])  # a zone id (%eth0) may follow
        except ValueError:
            raise InvalidUrlError(f"url {url!r}: {host!r} is not an IPv6 address") from None
        host = f"[{host}]"
    else:
        host, colon, port = url.rpartition(":")
        if not colon:
            raise InvalidUrlError(f"url must be HOST:PORT, got {url!r} ({example})")
        if ":" in host:
            raise InvalidUrlError(f"url {url!r}: an IPv6 host goes in brackets ({example})")
        if not host:
            raise InvalidUrlError(f"url {url!r} has no host ({example})")
        if not _HOST.fullmatch(host):
            raise InvalidUrlError(f"url {url!r}: {host!r} is not a host name or IP address")
    if not _PORT.fullmatch(port):
        raise InvalidUrlError(f"url {url!r}: port {port!r} is not a number 1-65535")
    if not 1 <= int(port) <= 65535:
        raise InvalidUrlError(f"url {url!r}: port {int(port)} is out of range (1-65535)")
    return f"{host}:{int(port)}"


@dataclass(frozen=True)
class TowerInfo:
    """One served ensemble (`<prefix>_image` or `<prefix>_text`) as discovered from the server."""

    model: str
    version: str
    input_name: str
    output_name: str
    output_datatype: str
    dim: int  # -1 if the server reports a dynamic size (then learnt from the first answer)
    max_batch_size: int  # 0: the model takes no batch dimension
    input_datatype: str = contract.BYTES  # or UINT8: the pixels entry point


@dataclass(frozen=True)
class ModelInfo:
    """What the client learnt about the served model: names, dims, logit scale/bias, and an identity hash."""

    prefix: str
    image: TowerInfo
    text: TowerInfo
    logit_scale: float
    logit_bias: float | None
    logit_scale_from_server: bool
    parameters: dict[str, str]
    identity: str  # sha256 of the metadata and configs: changes when the served model does

    @property
    def dim(self) -> int:
        return self.image.dim

    @property
    def key(self) -> str:
        """What must match between replicas: the encoders' checksums (recorded by `clip-triton repository`),
        the crop, the towers. Unlike `identity` it ignores deployment knobs (thread counts, limits)."""
        params = self.parameters
        if not (params.get(contract.PARAM_IMAGE_ENCODER_SHA256) and params.get(contract.PARAM_TEXT_ENCODER_SHA256)):
            return self.identity  # not written by clip-triton: compare everything the server told us
        keep = (
            contract.PARAM_IMAGE_ENCODER_SHA256,
            contract.PARAM_TEXT_ENCODER_SHA256,
            contract.PARAM_PREPROCESS,
            contract.PARAM_LOGIT_SCALE,
            contract.PARAM_LOGIT_BIAS,
        )
        towers = [(t.model, t.input_name, t.output_name, t.dim) for t in (self.image, self.text)]
        blob = json.dumps({"params": {k: params.get(k, "") for k in keep}, "towers": towers}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """A short name for error messages: model name and the image encoder's checksum."""
        params = self.parameters
        sha = params.get(contract.PARAM_IMAGE_ENCODER_SHA256, "")
        name = params.get(contract.PARAM_MODEL_NAME, self.prefix)
        return f"{name} (image encoder sha256 {sha[:12]})" if sha else f"{name} (identity {self.identity[:12]})"


@dataclass(frozen=True)
class RankedItem:
    index: int  # position in the `images` passed to rank()
    score: float  # cosine similarity to the query text


# ---------------------------------------------------------------------------------------------- discovery


def image_model(options: ClientOptions) -> tuple[str, str]:
    """(ensemble, its input) the client sends images to: encoded bytes, or pixels cropped here."""
    role = "image_pixels" if options.preprocess == "client" else "image"
    return contract.model_names(options.prefix)[role], contract.ENSEMBLE_INPUTS[role].name


def text_model(options: ClientOptions) -> tuple[str, str]:
    """(ensemble, its input) the client sends texts to."""
    return contract.model_names(options.prefix)["text"], contract.ENSEMBLE_INPUTS["text"].name


def resolve_options(
    url: str | Sequence[str], options: ClientOptions | None, kwargs: dict[str, Any]
) -> ClientOptions:
    """Both clients take either `options=` or keyword options (never both)."""
    if options is None:
        return ClientOptions(url=",".join(parse_urls(url)), **kwargs)
    if kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    return options


def _pick(tensors: Sequence[Any], preferred: str, what: str, model: str) -> Any:
    if len(tensors) == 1:
        return tensors[0]
    for tensor in tensors:
        if tensor.name == preferred:
            return tensor
    names = ", ".join(t.name for t in tensors) or "none"
    raise ServerResponseError(f"model {model} has {what}s [{names}]; expected one named {preferred!r}")


def tower_info(metadata: Any, config: Any, input_preferred: str, version: str) -> TowerInfo:
    """Build a TowerInfo from a ModelMetadataResponse and a ModelConfig (protobufs)."""
    model = metadata.name
    inp = _pick(list(metadata.inputs), input_preferred, "input", model)
    out = _pick(list(metadata.outputs), contract.EMBEDDING_OUTPUT, "output", model)
    expected = contract.UINT8 if input_preferred == contract.PIXELS_INPUT else contract.BYTES
    if inp.datatype != expected:
        raise ServerResponseError(f"model {model} input {inp.name} is {inp.datatype}; expected {expected}")
    if out.datatype not in contract.EMBEDDING_DATATYPES:
        raise ServerResponseError(f"model {model} output {out.name} is {out.datatype}; expected a float type")
    shape = list(out.shape)
    dim = int(shape[-1]) if shape else -1
    return TowerInfo(
        model=model,
        version=version,
        input_name=inp.name,
        input_datatype=inp.datatype,
        output_name=out.name,
        output_datatype=out.datatype,
        dim=dim,
        max_batch_size=int(config.max_batch_size),
    )


def tokenizer_info(metadata: Any, config: Any, version: str) -> tuple[TowerInfo, int]:
    """The tokenize model (`<prefix>_text_tokenize`) as a TowerInfo over its ids output, and its pad id
    (from the `tokenizer` parameter: the manifest's tokenizer section)."""
    model = metadata.name
    params = config_parameters(config)
    inp = _pick(list(metadata.inputs), contract.TEXT_INPUT, "input", model)
    out = _pick(list(metadata.outputs), params.get(contract.PARAM_OUTPUT_NAME, ""), "output", model)
    try:
        pad_id = int(json.loads(params.get(contract.PARAM_TOKENIZER) or "{}").get("pad_id", 0))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ServerResponseError(f"model {model} parameter {contract.PARAM_TOKENIZER} is not usable: {exc}") from None
    shape = list(out.shape)
    tower = TowerInfo(model=model, version=version, input_name=inp.name, output_name=out.name,
                      output_datatype=out.datatype, dim=int(shape[-1]) if shape else -1,
                      max_batch_size=int(config.max_batch_size), input_datatype=inp.datatype)
    return tower, pad_id


def token_count_parser(pad_id: int) -> Callable[[np.ndarray | None, TowerInfo, int], np.ndarray]:
    """A `parse` for _embed over the tokenize model: ids [N, L] -> tokens per text [N, 1] (float32), counted
    from the first to the last non-pad id, so padding on either side is left out (special tokens included;
    a truncated text counts L)."""

    def parse(raw: np.ndarray | None, tower: TowerInfo, count: int) -> np.ndarray:
        if raw is None:
            raise ServerResponseError(f"model {tower.model} returned no {tower.output_name!r} output")
        ids = np.asarray(raw).reshape(count, -1)
        used = ids != pad_id
        length = ids.shape[1] - np.argmax(used[:, ::-1], axis=1) - np.argmax(used, axis=1)
        return np.where(used.any(axis=1), length, 0).astype(np.float32).reshape(count, 1)

    return parse


def config_parameters(config: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def _float_param(params: dict[str, str], key: str) -> float | None:
    raw = params.get(key, "").strip()
    if not raw or raw.lower() in ("none", "null"):
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ServerResponseError(f"model parameter {key}={raw!r} is not a number") from exc


def model_info(
    prefix: str, image: TowerInfo, text: TowerInfo, param_sets: Sequence[dict[str, str]], identity_parts: Any
) -> ModelInfo:
    """Combine the towers and the config parameters (first set that has a key wins) into a ModelInfo."""
    if image.dim > 0 and text.dim > 0 and image.dim != text.dim:
        raise ServerResponseError(
            f"{image.model} returns {image.dim}-d embeddings but {text.model} returns {text.dim}-d ones"
        )
    params: dict[str, str] = {}
    for group in reversed(param_sets):  # earlier sets (the image ensemble) take precedence
        params.update(group)
    scale = _float_param(params, contract.PARAM_LOGIT_SCALE)
    bias = _float_param(params, contract.PARAM_LOGIT_BIAS)
    blob = json.dumps(
        {"image": asdict(image), "text": asdict(text), "params": params, "extra": identity_parts},
        sort_keys=True,
        default=str,
    )
    return ModelInfo(
        prefix=prefix,
        image=image,
        text=text,
        logit_scale=scale if scale is not None else DEFAULT_LOGIT_SCALE,
        logit_bias=bias,
        logit_scale_from_server=scale is not None,
        parameters=params,
        identity=hashlib.sha256(blob.encode()).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------- items


def item_label(item: Any) -> str:
    """A short human name for an item, used in error messages."""
    if isinstance(item, str | os.PathLike):
        return str(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return f"<{len(item)} bytes>"
    if isinstance(item, np.ndarray):
        return f"<array {'x'.join(map(str, item.shape))} {item.dtype}>"
    if hasattr(item, "size") and hasattr(item, "mode") and hasattr(item, "save"):
        return f"<PIL image {item.size[0]}x{item.size[1]} {item.mode}>"
    return f"<{type(item).__name__}>"


def text_label(text: Any) -> str:
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _png(image: Any) -> bytes:
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "1"):
        image = image.convert("RGB")  # e.g. CMYK, which PNG cannot store
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: the bytes only travel to the server
    return buf.getvalue()


# The server's default image byte limit (clip_preprocess.DEFAULT_MAX_BYTES), used when it declares none.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
# A larger file cannot travel in one gRPC message (tritonclient's limit): the ceiling when max_bytes is 0 (off).
MAX_MESSAGE_BYTES = 2**31 - 1
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a stat mode that is not a regular file or a folder."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def describe_entry(path: str | os.PathLike) -> str:
    """What a path that is not a regular file is: 'a FIFO', 'a symlink to /dev/zero, a character device',
    'a broken symlink' (stat() only: a FIFO or a device is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symlink" if os.path.islink(path) else "gone"
    what = file_kind(mode)
    return f"a symlink to {os.path.realpath(path)}, {what}" if os.path.islink(path) else what


def byte_ceiling(limit: int) -> int:
    """The most bytes a file may have under a byte limit: the limit, or gRPC's message limit when it is 0 (off)."""
    return limit if 0 < limit <= MAX_MESSAGE_BYTES else MAX_MESSAGE_BYTES


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as an image file (one line), or None for a regular file.

    Symlinks are followed, and named in the answer: 'not a regular file: x.jpg is a symlink to /dev/zero,
    a character device'. Only stat() is used: a FIFO or a device is never opened."""
    name = os.fspath(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"file not found (a broken symlink to {os.readlink(name)})"
        return "file not found"
    except OSError as exc:  # a symlink loop, a name too long, a folder we may not enter
        return f"cannot read: {exc.strerror or exc}"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not an image file"
    return f"not a regular file: {name} is {describe_entry(path)}"


def check_paths(items: Sequence[Any]) -> None:
    """Fail before any request when a path is missing or not a regular file (a folder, a FIFO, a device),
    instead of after minutes of embedding, or blocked on a FIFO."""
    for index, item in enumerate(items):
        if isinstance(item, str | os.PathLike) and (problem := path_problem(item)) is not None:
            raise InvalidItemError(index, str(item), problem)


def image_byte_limit(info: ModelInfo) -> int:
    """The most bytes one encoded image may have: the served model's `max_bytes` parameter (its default
    when it declares none); 0 (off) on the server still leaves gRPC's message limit."""
    raw = info.parameters.get(contract.PARAM_MAX_BYTES, "").strip()
    try:
        limit = int(raw) if raw else DEFAULT_MAX_IMAGE_BYTES
    except ValueError:
        limit = DEFAULT_MAX_IMAGE_BYTES
    return byte_ceiling(limit)


def read_image_file(index: int, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A regular file's bytes, refused without reading them when it is larger than `max_bytes`.

    Opened non-blocking and checked with fstat before any read: a FIFO (even one swapped in after
    check_paths) is refused at once instead of waiting for a writer, and a device such as /dev/zero is
    never read. At most `max_bytes + 1` bytes are read, so a file that grows meanwhile is refused too."""
    label = item_label(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise InvalidItemError(index, label, "is a folder, not an image file") from None
    except OSError as exc:  # missing, a socket (ENXIO), no permission
        problem = path_problem(path)
        raise InvalidItemError(index, label, problem or f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        problem = path_problem(path) or f"not a regular file: {label} is {file_kind(st.st_mode)}"
        raise InvalidItemError(index, label, problem)
    os.set_blocking(fd, True)
    with open(fd, "rb", buffering=0, closefd=True) as handle:
        max_bytes = byte_ceiling(max_bytes)
        if st.st_size > max_bytes:
            raise InvalidItemError(index, label, _too_large(st.st_size, max_bytes))
        parts: list[bytes] = []
        size, want = 0, st.st_size + 1  # one read for the whole file; more only if it grows meanwhile
        try:
            while size <= max_bytes and (part := handle.read(min(want, max_bytes + 1 - size))):
                parts.append(part)
                size, want = size + len(part), 1 << 20
        except OSError as exc:
            raise InvalidItemError(index, label, f"cannot read: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise InvalidItemError(index, label, _too_large(size, max_bytes))
    return b"".join(parts)


def _too_large(size: int, limit: int) -> str:
    return (
        f"image file too large: {_bytes(size)}, over the limit of {_bytes(limit)} "
        "(the model's max_bytes parameter); not sent"
    )


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def encode_image(index: int, item: Any, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """Item -> encoded image bytes. Paths are read (regular files of at most `max_bytes`), bytes pass
    through, PIL images and arrays become PNG."""
    label = item_label(item)
    if isinstance(item, str | os.PathLike):
        return read_image_file(index, item, max_bytes)
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)
        if not data:
            raise InvalidItemError(index, label, "empty bytes")
        return data
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise InvalidItemError(index, label, "arrays must be uint8 (HxWx3 RGB, HxWx4 RGBA or HxW grey)")
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))) or 0 in item.shape:
            raise InvalidItemError(index, label, "arrays must be HxWx3 (RGB), HxWx4 (RGBA) or HxW (grey)")
        from PIL import Image

        array = item[:, :, 0] if item.ndim == 3 and item.shape[2] == 1 else item
        return _png(Image.fromarray(np.ascontiguousarray(array)))
    if hasattr(item, "save") and hasattr(item, "mode"):
        try:
            return _png(item)
        except Exception as exc:  # noqa: BLE001 - any PIL failure is this item's problem
            raise InvalidItemError(index, label, f"cannot encode as PNG: {exc}") from None
    raise InvalidItemError(
        index, label, "unsupported item type; pass a path, encoded bytes, a PIL image or a uint8 HxWx3 array"
    )


def pixel_encoder(info: ModelInfo) -> Callable[[int, Any], np.ndarray]:
    """Item -> the uint8 [H, W, 3] crop the server's preprocess model would make, with the transform
    and limits the `<prefix>_image_pixels` ensemble declares in its parameters."""
    from clip_triton.clients.clip_preprocess import ImageInputError, ImageLimits, Preprocessor

    raw = info.parameters.get(contract.PARAM_PREPROCESS)
    if not raw:
        raise ServerResponseError(
            f"model {info.image.model} declares no '{contract.PARAM_PREPROCESS}' parameter to crop with"
        )
    try:
        transform = Preprocessor.from_config(json.loads(raw))
        limits = ImageLimits.from_parameters(info.parameters)
    except (ValueError, TypeError, KeyError) as exc:
        raise ServerResponseError(
            f"model {info.image.model} has an unusable '{contract.PARAM_PREPROCESS}' parameter: {exc}"
        ) from None

    max_bytes = byte_ceiling(limits.max_bytes)

    def encode(index: int, item: Any) -> np.ndarray:
        if isinstance(item, str | os.PathLike | bytes | bytearray | memoryview):
            data = encode_image(index, item, max_bytes)  # reads paths, checks bytes
            try:
                return transform.crop_bytes(data, limits)
            except ImageInputError as exc:
                raise InvalidItemError(index, item_label(item), str(exc)) from None
        # PIL images and arrays: what encode_image would send, decoded as the server would decode it.
        return encode(index, encode_image(index, item))

    return encode


def image_encoder(info: ModelInfo, preprocess: str) -> Callable[[int, Any], Any]:
    """How embed_images turns an item into its request payload: encoded bytes (files read within the
    model's byte limit), or with preprocess="client" the crop the server would make."""
    if preprocess == "client":
        return pixel_encoder(info)
    limit = image_byte_limit(info)
    return lambda index, item: encode_image(index, item, limit)


def encode_text(index: int, text: Any) -> bytes:
    if not isinstance(text, str):
        raise InvalidItemError(index, text_label(text), "texts must be str")
    return text.encode("utf-8")


def collect_finished(
    finished: Iterable[Any], pending: dict[Any, int], results: list[Any], parts: list[range]
) -> int:
    """Move finished requests (concurrent futures or asyncio tasks: the same interface) into
    `results`; raise the earliest chunk's error so the report names the first bad item.
    Returns how many items the finished requests covered."""
    errors: list[tuple[int, BaseException]] = []
    done = 0
    for request in finished:
        k = pending.pop(request)
        exc = request.exception()
        if exc is not None:
            errors.append((k, exc))
            continue
        results[k] = request.result()
        done += len(parts[k])
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return done


def chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def effective_batch(options: ClientOptions, tower: TowerInfo) -> int:
    if tower.max_batch_size <= 0:
        return 1
    return max(1, min(options.batch_size, tower.max_batch_size))


def request_array(payloads: list[Any], batched: bool) -> np.ndarray:
    """One request's tensor: BYTES [N, 1] (or [1] for a model without batching), or the pixels
    entry point's uint8 crops stacked to [N, H, W, 3] (or [H, W, 3])."""
    if payloads and isinstance(payloads[0], np.ndarray):
        return np.stack(payloads) if batched else payloads[0]
    array = np.empty(len(payloads), dtype=np.object_)
    array[:] = payloads  # assigning avoids numpy guessing a fixed-width bytes dtype
    return array.reshape(-1, 1) if batched else array


def parse_embeddings(raw: np.ndarray | None, tower: TowerInfo, count: int) -> np.ndarray:
    """Check and normalise one response's output to float32 [count, D], L2-normalised rows."""
    if raw is None:
        raise ServerResponseError(f"model {tower.model} returned no {tower.output_name!r} output")
    array = np.asarray(raw, dtype=np.float32)
    array = array.reshape(count, -1) if array.size and array.size % max(count, 1) == 0 else array
    if array.ndim != 2 or array.shape[0] != count:
        raise ServerResponseError(
            f"model {tower.model} returned shape {list(np.shape(raw))} for {count} item(s); expected [{count}, D]"
        )
    if tower.dim > 0 and array.shape[1] != tower.dim:
        raise ServerResponseError(
            f"model {tower.model} returned {array.shape[1]}-d embeddings; its metadata says {tower.dim}"
        )
    if not np.all(np.isfinite(array)):
        raise ServerResponseError(f"model {tower.model} returned non-finite values")
    # The graph already normalises; doing it again here costs nothing and protects FP16 outputs.
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- errors


def status_of(exc: Exception) -> str:
    """'UNAVAILABLE', 'DEADLINE_EXCEEDED', ... from an InferenceServerException (or '' if it has none)."""
    status = exc.status() if hasattr(exc, "status") else None
    return str(status or "").rsplit(".", 1)[-1].upper()


def message_of(exc: Exception) -> str:
    msg = exc.message() if hasattr(exc, "message") else None
    text = str(msg if msg is not None else exc)
    return " ".join(text.split())  # one line


def transport_error(
    exc: Exception, url: str, options: ClientOptions, model: str, *, running: bool = True
) -> ClipClientError | None:
    """Map errors not caused by the items (server down, timeout, missing model); None for item-level ones.

    `running`: the model was found at discovery, so its disappearing now means the server is going away
    (Triton unloads every model before it closes its ports) rather than a wrong prefix.
    """
    status, msg = status_of(exc), message_of(exc)
    if status == "UNAVAILABLE":
        return ServerUnavailableError(f"{UNAVAILABLE.format(url=url)}{msg}")
    if status == "DEADLINE_EXCEEDED":
        return ClientTimeoutError(f"request to {model} at {url} timed out after {options.timeout}s")
    if status in ("CANCELLED", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"):
        return RequestError(f"{model} at {url}: {status.lower()}: {msg}")
    lowered = msg.lower()
    if status == "NOT_FOUND" or "unknown model" in lowered or "is not found" in lowered:
        if running:
            return ServerUnavailableError(f"server {url} stopped serving {model} (shutting down?): {msg}")
        return ModelNotFoundError(f"server {url} does not serve {model}: {msg}")
    if "not ready" in lowered or "server is stopping" in lowered or "shutting down" in lowered:
        return ServerUnavailableError(f"server {url}: {msg}")
    return None


UNAVAILABLE = "server {url} unavailable: "  # the pool's summary drops it to add the attempt count


def item_error(exc: Exception, url: str, model: str, index: int, label: str, ready: bool) -> ClipClientError:
    """A one-item request failed: the item's fault only when the server says INVALID_ARGUMENT."""
    if not ready:
        return ServerUnavailableError(
            f"server {url} stopped serving {model} (at item {index}, {label}): {message_of(exc)}"
        )
    if status_of(exc) == "INVALID_ARGUMENT":
        return ItemError(index, label, f"rejected by {model}: {message_of(exc)}")
    return ServerFaultError(index, label, f"{model} at {url}: {status_of(exc).lower() or 'error'}: {message_of(exc)}")


def discovery_error(exc: Exception, url: str, options: ClientOptions, model: str) -> ClipClientError:
    mapped = transport_error(exc, url, options, model, running=False)
    if mapped is not None:
        return mapped
    return ModelNotFoundError(f"cannot read {model}'s metadata from {url}: {message_of(exc)}")


# ---------------------------------------------------------------------------------------------- replicas


@dataclass(eq=False)
class Endpoint:
    """One replica's state. `transport` is its tritonclient client, made by ClipClient / AsyncClipClient."""

    url: str
    transport: Any = None
    info: ModelInfo | None = None
    live: bool = False  # discovered (same model as the others) and not failed since
    probing: bool = False  # one request is discovering it now; the others wait for the answer
    in_flight: int = 0
    failures: int = 0  # consecutive: a live endpoint going down, or a failed probe
    due: float = 0.0  # time.monotonic() from which a set-aside endpoint may be probed again
    error: str = ""  # its last failure, for the final message
    seen: bool = False  # discovered at least once: later discovery failures only mean "still down"


class EndpointPool:
    """Which replica takes the next request, which are set aside and when to probe them again, and when
    to give up. No I/O here: both clients run the same rules and only differ in how they wait.

    A failed endpoint is set aside for `backoff * 2**k` seconds (capped at 4 s), then probed by running
    discovery again, so a replica that comes back serving another model is refused like one that
    differs at connect. The run gives up only when every endpoint has failed `retries + 1` times in a
    row: with one endpoint that is the plain retry-with-backoff of a single server.
    """

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.endpoints = [Endpoint(url) for url in options.urls]
        self.info: ModelInfo | None = None  # the model every replica must serve: the first one discovered
        self._reference = ""  # url that `info` came from
        self._turn = 0

    def unprobed(self, now: float) -> list[Endpoint]:
        """Endpoints due for discovery, marked as being probed (connect probes them all at once)."""
        due = [e for e in self.endpoints if not e.live and not e.probing and e.due <= now]
        for endpoint in due:
            endpoint.probing = True
        return due

    def acquire(self, now: float) -> tuple[Endpoint, bool] | float:
        """(endpoint, probe_first) for the next request, or seconds to wait before asking again.

        Endpoints due for a re-probe go first (the caller discovers them, then asks again); otherwise the
        live endpoint with the fewest requests in flight, ties in turn. Raises ServerUnavailableError when
        every endpoint has used up its attempts.
        """
        due = [e for e in self.endpoints if not e.live and not e.probing and e.due <= now]
        if due:
            due[0].probing = True
            return due[0], True
        live = [e for e in self.endpoints if e.live]
        if live:
            self._turn += 1
            n = len(self.endpoints)
            endpoint = min(live, key=lambda e: (e.in_flight, (self.endpoints.index(e) - self._turn) % n))
            endpoint.in_flight += 1
            return endpoint, False
        waiting = [e.due for e in self.endpoints if not e.probing]
        spent = all(e.failures > self.options.retries for e in self.endpoints)
        if spent and len(waiting) == len(self.endpoints):  # and no probe still out: nothing left to try
            raise self.unavailable()
        return max(0.0, min(waiting) - now) if waiting else 0.02  # all being probed: look again shortly

    def release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight = max(0, endpoint.in_flight - 1)

    def probed(self, results: Sequence[tuple[Endpoint, ModelInfo | ClipClientError]], now: float) -> None:
        """Record discovery answers (in endpoint order, so the first replica is the reference); raise
        ModelMismatchError for a replica serving another model, or a first discovery's error that is not
        the server being down (a wrong prefix, say)."""
        raised: ClipClientError | None = None
        for endpoint, result in results:
            endpoint.probing = False
            if isinstance(result, ModelInfo):
                if self.info is None:
                    self.info, self._reference = result, endpoint.url
                if result.key != self.info.key:
                    self._set_aside(endpoint, f"serves another model: {result.describe()}", now, probe=True)
                    raised = raised or ModelMismatchError(
                        f"replicas serve different models: {self._reference} serves {self.info.describe()}, "
                        f"{endpoint.url} serves {result.describe()}; refusing to mix their embeddings"
                    )
                    continue
                endpoint.info, endpoint.live, endpoint.seen, endpoint.failures = result, True, True, 0
            else:
                self._set_aside(endpoint, str(result), now, probe=True)
                if not (isinstance(result, ServerUnavailableError) or endpoint.seen):
                    raised = raised or result
        if raised is not None:
            raise raised

    def failed(self, endpoint: Endpoint, error: ClipClientError, now: float) -> bool:
        """A request on `endpoint` failed with `error`: True when it should move to another endpoint.

        Server-side unavailability (refused, reset, stopping) always moves; a timeout moves only when
        another endpoint is live (a lone slow server keeps its ClientTimeoutError). Item errors never get here.
        """
        if isinstance(error, ClientTimeoutError):
            if not any(e.live and e is not endpoint for e in self.endpoints):
                return False
        elif not isinstance(error, ServerUnavailableError):
            return False
        self._set_aside(endpoint, str(error), now)
        return True

    def _set_aside(self, endpoint: Endpoint, error: str, now: float, probe: bool = False) -> None:
        if endpoint.live or probe:  # count each going-down once, not once per request that was in flight
            endpoint.failures += 1
            endpoint.due = now + self.options.retry_delay(endpoint.failures - 1)
        endpoint.live, endpoint.info = False, None
        endpoint.error = error

    def unavailable(self) -> ServerUnavailableError:
        if len(self.endpoints) == 1:
            one = self.endpoints[0]
            detail = one.error.removeprefix(UNAVAILABLE.format(url=one.url))
            return ServerUnavailableError(f"server {one.url} unavailable after {one.failures} attempt(s): {detail}")
        details = "; ".join(f"{e.url}: {_short(e.error.removeprefix(UNAVAILABLE.format(url=e.url)))}"
                            for e in self.endpoints)
        urls = ", ".join(e.url for e in self.endpoints)
        return ServerUnavailableError(
            f"servers {urls} all unavailable after {self.options.retries + 1} attempt(s) each: {details}"
        )

    def window(self) -> int:
        """Requests in flight at once: `concurrency` per endpoint."""
        return self.options.concurrency * len(self.endpoints)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now() -> float:
    return time.monotonic()


# ---------------------------------------------------------------------------------------------- CLIP maths


def check_templates(templates: Sequence[str]) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ClipClientError("templates must not be empty")
    for template in templates:
        if "{}" not in template:
            raise ClipClientError(f"template {template!r} has no '{{}}' placeholder for the label")
    return templates


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ClipClientError("labels must not be empty")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise ClipClientError("labels must be non-empty strings")
    return labels


def prompts(labels: list[str], templates: list[str]) -> list[str]:
    return [template.format(label) for label in labels for template in templates]


def label_embeddings(text_embeddings: np.ndarray, n_labels: int, n_templates: int) -> np.ndarray:
    """Prompt ensembling: mean of each label's normalised template embeddings, re-normalised."""
    grouped = text_embeddings.reshape(n_labels, n_templates, -1).mean(axis=1)
    return (grouped / np.maximum(np.linalg.norm(grouped, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def warn_default_scale(info: ModelInfo) -> None:
    if not info.logit_scale_from_server:
        warnings.warn(
            f"the server's {info.image.model} config has no '{contract.PARAM_LOGIT_SCALE}' parameter; classify() uses "
            f"{DEFAULT_LOGIT_SCALE} (CLIP's trained value) and no bias",
            stacklevel=3,
        )


def probabilities(
    image_embeddings: np.ndarray, label_emb: np.ndarray, logit_scale: float, logit_bias: float | None
) -> np.ndarray:
    """softmax(scale * cos) over labels (CLIP), or sigmoid(scale * cos + bias) per label (SigLIP)."""
    logits = logit_scale * (image_embeddings.astype(np.float64) @ label_emb.astype(np.float64).T)
    if logit_bias is not None:
        return (1.0 / (1.0 + np.exp(-(logits + logit_bias)))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def ranking(query: np.ndarray, embeddings: np.ndarray, top: int | None = None) -> list[RankedItem]:
    """Items by descending cosine similarity to one normalised query vector (ties keep input order)."""
    scores = embeddings @ query.reshape(-1)
    order = np.argsort(-scores, kind="stable")
    if top is not None:
        order = order[: max(top, 0)]
    return [RankedItem(int(i), float(scores[i])) for i in order]
