"""What marking a dead engine's call `lost` means: a `CallEnded` event with reason
"lost" (consoles show the call ended instead of live forever), and the call's history
row ended with that reason when this engine's history holds it (a shared record does;
an engine's own SQLite holds only its own calls, and the dead engine closes its open
rows itself when it starts again).

The history row keeps the cost recorded so far; it ends at the dead engine's last
heartbeat, the last moment the call is known to have been up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.bus.events import CallEnded, EventBase
from engine.fleet.watcher import LostCall
from engine.log import get_logger
from engine.record.history import CallHistory

log = get_logger(__name__)

LOST_REASON = "lost"
_HISTORY_TIMEOUT_S = 5.0


class LostCallMarker:
    def __init__(self, publish: Callable[[EventBase], None],
                 history: CallHistory | None) -> None:
        self._publish = publish
        self._history = history

    async def __call__(self, call: LostCall) -> None:
        duration = max(0.0, call.last_seen - call.started_at) if call.started_at else 0.0
        self._publish(CallEnded(call_sid=call.call_sid, reason=LOST_REASON,
                                duration_s=round(duration, 3)))
        recorded = await self._end_in_history(call)
        log.warning("fleet.call_lost", call_sid=call.call_sid, engine=call.engine_id,
                    history=recorded)

    async def _end_in_history(self, call: LostCall) -> str:
        """"ended", "absent" (not in this history), "already_ended", "none" (no
        history) or "failed"."""
        history = self._history
        if history is None:
            return "none"
        try:
            async with asyncio.timeout(_HISTORY_TIMEOUT_S):
                stored = await history.get_call(call.call_sid)
                if stored is None:
                    return "absent"
                if stored.ended_at is not None:
                    return "already_ended"
                await history.call_ended(call.call_sid, LOST_REASON, stored.cost_usd or 0.0,
                                         escalated=stored.escalated,
                                         ended_at=call.last_seen)
        except Exception as exc:  # any backend's failure: the event is out regardless
            log.warning("fleet.lost_history_failed", call_sid=call.call_sid,
                        error=str(exc) or type(exc).__name__)
            return "failed"
        return "ended"
