"""In-process event bus: a bounded ring buffer with one cursor per subscriber.

Ids are "<epoch>:<n>" for n = 1, 2, 3, ... (FROM_OLDEST = "0"); the epoch is random per
bus, so a cursor kept across an engine restart is recognized as another stream's (a
"stream_reset" gap) instead of silently skipping the new stream's first events. Event n
lives in slot n % maxlen until event n + maxlen overwrites it. Publishing writes one slot
and sets an asyncio.Event: O(1), never awaits, never waits for subscribers. A subscriber
that falls more than maxlen events behind gets a BusGap (reason "overrun", exact count)
and goes on from the oldest event still retained. Use it from the event loop's thread
only.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncGenerator

from engine.bus.event_bus import BusClosedError, BusHealth
from engine.bus.events import BusGap, Event, EventBase
from engine.log import get_logger

log = get_logger(__name__)


class MemoryEventBus:
    def __init__(self, maxlen: int = 20_000) -> None:
        if maxlen < 1:
            raise ValueError(f"memory bus maxlen must be >= 1, got {maxlen}")
        self._maxlen = maxlen
        self.epoch = secrets.token_hex(4)
        self._ring: list[Event | None] = [None] * maxlen
        self._last = 0  # id of the newest event; 0 = none yet
        self._closed = False
        # Shared wake-up: set on publish, cleared by a subscriber right before it waits.
        # Safe with many subscribers: set() resolves every waiter at once, and a
        # subscriber always re-checks the cursor before waiting again.
        self._wakeup = asyncio.Event()

    @property
    def maxlen(self) -> int:
        return self._maxlen

    async def publish(self, event: Event) -> str:
        return self.publish_nowait(event)

    def publish_nowait(self, event: Event) -> str:
        """publish() for synchronous callers (same semantics)."""
        if self._closed:
            raise BusClosedError("memory event bus is closed")
        if not isinstance(event, EventBase):
            raise TypeError(f"expected an event, got {type(event).__name__}")
        if isinstance(event, BusGap):
            raise ValueError("BusGap is produced by subscriptions, it cannot be published")
        n = self._last + 1
        self._ring[n % self._maxlen] = event
        self._last = n
        if not self._wakeup.is_set():
            self._wakeup.set()
        return f"{self.epoch}:{n}"

    async def latest_id(self) -> str:
        return f"{self.epoch}:{self._last}" if self._last else "0"

    def _id(self, n: int) -> str:
        return f"{self.epoch}:{n}"

    def subscribe(self, after: str | None = None) -> AsyncGenerator[tuple[str, Event], None]:
        # The start is fixed here, not at the first iteration, so events published
        # between subscribe() and the first __anext__ are not lost.
        if after is None:
            return self._iterate(self._last, stale_cursor=None)
        epoch, _, number = after.rpartition(":")
        if not number.isdigit() or len(number) > 18 or (epoch and not epoch.isalnum()):
            raise ValueError(f"invalid memory-bus cursor {after!r}")
        cursor = int(number)
        if after != "0" and epoch != self.epoch:
            # A cursor from another bus (the engine restarted): start over, say so.
            log.info("bus.stale_cursor", cursor=after, latest=self._last)
            return self._iterate(0, stale_cursor=after)
        if cursor > self._last:
            # A cursor from an earlier bus (the engine restarted): start over, say so.
            log.info("bus.stale_cursor", cursor=after, latest=self._last)
            return self._iterate(0, stale_cursor=after)
        return self._iterate(cursor, stale_cursor=None)

    async def _iterate(self, cursor: int,
                       stale_cursor: str | None) -> AsyncGenerator[tuple[str, Event], None]:
        if stale_cursor is not None:
            yield "0", BusGap(missed_after=stale_cursor, reason="stream_reset")
        while not self._closed:
            if cursor >= self._last:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._last - self._maxlen + 1
            if cursor + 1 < oldest:
                missed = oldest - 1 - cursor
                log.warning("bus.subscriber_overrun", missed=missed, cursor=cursor)
                yield self._id(oldest - 1), BusGap(missed_after=str(cursor),
                                              missed_until=str(oldest), count=missed,
                                              reason="overrun")
                cursor = oldest - 1
                continue
            # No await between the check above and this read: slot `cursor` is current.
            cursor += 1
            event = self._ring[cursor % self._maxlen]
            assert event is not None
            yield self._id(cursor), event

    def health(self) -> BusHealth:
        return BusHealth(backend="memory", reachable=True)

    async def check(self) -> BusHealth:
        return self.health()

    async def aclose(self) -> None:
        self._closed = True
        self._wakeup.set()  # wake waiting subscribers so they see the closed flag
