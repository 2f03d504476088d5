"""The states of one call and the moves allowed between them."""

from __future__ import annotations

from enum import StrEnum


class CallState(StrEnum):
    CONNECTED = "connected"  # webhook answered, media stream not started yet
    AI = "ai"  # the agent listens and answers
    HUMAN_TAKEOVER = "human_takeover"  # a supervisor speaks; the agent is silent
    TRANSFERRING = "transferring"  # being handed to a human number
    ENDED = "ended"


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
