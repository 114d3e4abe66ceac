"""What every chat provider speaks: messages in, text deltas and a finish out.

Each provider adapter translates its SDK's exceptions into one
:class:`ProviderError` whose :class:`ErrorKind` decides what the router does
with it (fall back, mark the model failing, or both)::

    ProviderError
     ├─ kind connection    refused, reset, DNS          falls back, marks "0"
     ├─ kind timeout       connect/read timeout         falls back, marks "0"
     ├─ kind ttft          no first token in time       falls back, marks "0"
     ├─ kind server_error  5xx, error event             falls back, marks "0"
     ├─ kind rate_limited  429 (+ Retry-After)          falls back, marks "0"
     ├─ kind auth          401, 403                     falls back, marks "0"
     ├─ kind not_found     404 (unknown model)          falls back, marks "0"
     ├─ kind malformed     undecodable stream           falls back, marks "0"
     ├─ kind truncated     stream ended without finish  falls back, marks "0"
     ├─ kind internal      in-process model failed      falls back, marks "0"
     ├─ kind rejected      400, 413, 422 (the request)  falls back only
     └─ kind warming       embedded model still loading falls back only
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    role: str
    """system, user or assistant."""
    content: str


@dataclass(frozen=True)
class Options:
    temperature: float | None
    max_tokens: int | None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finish:
    reason: str
    """stop, length, cancelled, or the provider's own word."""
    input_tokens: int
    output_tokens: int


Chunk = TextDelta | Finish


class ErrorKind(StrEnum):
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    TTFT = "ttft"
    SERVER = "server_error"
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    INTERNAL = "internal"
    REJECTED = "rejected"
    WARMING = "warming"


_NOT_THE_MODELS_FAULT = frozenset({ErrorKind.REJECTED, ErrorKind.WARMING})


class ProviderError(Exception):
    """A provider call failed; ``kind`` says how, ``detail`` is safe to log."""

    def __init__(
        self,
        kind: ErrorKind,
        detail: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def marks_failing(self) -> bool:
        """Whether the model itself is to blame, so the health cache says "0"."""
        return self.kind not in _NOT_THE_MODELS_FAULT


class ChatProvider(Protocol):
    """One provider; ``stream`` yields deltas, then exactly one :class:`Finish`."""

    name: str
    ttft_limited: bool
    """Whether the router enforces the time-to-first-token limit on it."""

    def stream(
        self, model: str, messages: Sequence[Message], options: Options
    ) -> AsyncGenerator[Chunk, None]: ...

    def health_override(self, model: str) -> str | None:
        """A health the cache cannot know (``warming``), or None."""
        ...


def status_error(status: int, retry_after_s: float | None = None) -> ProviderError:
    """The error for an HTTP status a provider answered with."""
    if status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif status in (401, 403):
        kind = ErrorKind.AUTH
    elif status == 404:
        kind = ErrorKind.NOT_FOUND
    elif status == 408:
        kind = ErrorKind.TIMEOUT
    elif 400 <= status < 500:
        kind = ErrorKind.REJECTED
    else:
        # 5xx, and error events inside a 200 stream.
        kind = ErrorKind.SERVER
    return ProviderError(
        kind, f"HTTP {status}", status=status, retry_after_s=retry_after_s
    )


def connection_error(cause: BaseException | None) -> ProviderError:
    """The error for a transport failure, worded by what the cause tells."""
    import httpx2

    if isinstance(cause, httpx2.ConnectError):
        return ProviderError(ErrorKind.CONNECTION, "could not connect")
    return ProviderError(ErrorKind.CONNECTION, "connection lost")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
