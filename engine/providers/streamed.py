"""Streamed requests through a chain (a reply, a synthesis): the first provider with
output in time serves the whole stream (`stream_first_served`); the walk, breakers and
booking are `engine.providers.chain`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Generic, TypeVar

from engine.providers.base import ProviderError, Usage
from engine.providers.booking import UsageSink, current_sink
from engine.providers.breaker import CircuitBreaker
from engine.providers.chain import Chain, Member, UsageNames, Walk, usage_of
from engine.providers.drains import DirectStream, NoOutputInTime, PumpedStream

P = TypeVar("P", bound=Member)
E = TypeVar("E")


class Streamed(Generic[P, E]):
    """One streamed request (a reply, a synthesis): what `stream_first_served` asks of it."""

    done_type: type  # the event that ends a stream (it carries the usage)
    nothing_error: str  # the failure when a stream ends before any output
    keeps_output: bool = False  # estimates need the events that went out
    # Read in a task of its own, so a cut can be read on (`engine.providers.drains`).
    pumped: bool = False

    def open(self, provider: P) -> AsyncIterator[E]:
        raise NotImplementedError

    async def ready(self) -> None:
        """Until the first-output clock may start (the request has its input)."""

    def has_output(self, event: E) -> bool:
        raise NotImplementedError

    def check_first(self, provider: P, first: E) -> None:
        """Raise to refuse a first event that cannot serve (it counts as a failure)."""

    def estimate(self, provider: P, names: UsageNames, emitted: list[E]) -> Usage:
        """What the request bills when its provider never reports (flagged estimated)."""
        raise NotImplementedError

    def truncated(self, usage: Usage, first_byte_s: float, total_s: float) -> E:
        """The end of a stream its provider cut, with the estimated `usage`."""
        raise NotImplementedError


class _Attempt(Generic[P, E]):
    """One provider's try at a streamed request, and its bill: `settled` once its usage is
    booked (or there is none); else `finish` hands the request to the chain's drains."""

    def __init__(self, chain: Chain[P], request: Streamed[P, E], provider: P,
                 sink: UsageSink) -> None:
        self.chain = chain
        self.request = request
        self.provider = provider
        self.sink = sink
        self.started = time.monotonic()
        self.first_byte_s = 0.0
        opened = request.open(provider)
        self.reader: PumpedStream[E] | DirectStream[E] = (
            PumpedStream(opened, request) if request.pumped else DirectStream(opened, request))
        self.emitted: list[E] = []  # what went out, when the request keeps it
        self.settled = False

    def book(self, usage: Usage) -> None:
        self.settled = True
        self.chain.book(self.sink, self.provider, usage)

    async def first(self, walk: Walk[P], breaker: CircuitBreaker, timeout_s: float) -> E | None:
        """The first output, or None when this provider failed (recorded in `walk`)."""
        provider, request = self.provider, self.request
        try:
            await request.ready()
            first = await self.reader.first(timeout_s)
        except asyncio.CancelledError:
            breaker.release()
            raise
        except NoOutputInTime as exc:  # the request runs on: the drains read it on
            walk.failed(provider, breaker, exc, timeout_s)
            return None
        except Exception as exc:  # refused or failed before any output: nothing billed
            self.settled = True
            walk.failed(provider, breaker, exc, timeout_s)
            return None
        if first is None:
            self.settled = True
            walk.failed(provider, breaker, ProviderError(provider.name, request.nothing_error),
                        timeout_s)
            return None
        if isinstance(first, request.done_type):
            self.book(usage_of(first))
        try:
            request.check_first(provider, first)
        except Exception as exc:
            walk.failed(provider, breaker, exc, timeout_s)
            return None
        walk.served(provider, breaker)
        self.first_byte_s = time.monotonic() - self.started
        if request.keeps_output:
            self.emitted.append(first)
        return first

    def cut(self, walk: Walk[P], breaker: CircuitBreaker, error: Exception) -> E:
        """The provider failed mid-stream: the stream's end, with its usage estimated."""
        walk.failed_mid_stream(self.provider, breaker, error)
        usage = self.request.estimate(self.provider, self.chain.usage_names(self.provider),
                                      self.emitted)
        self.book(usage)
        return self.request.truncated(usage, self.first_byte_s, time.monotonic() - self.started)

    async def finish(self) -> None:
        if self.settled:
            await self.reader.close()
            return
        chain = self.chain
        chain.abandon(self.sink, self.provider, self.reader, usage_of,
                      partial(self.request.estimate, self.provider,
                              chain.usage_names(self.provider), self.emitted))


async def stream_first_served(chain: Chain[P], timeout_s: float,
                               request: Streamed[P, E]) -> AsyncGenerator[E, None]:
    """A streamed request through the chain: the first provider with output in time serves.

    Its failure after that ends the stream with `request.truncated(...)`, never a switch.
    """
    sink = current_sink()
    walk = Walk(chain)
    done_type = request.done_type  # locals: checked on every chunk passed through
    keeps_output = request.keeps_output
    for provider, breaker in walk:
        attempt = _Attempt(chain, request, provider, sink)
        try:
            first = await attempt.first(walk, breaker, timeout_s)
            if first is None:
                continue
            yield first
            if isinstance(first, done_type):
                return
            try:
                async for event in attempt.reader.rest:
                    if isinstance(event, done_type):
                        attempt.book(usage_of(event))
                        yield event
                        return
                    if keeps_output:
                        attempt.emitted.append(event)
                    yield event
                error: Exception = ProviderError(
                    provider.name, f"stream ended without {done_type.__name__}")
            except Exception as exc:
                error = exc
            yield attempt.cut(walk, breaker, error)
            return
        finally:
            await attempt.finish()
    raise walk.exhausted()
