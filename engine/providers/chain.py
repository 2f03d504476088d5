"""A chain of providers of one kind, tried in order: the mechanics behind the fallbacks.

Each provider has a circuit breaker; one request walks the chain (`Walk`), skipping open
breakers, recording failures and reporting every switch as a `FallbackEvent`. A request
goes through a chain in one of two ways: one-shot (`first_success`: transcribe,
summarize) or streamed (`stream_first_served` in streamed.py: a reply, a synthesis), where
the first provider with output in time serves the whole stream.

Both routines book what every request they start costs, on the bill bound where it
started (`engine.providers.booking`; nothing else books provider usage). A request the
caller stopped waiting for (a barge-in, a timeout that fell back) goes to the chain's
`Drains`, read on until its usage is known (`engine.providers.drains`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any, Generic, Protocol, TypeVar

from engine.log import get_logger
from engine.providers.base import ProviderError, ProviderHealth, ProviderKind, Usage
from engine.providers.booking import UsageSink, current_sink
from engine.providers.breaker import CircuitBreaker
from engine.providers.drains import (
    Drains,
    NoOutputInTime,
    PendingCall,
    Readable,
)

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
    runs_locally: bool

    @property
    def model(self) -> str: ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


P = TypeVar("P", bound=Member)
T = TypeVar("T")
E = TypeVar("E")
R = TypeVar("R")

usage_of: Callable[[Any], Usage] = attrgetter("usage")  # of a stream's last event

# How a provider's usage names it and its model, e.g. ("openai", "gpt-4o-mini").
UsageNames = tuple[str, str]


def _describe(exc: BaseException, timeout_s: float | None) -> str:
    if isinstance(exc, TimeoutError) and timeout_s is not None:
        return f"no output within {timeout_s:g}s"
    return str(exc) or type(exc).__name__


class Chain(Generic[P]):
    """Providers, their breakers and the event callback shared by one chain."""

    def __init__(self, kind: ProviderKind, providers: Sequence[P], breaker_failures: int,
                 breaker_reset_s: float, on_event: FallbackEventHandler | None,
                 clock: Callable[[], float], drain_timeout_s: float) -> None:
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
        self.drains = Drains(drain_timeout_s)
        self._usage_names: dict[str, UsageNames] = {}

    def usage_names(self, provider: P) -> UsageNames:
        """How `provider`'s reports name it and its model, so estimates are priced alike."""
        return self._usage_names.get(provider.name) or (provider.name, provider.model)

    def book(self, sink: UsageSink, provider: P, usage: Usage) -> None:
        """Book one request's usage on the bill it started on."""
        if not usage.cached:  # a cache hit is named by whoever holds the cache
            self._usage_names[provider.name] = (usage.provider, usage.model)
        sink(usage)

    def abandon(self, sink: UsageSink, provider: P, request: Readable[R],
                usage_of: Callable[[R], Usage | None], estimate: Callable[[], Usage]) -> None:
        """A request nobody waits for any more goes to the drains, to be read on for its
        usage; one on our own CPU (`runs_locally`) is closed and booked as estimated."""
        self.drains.adopt(request, usage_of, estimate, partial(self.book, sink, provider),
                          provider.name, read_on=not provider.runs_locally)

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
        await self.drains.aclose()  # abandoned requests are booked before their clients go
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


class OneShot(Generic[P, T]):
    """One one-shot request (a transcription, a summary): what `first_success` asks of it."""

    def call(self, provider: P) -> Awaitable[T]:
        raise NotImplementedError

    def usage_of(self, result: T) -> Usage:
        raise NotImplementedError

    def estimate(self, provider: P, names: UsageNames) -> Usage:
        """What the request bills when its provider never reports (flagged estimated)."""
        raise NotImplementedError


async def first_success(chain: Chain[P], timeout_s: float, request: OneShot[P, T]) -> T:
    """A one-shot request through the chain: the first provider that answers in time."""
    sink = current_sink()
    walk = Walk(chain)
    for provider, breaker in walk:
        call = PendingCall(request.call(provider))
        settled = False  # booked, or nothing to book; else the drains take it
        try:
            try:
                result = await call.result(timeout_s)
            except asyncio.CancelledError:
                breaker.release()
                raise
            except NoOutputInTime as exc:
                walk.failed(provider, breaker, exc, timeout_s)
                continue
            except Exception as exc:
                settled = True
                walk.failed(provider, breaker, exc, timeout_s)
                continue
            settled = True
            walk.served(provider, breaker)
            chain.book(sink, provider, request.usage_of(result))
            return result
        finally:
            if not settled:
                chain.abandon(sink, provider, call, request.usage_of,
                              partial(request.estimate, provider, chain.usage_names(provider)))
    raise walk.exhausted()
