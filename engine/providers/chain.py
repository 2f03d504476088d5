"""A chain of providers of one kind, tried in order: the mechanics behind the fallbacks.

Each provider has a circuit breaker; one request walks the chain (`Walk`), skipping open
breakers, recording failures and reporting every switch as a `FallbackEvent`. A request
goes through a chain in one of two ways: one-shot (`first_success`: transcribe,
summarize) or streamed (`stream_first_served`: a reply, a synthesis), where the first
provider with output in time serves the whole stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from engine.log import get_logger
from engine.providers.base import ProviderError, ProviderHealth, ProviderKind
from engine.providers.breaker import CircuitBreaker

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """A provider failed during a request; `to_provider` took over (None: nobody did)."""

    kind: ProviderKind
    from_provider: str
    to_provider: str | None
    error: str
    at: float  # wall-clock epoch seconds, comparable across processes
    timed_out: bool = False
    # The failure came after output had reached the caller, so no switch was made.
    mid_stream: bool = False


FallbackEventHandler = Callable[[FallbackEvent], None]


class AllProvidersFailed(ProviderError):
    """Every provider of a chain failed (or was skipped by its open breaker)."""

    def __init__(self, chain_name: str, errors: Sequence[tuple[str, str]]) -> None:
        detail = "; ".join(f"{name}: {error}" for name, error in errors) or "no providers"
        super().__init__(chain_name, f"all providers failed: {detail}", retryable=True)
        self.errors = list(errors)


class Member(Protocol):
    """What a chain needs of every member, whatever its kind."""

    name: str

    @property
    def model(self) -> str: ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


P = TypeVar("P", bound=Member)
T = TypeVar("T")
E = TypeVar("E")


def _describe(exc: BaseException, timeout_s: float | None) -> str:
    if isinstance(exc, TimeoutError) and timeout_s is not None:
        return f"no output within {timeout_s:g}s"
    return str(exc) or type(exc).__name__


async def _close_stream(stream: AsyncGenerator[Any, None]) -> None:
    """Close an abandoned provider stream so its connection is released."""
    try:
        await stream.aclose()
    except Exception as exc:  # a provider's cleanup error must not mask the real outcome
        log.warning("provider stream close failed", error=str(exc))


class Chain(Generic[P]):
    """Providers, their breakers and the event callback shared by one chain."""

    def __init__(self, kind: ProviderKind, providers: Sequence[P], breaker_failures: int,
                 breaker_reset_s: float, on_event: FallbackEventHandler | None,
                 clock: Callable[[], float]) -> None:
        if not providers:
            raise ValueError(f"a {kind} fallback chain needs at least one provider")
        self.kind = kind
        self.providers = list(providers)
        self.breakers = [CircuitBreaker(breaker_failures, breaker_reset_s, clock)
                         for _ in self.providers]
        self.on_event = on_event
        self.name = f"fallback({','.join(p.name for p in self.providers)})"
        self.active_provider: str | None = None
        self.current = self.providers[0]  # the one that served last (the first until then)

    def emit(self, event: FallbackEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # the observer's bug must not break the call
            log.exception("fallback event handler failed", kind=self.kind)

    def health(self) -> list[ProviderHealth]:
        return [b.health(p.name, self.kind) for p, b in zip(self.providers, self.breakers,
                                                            strict=True)]

    async def aclose(self) -> None:
        results = await asyncio.gather(*(p.aclose() for p in self.providers),
                                       return_exceptions=True)
        for provider, result in zip(self.providers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("provider close failed", provider=provider.name,
                            error=str(result))


class Walk(Generic[P]):
    """One request's walk down a chain: yields the providers to try, collects failures."""

    def __init__(self, chain: Chain[P]) -> None:
        self._chain = chain
        self.errors: list[tuple[str, str]] = []
        self._pending: tuple[str, str, bool] | None = None  # failed name, error, timed out

    def __iter__(self) -> Iterator[tuple[P, CircuitBreaker]]:
        for provider, breaker in zip(self._chain.providers, self._chain.breakers,
                                     strict=True):
            if not breaker.allow():
                self.errors.append((provider.name, "circuit open"))
                continue
            self._report_switch(to_provider=provider.name)
            yield provider, breaker

    def failed(self, provider: P, breaker: CircuitBreaker, exc: Exception,
               timeout_s: float) -> None:
        timed_out = isinstance(exc, TimeoutError)
        error = _describe(exc, timeout_s)
        breaker.record_failure(error)
        self.errors.append((provider.name, error))
        self._pending = (provider.name, error, timed_out)
        if isinstance(exc, ProviderError) or timed_out:
            log.warning("provider failed, trying next", kind=self._chain.kind,
                        provider=provider.name, error=error, timed_out=timed_out,
                        status=exc.status if isinstance(exc, ProviderError) else None)
        else:  # not the Protocol's error type: a bug or an SDK surprise, keep the trace
            log.warning("provider raised unexpected error, trying next",
                        kind=self._chain.kind, provider=provider.name, error=error,
                        exc_info=exc)

    def served(self, provider: P, breaker: CircuitBreaker) -> None:
        breaker.record_success()
        self._chain.active_provider = provider.name
        self._chain.current = provider

    def exhausted(self) -> AllProvidersFailed:
        self._report_switch(to_provider=None)
        failure = AllProvidersFailed(self._chain.name, self.errors)
        log.error("all providers failed", kind=self._chain.kind, errors=self.errors)
        return failure

    def _report_switch(self, to_provider: str | None) -> None:
        if self._pending is None:
            return
        name, error, timed_out = self._pending
        self._pending = None
        self._chain.emit(FallbackEvent(kind=self._chain.kind, from_provider=name,
                                       to_provider=to_provider, error=error,
                                       at=time.time(), timed_out=timed_out))

    def failed_mid_stream(self, provider: P, breaker: CircuitBreaker,
                          exc: Exception) -> None:
        error = _describe(exc, None)
        breaker.record_failure(error)
        log.warning("provider failed mid-stream; ending the stream with what was produced",
                    kind=self._chain.kind, provider=provider.name, error=error,
                    exc_info=None if isinstance(exc, ProviderError) else exc)
        self._chain.emit(FallbackEvent(kind=self._chain.kind, from_provider=provider.name,
                                       to_provider=None, error=error, at=time.time(),
                                       mid_stream=True))


async def first_success(chain: Chain[P], timeout_s: float,
                         call: Callable[[P], Awaitable[T]]) -> T:
    """A one-shot request through the chain: the first provider that answers in time."""
    walk = Walk(chain)
    for provider, breaker in walk:
        try:
            async with asyncio.timeout(timeout_s):
                result = await call(provider)
        except asyncio.CancelledError:
            breaker.release()
            raise
        except Exception as exc:
            walk.failed(provider, breaker, exc, timeout_s)
            continue
        walk.served(provider, breaker)
        return result
    raise walk.exhausted()


class Streamed(Generic[P, E]):
    """One streamed request (a reply, a synthesis): what `stream_first_served` asks of it."""

    done_type: type  # the event that ends a stream
    nothing_error: str  # the failure when a stream ends before any output
    keeps_output: bool = False  # `truncated` needs the events that went out

    def open(self, provider: P) -> AsyncGenerator[E, None]:
        raise NotImplementedError

    def has_output(self, event: E) -> bool:
        raise NotImplementedError

    def check_first(self, provider: P, first: E) -> None:
        """Raise to refuse a first event that cannot serve (it counts as a failure)."""

    def truncated(self, provider: P, emitted: list[E], first_byte_s: float,
                  total_s: float) -> E:
        raise NotImplementedError


async def _first_output(stream: AsyncGenerator[E, None], request: Streamed[Any, E]) -> E:
    # Empty deltas or chunks are not output: a provider must produce something to serve.
    while True:
        event = await anext(stream)
        if isinstance(event, request.done_type) or request.has_output(event):
            return event


async def stream_first_served(chain: Chain[P], timeout_s: float,
                               request: Streamed[P, E]) -> AsyncGenerator[E, None]:
    """A streamed request through the chain: the first provider with output in time serves.

    Its failure after that ends the stream with `request.truncated(...)`, never a switch.
    """
    walk = Walk(chain)
    done_type = request.done_type  # a local: checked on every chunk passed through
    for provider, breaker in walk:
        started = time.monotonic()
        stream: AsyncGenerator[E, None] | None = None
        try:
            try:
                stream = request.open(provider)
                async with asyncio.timeout(timeout_s):
                    first = await _first_output(stream, request)
                request.check_first(provider, first)
            except asyncio.CancelledError:
                breaker.release()
                raise
            except StopAsyncIteration:
                walk.failed(provider, breaker,
                            ProviderError(provider.name, request.nothing_error), timeout_s)
                continue
            except Exception as exc:
                walk.failed(provider, breaker, exc, timeout_s)
                continue
            walk.served(provider, breaker)
            first_byte_s = time.monotonic() - started
            yield first
            if isinstance(first, done_type):
                return
            emitted = [first] if request.keeps_output else None
            try:
                async for event in stream:
                    if emitted is not None:
                        emitted.append(event)
                    yield event
                    if isinstance(event, done_type):
                        return
                error: Exception = ProviderError(
                    provider.name, f"stream ended without {done_type.__name__}")
            except Exception as exc:
                error = exc
            walk.failed_mid_stream(provider, breaker, error)
            yield request.truncated(provider, emitted or [], first_byte_s,
                                    time.monotonic() - started)
            return
        finally:
            if stream is not None:
                await _close_stream(stream)
    raise walk.exhausted()
