"""The moves allowed between the states of one call.

The states themselves are `CallState`, defined with the event schema
(`engine/bus/events.py`) so that the session and the events share one type.
"""

from __future__ import annotations

from engine.bus.events import CallState

__all__ = ["ALLOWED_TRANSITIONS", "CallState", "InvalidTransition"]

ALLOWED_TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.CONNECTED: frozenset({CallState.AI, CallState.ENDED}),
    CallState.AI: frozenset({CallState.HUMAN_TAKEOVER, CallState.TRANSFERRING, CallState.ENDED}),
    CallState.HUMAN_TAKEOVER: frozenset({CallState.AI, CallState.TRANSFERRING, CallState.ENDED}),
    # A transfer whose REST update failed goes back to the state it came from.
    CallState.TRANSFERRING: frozenset({CallState.AI, CallState.HUMAN_TAKEOVER, CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


class InvalidTransition(Exception):
    def __init__(self, old: CallState, new: CallState) -> None:
        super().__init__(f"cannot go from {old.value} to {new.value}")
        self.old = old
        self.new = new
