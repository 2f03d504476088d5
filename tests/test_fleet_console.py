"""A call the fleet marked lost (its engine died) shows as ended in the console, with a
notice, instead of live forever."""

from __future__ import annotations

from console.model import ConsoleModel
from engine.bus.events import CallEnded, CallStarted, CallState, EventStamper
from engine.fleet.lost import LOST_REASON


def test_a_lost_call_is_shown_ended_with_a_notice() -> None:
    dead, watcher = EventStamper("engine-dead"), EventStamper("engine-watcher")
    model = ConsoleModel(clock=lambda: 1000.0)
    sid = "CA" + "7" * 32
    model.apply_event(dead.stamp(CallStarted(call_sid=sid, from_number="+15550100001")))
    model.take_changes()
    assert model.live_count == 1
    # Published by the engine that noticed the death, not the one that owned the call.
    model.apply_event(watcher.stamp(CallEnded(call_sid=sid, reason=LOST_REASON,
                                              duration_s=12.0)))
    call = model.calls[sid]
    assert call.state == CallState.ENDED and call.end_reason == LOST_REASON
    assert model.live_count == 0
    notices = model.take_changes().notices
    assert [(n.call_sid, n.kind) for n in notices] == [(sid, "call_lost")]
