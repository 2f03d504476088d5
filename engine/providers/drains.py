"""Requests nobody waits for any more, read on in the background until their bill is known.

A vendor bills what it generated, not what the caller heard: a reply cut by a barge-in, a
request the chain gave up on at its first-output timeout, a transcription the call no
longer needs. A chain never just drops such a request: it hands it to its `Drains`, which
read it on, within `deadline_s`, until the provider reports its usage (a reply's last
chunk carries it), and book that on the bill the request started on. A request that
reports nothing in time is booked as an estimate flagged `estimated`; one the vendor
refused with an HTTP error is not billed and books nothing.

How a request is read decides whether it can be read on:
- `PumpedStream`: a task reads the provider's stream into a queue, so cancelling the
  reader's caller (a barge-in cancels the reply task) never reaches the provider's HTTP
  stream, which goes on to its usage chunk. For agent replies: a few chunks a second.
- `DirectStream`: the caller reads the provider's stream itself, with no hop per chunk
  (synthesized audio, up to fifty chunks a second per call). Only the wait for the first
  chunk runs in a task, so a first-audio timeout leaves the request running; a caller
  cancelled mid-stream cuts it, and it is booked from what is known.
- `PendingCall`: a one-shot request (a transcription, a summary) in a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from engine.log import get_logger
from engine.providers.base import ProviderError, Usage
from engine.providers.booking import UsageSink

log = get_logger(__name__)

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)
T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class NoOutputInTime(TimeoutError):
    """The chain's deadline for a first output passed; the request itself runs on."""


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close a provider stream so its connection is released."""
    try:
        await stream.aclose()  # type: ignore[attr-defined]
    except Exception as exc:  # a provider's cleanup error must not mask the real outcome
        log.warning("provider stream close failed", error=str(exc))


class EventKinds(Protocol[E_contra]):
    """What a reader needs to know of a stream's events (a chain's `Streamed` request)."""

    done_type: type

    def has_output(self, event: E_contra) -> bool: ...


async def _first_output(events: AsyncIterator[E], kinds: EventKinds[E]) -> E | None:
    # Empty deltas or chunks are not output: a provider must produce something to serve.
    done_type = kinds.done_type
    async for event in events:
        if isinstance(event, done_type) or kinds.has_output(event):
            return event
    return None


class _End:
    """The pump's last queue item: the stream ended, or failed with `error`."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


class PumpedStream(Generic[E]):
    """A provider stream read by a task of its own into a queue (see the module doc)."""

    def __init__(self, stream: AsyncIterator[E], kinds: EventKinds[E]) -> None:
        self._stream = stream
        self._kinds = kinds
        self._queue: asyncio.Queue[E | _End] = asyncio.Queue()
        self._last: E | None = None
        self._error: Exception | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        done_type = self._kinds.done_type
        try:
            async for event in self._stream:
                self._queue.put_nowait(event)
                if isinstance(event, done_type):
                    self._last = event
                    break
        except Exception as exc:  # handed to whoever reads: the consumer, or the drain
            self._error = exc
        finally:
            self._queue.put_nowait(_End(self._error))
            await close_stream(self._stream)

    @property
    def rest(self) -> AsyncIterator[E]:
        return self

    def __aiter__(self) -> AsyncIterator[E]:
        return self

    async def __anext__(self) -> E:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # whoever asks again hears the same end
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def first(self, timeout_s: float) -> E | None:
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await _first_output(self, self._kinds)
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the stream raised
                raise NoOutputInTime() from None
            raise

    async def read_on(self) -> E | None:
        """Wait for the pump to finish: the stream's last event, None if it had none."""
        await self._task
        if self._error is not None:
            raise self._error
        return self._last

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class DirectStream(Generic[E]):
    """A provider stream its consumer reads itself (see the module doc)."""

    def __init__(self, stream: AsyncIterator[E], kinds: EventKinds[E]) -> None:
        self.rest = stream
        self._kinds = kinds
        self._first: asyncio.Task[E | None] | None = None

    async def first(self, timeout_s: float) -> E | None:
        first = _first_output(self.rest, self._kinds)
        task = self._first = asyncio.get_running_loop().create_task(first)
        # Not asyncio.timeout: cancelling the wait must not cancel the request.
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
        if not done:
            raise NoOutputInTime()
        self._first = None
        return task.result()

    async def read_on(self) -> E | None:
        """Read on to the stream's last event (None if it ends without one)."""
        done_type = self._kinds.done_type
        if self._first is not None:
            event = await self._first
            self._first = None
            if event is None or isinstance(event, done_type):
                return event
        async for event in self.rest:
            if isinstance(event, done_type):
                return event
        return None

    async def close(self) -> None:
        if self._first is not None:
            self._first.cancel()
            await asyncio.gather(self._first, return_exceptions=True)
        await close_stream(self.rest)


class PendingCall(Generic[T]):
    """A one-shot request in a task of its own: a timeout stops the wait, not the call."""

    def __init__(self, call: Awaitable[T]) -> None:
        self._task = asyncio.ensure_future(call)

    async def result(self, timeout_s: float) -> T:
        done, _ = await asyncio.wait((self._task,), timeout=timeout_s)
        if not done:
            raise NoOutputInTime()
        return self._task.result()

    async def read_on(self) -> T:
        return await self._task

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Readable(Protocol[R_co]):
    """An abandoned request as the drains read it."""

    async def read_on(self) -> R_co | None: ...

    async def close(self) -> None: ...


class Drains:
    """One chain's abandoned requests, each read on for at most `deadline_s`, then booked."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def adopt(self, request: Readable[R], usage_of: Callable[[R], Usage | None],
              estimate: Callable[[], Usage], book: UsageSink, provider: str, *,
              read_on: bool = True) -> None:
        """Read `request` on in the background and book what it cost (never raises).
        Without `read_on` (a provider on our own CPU: nothing to learn, work to save) it
        is closed at once and its estimate booked."""
        task = asyncio.get_running_loop().create_task(
            self._settle(request, usage_of, estimate, book, provider, read_on))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, request: Readable[R], usage_of: Callable[[R], Usage | None],
                      estimate: Callable[[], Usage], book: UsageSink, provider: str,
                      read_on: bool) -> None:
        if not read_on:
            await request.close()
            _book(book, estimate())
            return
        try:
            usage, refused = await self._outcome(request, usage_of, provider)
        except asyncio.CancelledError:  # the engine stops: book the estimate, then stop
            _book(book, estimate())
            raise
        finally:
            await request.close()
        if refused:
            return
        if usage is None:
            # ASSUMPTION (the vendors do not document it): a request that was sent but
            # never answered in time, or was cut before it reported its usage, may have
            # been processed and billed (OpenAI bills the tokens it processed, ElevenLabs
            # the characters of a request it accepted). Book an estimate, flagged, so the
            # bill errs on the safe side.
            usage = estimate()
            log.warning("provider.abandoned_request_estimated", provider=provider,
                        kind=usage.kind, model=usage.model)
        _book(book, usage)

    async def _outcome(self, request: Readable[R], usage_of: Callable[[R], Usage | None],
                       provider: str) -> tuple[Usage | None, bool]:
        """What the request reported within the deadline: (its usage or None, refused?)."""
        try:
            async with asyncio.timeout(self.deadline_s):
                outcome = await request.read_on()
        except ProviderError as exc:
            if exc.status is not None:
                # Refused with an HTTP error (401, 429, 5xx): vendors bill nothing for it.
                log.info("provider.abandoned_request_refused", provider=provider,
                         status=exc.status)
                return None, True
            log.info("provider.abandoned_request_failed", provider=provider, error=str(exc))
            return None, False
        except Exception as exc:  # the deadline, or a failure outside the Protocol
            log.info("provider.abandoned_request_failed", provider=provider,
                     error=str(exc) or type(exc).__name__)
            return None, False
        return (usage_of(outcome) if outcome is not None else None), False

    async def wait(self, timeout: float | None = None) -> None:
        """Until every abandoned request is booked (at most `timeout` seconds)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def aclose(self) -> None:
        """Give the requests their deadline, then book estimates for the rest."""
        await self.wait(self.deadline_s + 1.0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _book(book: UsageSink, usage: Usage) -> None:
    """Book on the call's bill; a bug behind the sink must not kill a background drain."""
    try:
        book(usage)
    except Exception:
        log.exception("provider.booking_failed", provider=usage.provider, kind=usage.kind)
