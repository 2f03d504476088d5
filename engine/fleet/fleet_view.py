"""The calls other engines of the fleet own, as this engine's supervisor API shows them.

Every engine of a fleet already writes its events to one Redis stream (`bus.backend =
"redis"`). Each engine reads that stream once more and keeps views of the calls other
engines own (the same bounded `CallViews` its own calls have), so a console attached to
any engine gets a snapshot of every live call of the fleet, each with its owner's engine
id, then the live events of all engines through the usual subscription.

Why the stream rather than snapshot keys each engine would write to Redis: the stream is
already paid for (no extra writes, nothing that grows with calls x transcript lines
every second), and a snapshot and the events after its cursor then come from one ordered
log: before a snapshot is built, `caught_up(cursor)` waits until these views have read
the stream up to the console's cursor, so no remote event falls between the two. The
cost: one more reader of the stream per engine (what one attached console costs).

At start the reader replays the stream from shortly before the oldest call the live
engines own (their call hashes in Redis, engine/fleet/membership.py), not the whole
retained stream. An event of a call it never saw start (trimmed, or a gap) still opens a
view, with what the event says. A dead engine's calls are closed by the `lost` CallEnded
its watcher publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from engine.bus.event_bus import EventBus
from engine.bus.events import (
    Alert,
    BusGap,
    CallEnded,
    CallStarted,
    Event,
    StateChanged,
    ToolCalled,
    TranscriptLine,
    TurnLatency,
    UsageCost,
)
from engine.bus.redis_replies import StreamId, format_id, parse_stream_id
from engine.log import get_logger
from engine.supervision.api_schema import CallSnapshot, TranscriptEntry
from engine.supervision.views import CallViews
from engine.tasks import stop_task

log = get_logger(__name__)

# How far before the oldest live call's start the replay begins (clocks of other
# machines, a CallStarted published a little after the call's creation).
_REPLAY_MARGIN_S = 60.0
_CATCH_UP_POLL_S = 0.005


class RemoteCalls:
    """Views of the fleet's calls owned by other engines, fed by the shared stream."""

    def __init__(self, bus: EventBus, engine_id: str, views: CallViews,
                 replay_from: Callable[[], Awaitable[float | None]],
                 catch_up_timeout_s: float = 1.0) -> None:
        """`replay_from`: the unix time the replay starts at (None: from now on)."""
        self.bus = bus
        self.engine_id = engine_id
        self.views = views
        self._replay_from = replay_from
        self._catch_up_timeout_s = catch_up_timeout_s
        self.position: StreamId | None = None  # the last stream id read
        self.events_read = 0
        self.gaps = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        since = await self._replay_from()
        if since is None:
            after = await self.bus.latest_id()
        else:
            after = f"{max(0, int((since - _REPLAY_MARGIN_S) * 1000))}-0"
        self.position = parse_stream_id(after)
        subscription = self.bus.subscribe(after=after)
        self._task = asyncio.get_running_loop().create_task(self._read(subscription),
                                                            name="fleet-view")
        log.info("fleet.view_started", after=after)

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _read(self, subscription: object) -> None:
        async for event_id, event in subscription:  # type: ignore[attr-defined]
            with contextlib.suppress(ValueError):
                position = parse_stream_id(event_id)
                if self.position is None or position > self.position:
                    self.position = position
            try:
                self.apply(event)
            except Exception:  # one odd event must not stop the fleet's view
                log.exception("fleet.view_event_failed", event_type=event.type,
                              call_sid=event.call_sid or None)

    async def caught_up(self, cursor: str) -> bool:
        """Wait until the views have read the stream up to `cursor` (a console's snapshot
        cursor); False when they could not within the timeout (the snapshot then shows
        them as they are, and later events fill them in)."""
        try:
            target = parse_stream_id(cursor)
        except ValueError:
            return True
        deadline = time.monotonic() + self._catch_up_timeout_s
        while self.position is None or self.position < target:
            if time.monotonic() >= deadline:
                log.warning("fleet.view_behind", cursor=cursor,
                            position=format_id(self.position) if self.position else None)
                return False
            await asyncio.sleep(_CATCH_UP_POLL_S)
        return True

    def owner_of(self, call_sid: str) -> str | None:
        view = self.views.get(call_sid)
        return view.engine_id if view is not None else None

    def call_snapshots(self) -> list[CallSnapshot]:
        return self.views.call_snapshots()

    # -- events ------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Update the view of the event's call when another engine owns it."""
        self.events_read += 1
        if isinstance(event, BusGap):
            self.gaps += 1
            log.warning("fleet.view_gap", reason=event.reason, count=event.count)
            return
        sid = event.call_sid
        if not sid:
            return
        view = self.views.get(sid)
        if view is None:
            # Ours (its own views show it), or the end of a call never seen.
            if event.engine_id == self.engine_id or isinstance(event, CallEnded):
                return
            self.views.open(sid, "", "", event.ts or time.time())
            view = self.views.get(sid)
            assert view is not None
            view.engine_id = event.engine_id
        if isinstance(event, CallStarted):
            view.from_number, view.to_number = event.from_number, event.to_number
            view.started_at = event.ts or view.started_at
            view.engine_id = event.engine_id
            view.cost_cap_usd = event.cost_cap_usd
        elif isinstance(event, StateChanged):
            if view.end_reason is None:
                view.state = event.new
        elif isinstance(event, TranscriptLine):
            self.views.put_line(sid, TranscriptEntry(
                line_id=event.line_id, speaker=event.speaker, text=event.text,
                final=event.final, interrupted=event.interrupted, ts=event.ts))
        elif isinstance(event, TurnLatency):
            view.turns = max(view.turns, event.turn)
            view.v2v.append(event.voice_to_voice_s)
        elif isinstance(event, UsageCost):
            view.cost_usd = event.call_cost_usd
            view.unpriced = view.unpriced or event.unpriced
        elif isinstance(event, Alert):
            if event.kind not in view.alerts:
                view.alerts.append(event.kind)
        elif isinstance(event, ToolCalled):
            self.views.put_tool_call(event)
        elif isinstance(event, CallEnded):
            if event.cost_usd:
                view.cost_usd = event.cost_usd
            self.views.close(sid, event.ts or time.time(), event.reason)
