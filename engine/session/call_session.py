"""One call: its state machine, its outbound voice, and Twilio control of it.

The session is the unit of failure containment: everything one call does runs in tasks
it owns, and an exception there ends this call only. The telephony edge feeds it parsed
messages; the conversation (turn-taking, agent) plugs in through `Conversation`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import AudioChunk, ProviderError, SynthesisDone, TextToSpeech, Usage
from engine.session.records import TurnRecord
from engine.session.states import ALLOWED_TRANSITIONS, CallState, InvalidTransition
from engine.telephony import twiml
from engine.telephony.outbound import OutboundPlayer
from engine.telephony.rest import RestResult, TwilioCallControl

log = get_logger(__name__)


class Conversation(Protocol):
    """What the session drives: the turn-taking pipeline of one call."""

    def on_audio(self, ulaw: bytes) -> None: ...  # one inbound frame (hot path)

    def on_dtmf(self, digit: str) -> None: ...

    async def start(self) -> None: ...  # greet the caller

    def set_listening(self, active: bool) -> None: ...  # off while transferring

    def take_over(self) -> None: ...  # a supervisor speaks: stop answering, keep transcribing

    def hand_back(self) -> None: ...

    def interrupt(self, reason: str) -> None: ...  # cut the agent off now

    async def aclose(self) -> None: ...


class SessionObserver(Protocol):
    """Receives what a session does (events, usage, ledger); the engine implements it."""

    def call_created(self, session: CallSession) -> None: ...

    def stream_started(self, session: CallSession) -> None: ...

    def state_changed(self, session: CallSession, old: CallState, new: CallState,
                      reason: str) -> None: ...

    def turn_completed(self, session: CallSession, record: TurnRecord) -> None: ...

    def alert(self, session: CallSession, kind: str, severity: str, message: str,
              data: dict[str, Any]) -> None: ...

    def transcript(self, session: CallSession, speaker: str, text: str, final: bool,
                   **extra: Any) -> None: ...

    def usage(self, session: CallSession | None, usage: Usage) -> None: ...

    def call_ended(self, session: CallSession, reason: str) -> None: ...


@dataclass(slots=True)
class StreamStats:
    frames_in: int = 0
    bytes_in: int = 0
    marks_in: int = 0
    dtmf_in: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class SpeechResult:
    """What became of one spoken line."""

    mark: str
    heard: bool  # its mark came back before a clear: the caller heard all of it
    audio_s: float
    provider: str


class CallSession:
    def __init__(self, call_sid: str, config: Config, tts: TextToSpeech,
                 control: TwilioCallControl, observer: SessionObserver | None = None,
                 from_number: str = "", to_number: str = "") -> None:
        self.call_sid = call_sid
        self.config = config
        self.tts = tts
        self.control = control
        self.observer = observer
        self.from_number = from_number
        self.to_number = to_number
        self.state = CallState.CONNECTED
        self.created_at = time.time()
        self.stream_started_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.hangup_reason: str | None = None  # set while the engine hangs up
        # Twilio is speaking a <Say> for us and will open a new stream for this call.
        self.awaiting_stream = False
        self.stream_sid: str | None = None
        self.twilio_status = "in-progress"
        self.escalated = False  # handed to a human (transfer succeeded)
        self.stats = StreamStats()
        self.player: OutboundPlayer | None = None
        self.conversation: Conversation | None = None
        self.log = log.bind(call_sid=call_sid)
        self._close_stream: Callable[[int, str], Coroutine[Any, Any, None]] | None = None
        self._mark_ids = itertools.count(1)
        self._mark_waiters: dict[str, asyncio.Future[bool]] = {}
        self._cleared_marks: set[str] = set()
        self._heard_marks: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cap_timer: asyncio.TimerHandle | None = None
        self._speak_lock = asyncio.Lock()
        self._ended = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    def duration_s(self, now: float | None = None) -> float:
        start = self.stream_started_at or self.created_at
        end = self.ended_at or (now if now is not None else time.time())
        return max(0.0, end - start)

    def transition(self, new: CallState, reason: str) -> None:
        old = self.state
        if new is old:
            return
        if new not in ALLOWED_TRANSITIONS[old]:
            raise InvalidTransition(old, new)
        self.state = new
        self.log.info("call.state", old=old.value, new=new.value, reason=reason)
        if self.observer is not None:
            self.observer.state_changed(self, old, new, reason)

    def attach_stream(self, stream_sid: str, player: OutboundPlayer,
                      close_stream: Callable[[int, str], Coroutine[Any, Any, None]]) -> None:
        """The media stream started: the call is live and the agent takes it."""
        self.stream_sid = stream_sid
        self.player = player
        self._close_stream = close_stream
        self.stream_started_at = time.time()
        player.on_closed = None
        self.transition(CallState.AI, "stream started")
        if self.observer is not None:
            self.observer.stream_started(self)
        loop = asyncio.get_running_loop()
        self._cap_timer = loop.call_later(self.config.engine.max_call_seconds,
                                          self._duration_cap_reached)
        if self.conversation is not None:
            self.spawn(self.conversation.start(), "conversation.start")

    def reattach_stream(self, stream_sid: str, player: OutboundPlayer,
                        close_stream: Callable[[int, str], Coroutine[Any, Any, None]]) -> None:
        """The new stream Twilio opened after a <Say>: the conversation carries on."""
        self.stream_sid = stream_sid
        self.player = player
        self._close_stream = close_stream
        self.awaiting_stream = False
        self._cleared_marks.clear()
        self.log.info("call.stream_reattached", stream_sid=stream_sid)

    def stream_lost_while_awaiting(self) -> None:
        """Twilio ended the old stream to play our <Say>; give the new one a while."""
        self.player = None
        for fut in self._mark_waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._mark_waiters.clear()
        loop = asyncio.get_running_loop()
        loop.call_later(60.0, self._reconnect_deadline)

    def _reconnect_deadline(self) -> None:
        if self.awaiting_stream and not self.ended:
            self.log.warning("call.no_new_stream", detail="Twilio did not reconnect after <Say>")
            self.spawn(self.end("media stream did not come back"), "end")

    async def say_via_twilio(self, text: str) -> RestResult:
        """Have Twilio speak `text` itself (<Say>) when no text-to-speech works, then
        reconnect the media stream. The caller hears it; the call goes on."""
        cfg = self.config
        document = twiml.say_then_reconnect(
            text, cfg.media_stream_url(), cfg.public_base_url() + "/twilio/stream-status",
            {"from": self.from_number, "to": self.to_number, "callSid": self.call_sid})
        self.awaiting_stream = True
        result = await self.control.update_twiml(self.call_sid, document)
        if not result.ok or result.already_ended:
            self.awaiting_stream = False
            self.log.warning("call.say_fallback_failed", error=result.error)
        else:
            self.log.warning("call.say_fallback", chars=len(text))
            if self.observer is not None:
                self.observer.transcript(self, "agent", text, True,
                                         line_id=f"{self.call_sid}-say{time.monotonic_ns()}")
        return result

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run work owned by this call; its failure is logged and contained here."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.call_sid}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("call.task_failed", task=task.get_name(), error=repr(exc),
                           exc_info=exc)

    async def wait_ended(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            return False
        return True

    async def end(self, reason: str) -> None:
        """End the call (idempotent): stop the conversation, release everything."""
        if self.state is CallState.ENDED:
            return
        self.end_reason = reason
        self.ended_at = time.time()
        self.transition(CallState.ENDED, reason)
        if self._cap_timer is not None:
            self._cap_timer.cancel()
        for fut in self._mark_waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._mark_waiters.clear()
        if self.player is not None:
            self.player.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.conversation is not None:
            try:
                await self.conversation.aclose()
            except Exception:
                self.log.exception("call.conversation_close_failed")
        self._ended.set()
        self.log.info("call.ended", reason=reason, duration_s=round(self.duration_s(), 2),
                      frames_in=self.stats.frames_in,
                      frames_out=self.player.frames_sent if self.player else 0,
                      bad_messages=self.stats.bad_messages or None)
        if self.observer is not None:
            self.observer.call_ended(self, reason)

    # -- inbound (from the telephony edge) ---------------------------------------------

    def on_audio(self, ulaw: bytes) -> None:
        self.stats.frames_in += 1
        self.stats.bytes_in += len(ulaw)
        conversation = self.conversation
        if conversation is not None:
            conversation.on_audio(ulaw)

    def on_dtmf(self, digit: str) -> None:
        self.stats.dtmf_in += 1
        self.log.info("call.dtmf", digit=digit)
        if self.conversation is not None:
            self.conversation.on_dtmf(digit)

    def on_mark(self, name: str) -> None:
        self.stats.marks_in += 1
        # A mark echoed after we sent `clear` was flushed, not played.
        heard = name not in self._cleared_marks
        self._cleared_marks.discard(name)
        if heard:
            self._heard_marks.add(name)
        fut = self._mark_waiters.pop(name, None)
        if fut is not None and not fut.done():
            fut.set_result(heard)

    def mark_heard(self, name: str) -> bool:
        """True once Twilio reported the audio up to mark `name` as played."""
        return name in self._heard_marks

    def count_bad_message(self, reason: str) -> int:
        bad = self.stats.bad_messages
        bad[reason] = bad.get(reason, 0) + 1
        return sum(bad.values())

    # -- outbound voice -----------------------------------------------------------------

    def new_mark(self, prefix: str = "u") -> str:
        name = f"{prefix}{next(self._mark_ids)}"
        self._mark_waiters[name] = asyncio.get_running_loop().create_future()
        return name

    async def wait_mark(self, name: str, timeout: float | None = None) -> bool:
        """True once the caller has heard everything up to mark `name`."""
        fut = self._mark_waiters.get(name)
        if fut is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            return False

    def _live_player(self) -> OutboundPlayer:
        player = self.player
        if player is None or player.closed:
            raise ConnectionError("no live media stream")
        return player

    def queue_audio(self, ulaw: bytes) -> None:
        """Queue mu-law audio for the caller (sent paced, in whole frames)."""
        self._live_player().enqueue_audio(ulaw)

    def queue_mark(self, prefix: str = "u") -> str:
        """Queue a mark after the audio queued so far; returns its name."""
        player = self._live_player()
        mark = self.new_mark(prefix)
        player.enqueue_mark(mark)
        return mark

    def queue_progress_mark(self, prefix: str = "p") -> str:
        """A mark inside a sentence (no padding, nobody waits on it): how far playback got
        when the caller cut the agent off."""
        name = f"{prefix}{next(self._mark_ids)}"
        self._live_player().enqueue_mark(name, pad=False)
        return name

    async def play_ulaw(self, ulaw: bytes, prefix: str = "u") -> str:
        """Queue audio followed by a mark; returns the mark name."""
        self.queue_audio(ulaw)
        return self.queue_mark(prefix)

    async def speak(self, text: str, speaker: str = "agent",
                    tts: TextToSpeech | None = None) -> SpeechResult:
        """Synthesize `text`, stream it to the caller, wait until it was heard or cut."""
        tts = tts or self.tts
        mark, audio_bytes = await self._synthesize_into_queue(text, tts)
        if self.observer is not None:
            self.observer.transcript(self, speaker, text, True,
                                     line_id=f"{self.call_sid}-{mark}")
        heard = await self.wait_mark(mark, timeout=audio_bytes / 8000 + 10.0)
        return SpeechResult(mark, heard, audio_bytes / 8000, tts.name)

    async def _synthesize_into_queue(self, text: str, tts: TextToSpeech) -> tuple[str, int]:
        self._live_player()
        async with self._speak_lock:
            audio_bytes = 0
            try:
                async for event in tts.synthesize(text):
                    if isinstance(event, AudioChunk):
                        audio_bytes += len(event.ulaw)
                        self.queue_audio(event.ulaw)
                    elif isinstance(event, SynthesisDone) and self.observer is not None:
                        self.observer.usage(self, event.usage)
            except ProviderError as exc:
                self.log.warning("call.tts_failed", provider=tts.name, error=str(exc))
                raise
            return self.queue_mark(), audio_bytes

    async def interrupt(self) -> None:
        """Barge-in: cut playback now (drop queued audio, `clear` Twilio's buffer)."""
        player = self.player
        if player is None:
            return
        pending = [name for name, fut in self._mark_waiters.items() if not fut.done()]
        dropped = set(await player.clear())
        for name in pending:
            if name in dropped:  # never sent: certainly not heard
                fut = self._mark_waiters.pop(name)
                fut.set_result(False)
            else:  # sent: Twilio echoes it after the clear
                self._cleared_marks.add(name)

    def is_playing(self) -> bool:
        player = self.player
        return player is not None and player.is_playing(asyncio.get_running_loop().time())

    # -- control (REST) -----------------------------------------------------------------

    async def transfer(self, number: str, reason: str, announcement: str | None = None
                       ) -> RestResult:
        """Hand the call to a human number: new TwiML <Say> + <Dial> on the live call."""
        previous = self.state
        self.transition(CallState.TRANSFERRING, reason)
        if self.conversation is not None:
            self.conversation.set_listening(False)
        cfg = self.config.transfer
        document = twiml.transfer(cfg.announcement if announcement is None else announcement,
                                  number, cfg.caller_id)
        result = await self.control.update_twiml(self.call_sid, document)
        if result.already_ended:
            await self.end("caller hung up before transfer")
        elif not result.ok:
            self.log.warning("call.transfer_failed", number=number, error=result.error)
            if self.state is CallState.TRANSFERRING:
                self.transition(previous, f"transfer failed: {result.error}")
                if previous is CallState.AI and self.conversation is not None:
                    self.conversation.set_listening(True)
        else:
            self.escalated = True
            self.log.info("call.transferred", number=number, reason=reason)
        return result

    # -- supervisor ---------------------------------------------------------------------

    def take_over(self) -> None:
        """A supervisor takes the call: the agent stops speaking and answering."""
        self.transition(CallState.HUMAN_TAKEOVER, "supervisor took over")
        if self.conversation is not None:
            self.conversation.take_over()

    def hand_back(self) -> None:
        self.transition(CallState.AI, "supervisor handed back")
        if self.conversation is not None:
            self.conversation.hand_back()

    async def say_now(self, text: str, speaker: str = "supervisor") -> None:
        """Synthesize and queue one line now (cutting the agent off if it speaks);
        returns once the audio is on its way, not when it has been heard."""
        if self.is_playing():
            if self.conversation is not None:
                self.conversation.interrupt("supervisor line")  # also stops its reply
            await self.interrupt()  # cleared before the new line is queued
        mark, _ = await self._synthesize_into_queue(text, self.tts)
        if self.observer is not None:
            self.observer.transcript(self, speaker, text, True,
                                     line_id=f"{self.call_sid}-{mark}")

    async def hang_up(self, reason: str) -> RestResult:
        """End the call at Twilio (status=completed), then close our side."""
        # Twilio ends the stream as it completes the call: that end is ours, not the caller's.
        self.hangup_reason = reason
        result = await self.control.hang_up(self.call_sid)
        if not result.ok:
            # Closing the stream also ends the call: no TwiML follows </Connect>.
            self.log.warning("call.hangup_rest_failed", error=result.error)
        await self.close_stream(1000, "call ended by engine")
        await self.end(reason)
        return result

    async def close_stream(self, code: int, message: str) -> None:
        if self._close_stream is not None:
            try:
                await self._close_stream(code, message)
            except Exception:
                self.log.exception("call.stream_close_failed")

    def _duration_cap_reached(self) -> None:
        if self.state in (CallState.AI, CallState.HUMAN_TAKEOVER):
            self.log.info("call.duration_cap", max_s=self.config.engine.max_call_seconds)
            self.spawn(self._say_goodbye_and_hang_up(), "duration_cap")

    async def _say_goodbye_and_hang_up(self) -> None:
        if self.conversation is not None:
            self.conversation.set_listening(False)
        await self.interrupt()
        try:
            await asyncio.wait_for(self.speak(self.config.engine.goodbye, speaker="system"),
                                   timeout=20.0)
        except (ProviderError, ConnectionError, TimeoutError) as exc:
            self.log.warning("call.goodbye_failed", error=str(exc))
        await self.hang_up("duration cap reached")
