"""What every cloud provider does alike per request: time it, bound the wait for its first
byte, and turn the SDK's errors into logged `ProviderError`s.

A provider holds one `FirstByteDeadline` (its name, kind, deadline, SDK errors and their
mapping) and opens a `TimedRequest` per call. The request's `first_byte()` block covers
connecting, the response headers and the first output (a transcript, the agent's first
token, the first audio); leaving it stamps the first-byte time that `timing()` reports.
Only that wait is wrapped: the chunks after it pass with no extra work per chunk.

The deadline here is the provider's own, the outer one: the chain gives up first, at its
first-output deadline, and reads an abandoned request on for its usage for
`providers.drain_timeout_s` more (engine.providers.drains), so a provider's deadline is
the sum of both (`ProvidersConfig.request_deadline_s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from engine.log import get_logger
from engine.providers.base import ProviderError, ProviderKind, Timing

log = get_logger(__name__)

# What a provider of each kind owes its caller first.
_FIRST_OUTPUT: dict[ProviderKind, str] = {"stt": "transcript", "llm": "first token",
                                          "tts": "audio"}

ErrorMapper = Callable[[BaseException], ProviderError]


class FirstByteDeadline:
    """One cloud provider's requests: the deadline of their first byte and their errors.

    `errors` are the SDK's exception types that `map_error` turns into ProviderErrors;
    a provider catches `errors` around the rest of a stream too (see `TimedRequest.cut`).
    """

    __slots__ = ("_expired_message", "errors", "kind", "map_error", "provider", "timeout_s")

    def __init__(self, provider: str, kind: ProviderKind, timeout_s: float,
                 errors: tuple[type[BaseException], ...], map_error: ErrorMapper) -> None:
        if timeout_s <= 0:
            raise ValueError(f"{provider}: first-byte timeout must be > 0, got {timeout_s}")
        self.provider = provider
        self.kind = kind
        self.timeout_s = timeout_s
        self.errors = errors
        self.map_error = map_error
        self._expired_message = f"timed out: no {_FIRST_OUTPUT[kind]} within {timeout_s:.2f}s"

    def request(self, model: str) -> TimedRequest:
        """A request starting now."""
        return TimedRequest(self, model)

    def failed(self, exc: BaseException, model: str, **fields: Any) -> ProviderError:
        """`exc` (one of `errors`) as the provider's error, logged once."""
        error = self.map_error(exc)
        log.warning("provider.request_failed", provider=self.provider, kind=self.kind,
                    model=model, status=error.status, retryable=error.retryable,
                    error=str(error), **fields)
        return error

    def expired(self, model: str) -> ProviderError:
        """The deadline passed without a first byte: logged, retryable."""
        log.warning("provider.first_byte_timeout", provider=self.provider, kind=self.kind,
                    model=model, timeout_s=self.timeout_s)
        return ProviderError(self.provider, self._expired_message, retryable=True)


class TimedRequest:
    """One request of a provider: when it started, when its first byte came."""

    __slots__ = ("_deadline", "first_byte_s", "model", "started")

    def __init__(self, deadline: FirstByteDeadline, model: str) -> None:
        self._deadline = deadline
        self.model = model
        self.started = time.monotonic()
        self.first_byte_s: float | None = None

    @asynccontextmanager
    async def first_byte(self) -> AsyncIterator[None]:
        """The wait for the first byte, bounded by the deadline. A missed deadline or an
        SDK error leaves the block as a logged ProviderError; leaving it normally stamps
        `first_byte_s`. Never yield to the caller inside the block."""
        deadline = self._deadline
        bound = asyncio.timeout(deadline.timeout_s)
        try:
            async with bound:
                yield
        except TimeoutError as exc:
            if not bound.expired():  # not ours: whatever raised it explains it
                raise
            raise deadline.expired(self.model) from exc
        except deadline.errors as exc:
            raise deadline.failed(exc, self.model) from exc
        self.first_byte_s = time.monotonic() - self.started

    def cut(self, exc: BaseException, **fields: Any) -> None:
        """The stream failed after output went out: the provider ends it with what came
        (it is billed anyway); this logs why."""
        deadline = self._deadline
        log.warning("provider.stream_cut", provider=deadline.provider, kind=deadline.kind,
                    model=self.model, error=str(deadline.map_error(exc)), **fields)

    def timing(self, produced: bool = True) -> Timing:
        """First byte (None when nothing was `produced`) and total, in seconds."""
        return Timing(first_byte_s=self.first_byte_s if produced else None,
                      total_s=time.monotonic() - self.started)
