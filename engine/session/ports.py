"""The ports of a call: what the session needs from the outside, declared here so the
session owns no wire.

- `AudioOut`: the caller's ear (audio and marks, played in order; `clear` drops the rest).
  The telephony edge implements it (`telephony/outbound.py`, `OutboundPlayer`).
- `EndStream`: closes the media stream normally.
- `CallControl`: actions on the live call at the telephony provider (say-then-reconnect,
  transfer, hang up), answered with a `ControlResult`. The edge implements it
  (`telephony/rest.py`, `TwilioCallControl`).
- `SessionObserver`: receives what a session does (events, usage, turns); the engine's
  operations hub implements it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.providers.base import Usage
from engine.session.records import ToolCallRecord, TurnRecord
from engine.session.states import CallState

if TYPE_CHECKING:
    from engine.session.call_session import CallSession


class AudioOut(Protocol):
    """Mu-law audio and marks for the caller, played in the order queued. The edge echoes
    each mark (`CallSession.on_mark`) once the audio queued before it has played."""

    @property
    def closed(self) -> bool: ...

    @property
    def frames_sent(self) -> int: ...

    def enqueue_audio(self, ulaw: bytes) -> None: ...

    def enqueue_mark(self, name: str, pad: bool = True) -> None:
        """A mark after the audio queued so far: padded to a whole frame, or with
        `pad=False` after the last whole frame (no silence inserted mid-speech)."""

    async def clear(self) -> list[str]:
        """Drop what is not played yet; returns the names of the marks never sent."""

    def is_playing(self, now: float) -> bool:
        """True while audio is queued or still playing (`now`: the event loop's clock)."""

    def close(self) -> None: ...


# Closes the media stream normally; the argument says why (logged by the edge).
EndStream = Callable[[str], Coroutine[Any, Any, None]]


@dataclass(slots=True)
class ControlResult:
    """What became of one call-control request."""

    ok: bool
    already_ended: bool = False  # the call no longer exists (the caller hung up first)
    status: int | None = None  # the provider's HTTP status, when it answered
    code: int | None = None  # the provider's error code
    error: str | None = None


class CallControl(Protocol):
    """Actions on a live call at the telephony provider."""

    async def say_then_reconnect(self, call_sid: str, text: str, from_number: str,
                                 to_number: str) -> ControlResult:
        """The provider speaks `text` with its own voice, then opens a new media stream
        for the same call (the caller's numbers travel with it)."""

    async def transfer(self, call_sid: str, number: str, announcement: str) -> ControlResult:
        """Say `announcement` (unless empty), then dial `number`."""

    async def hang_up(self, call_sid: str) -> ControlResult: ...


class SessionObserver(Protocol):
    """Receives what a session does (events, usage, ledger); the engine implements it."""

    def call_created(self, session: CallSession) -> None: ...

    def stream_started(self, session: CallSession) -> None: ...

    def stream_ended(self, session: CallSession, stream_sid: str, duration_s: float) -> None:
        """A media stream of the call is over (the call goes on after a <Say>, or ends)."""

    def state_changed(self, session: CallSession, old: CallState, new: CallState,
                      reason: str) -> None: ...

    def turn_completed(self, session: CallSession, record: TurnRecord) -> None: ...

    def tool_called(self, session: CallSession, record: ToolCallRecord) -> None:
        """A tool call of the agent is over (published, recorded; see records.py)."""

    def alert(self, session: CallSession, kind: str, severity: str, message: str,
              data: dict[str, Any]) -> None: ...

    def transcript(self, session: CallSession, speaker: str, text: str, final: bool,
                   **extra: Any) -> None: ...

    def usage(self, session: CallSession | None, usage: Usage) -> None:
        """Book what the call spent (`CallSession.book`: the only way in)."""

    def call_ended(self, session: CallSession, reason: str) -> None: ...


class Conversation(Protocol):
    """What the session drives: the turn-taking pipeline of one call."""

    def on_audio(self, ulaw: bytes) -> None: ...  # one inbound frame (hot path)

    def on_dtmf(self, digit: str) -> None: ...

    async def start(self) -> None: ...  # greet the caller

    def set_listening(self, active: bool) -> None: ...  # off while transferring

    def take_over(self) -> None: ...  # a supervisor speaks: stop answering, keep transcribing

    def hand_back(self) -> None: ...

    def interrupt(self, reason: str) -> None: ...  # cut the agent off now

    def cost_cap_reached(self) -> None: ...  # close the call at the next safe point

    async def aclose(self) -> None: ...
