"""The client's exceptions. The client library stands alone (it never imports `exporter`); the
CLI prints any of them as one line and exits with `exit_code`."""

from __future__ import annotations


class ClipClientError(Exception):
    """Base of every error the clients raise."""

    exit_code = 2


class UsageError(ClipClientError):
    """A client command was called with options that cannot work together."""


class InvalidUrlError(UsageError, ValueError):
    """A url is not HOST:PORT (port 1-65535, an IPv6 host in brackets); also a ValueError."""


class ServerUnavailableError(ClipClientError):
    """The server cannot be reached (down, stopping, refused) after the configured retries."""


class ModelMismatchError(ClipClientError):
    """The endpoints given together serve different models: their embeddings must not be mixed."""


class ClientTimeoutError(ClipClientError):
    """A request took longer than the client's timeout."""


class ModelNotFoundError(ClipClientError):
    """The server is up but does not serve the expected `<prefix>_image` / `<prefix>_text` models."""


class ServerResponseError(ClipClientError):
    """The server answered with something the client cannot use (wrong shape, dtype, output name)."""


class RequestError(ClipClientError):
    """The server rejected a request for a reason not tied to one item."""


class ItemError(ClipClientError):
    """One input item failed. `index` is its position in the call's input, `label` its path or a short description."""

    def __init__(self, index: int, label: str, reason: str) -> None:
        self.index = index
        self.label = label
        self.reason = reason
        super().__init__(f"item {index} ({label}): {reason}")


class ServerFaultError(ClipClientError):
    """The server failed while handling an item (gRPC INTERNAL, UNKNOWN, ...): not the item's fault.

    Only INVALID_ARGUMENT from the server is reported as an ItemError ("your input is bad").
    `index` and `label` name the item whose request failed."""

    def __init__(self, index: int, label: str, reason: str) -> None:
        self.index = index
        self.label = label
        self.reason = reason
        super().__init__(f"server fault at item {index} ({label}), not a problem with the item: {reason}")


class InvalidItemError(ItemError):
    """The client could not read or encode the item (missing file, unsupported type or array shape)."""
