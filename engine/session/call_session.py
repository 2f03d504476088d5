"""One call: its state machine, its media stream, and what acts on it (supervisor, the
duration cap, transfer, hang up).

Where a frame goes: `telephony/media_stream.py` parses each Media Streams message and
calls `CallSession.on_audio` (or `on_mark`, `on_dtmf`); the session counts the frame and
hands it to the call's conversation, whose `on_audio` is `session/turn_taking.py`'s.
Marks go to the session's `Voice` (`session/speaking.py`), which is also the way out:
everything said to the caller is queued there.

The session owns no wire. The edge attaches each media stream as an `AudioOut` port and
an `EndStream`, and the session acts on the live call through the `CallControl` port
(`session/ports.py`). It is the unit of failure containment: everything one call does
runs in tasks it owns, and an exception there ends this call only.

It is also the call's bill: every task it spawns carries the call's usage sink
(`engine.providers.booking`), so whatever a provider request costs is booked on this call
(`book`), even when the request finishes after the call has moved on or ended.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import ProviderError, TextToSpeech, Usage
from engine.providers.booking import bill_to, bind_sink
from engine.session.ports import (
    AudioOut,
    CallControl,
    ControlResult,
    Conversation,
    EndStream,
    SessionObserver,
)
from engine.session.records import StreamStats
from engine.session.states import ALLOWED_TRANSITIONS, CallState, InvalidTransition
from engine.session.voice import Voice

__all__ = ["CallSession", "Conversation", "SessionObserver", "StreamStats"]

log = get_logger(__name__)

# How long `end` waits for the call's cancelled tasks to finish their `finally` blocks
# (the cut reply records its turn there) before it reports the end.
END_GRACE_S = 2.0


def twilio_say_usage(text: str) -> Usage:
    """Twilio speaking `text` itself (<Say>: a transfer announcement, the last-resort
    voice): billed by Twilio per character."""
    return Usage(provider="twilio", kind="tts", model="say", characters=len(text))


class CallSession:
    def __init__(self, call_sid: str, config: Config, tts: TextToSpeech,
                 control: CallControl, observer: SessionObserver | None = None,
                 from_number: str = "", to_number: str = "") -> None:
        self.call_sid = call_sid
        self.config = config
        self.tts = tts  # the session's own voice (goodbye, supervisor lines)
        self.control = control
        self.observer = observer
        self.from_number = from_number
        self.to_number = to_number
        self.state = CallState.CONNECTED
        self.created_at = time.time()  # the webhook: Twilio answered, the phone bill starts
        self.stream_started_at: float | None = None  # the media stream now attached
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.hangup_reason: str | None = None  # set while the engine hangs up
        # Twilio is speaking a <Say> for us and will open a new stream for this call.
        self.awaiting_stream = False
        self.stream_sid: str | None = None
        self.twilio_status = "in-progress"
        self.escalated = False  # handed to a human (transfer succeeded)
        self.stats = StreamStats()
        self.log = log.bind(call_sid=call_sid)
        self.voice = Voice(self)
        self.conversation: Conversation | None = None
        self._end_stream: EndStream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cap_timer: asyncio.TimerHandle | None = None
        self._stream_timer: asyncio.TimerHandle | None = None
        self._ended = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    def duration_s(self, now: float | None = None) -> float:
        """Seconds since Twilio answered (the voice webhook): what the phone bill counts."""
        end = self.ended_at or (now if now is not None else time.time())
        return max(0.0, end - self.created_at)

    def stream_duration_s(self, now: float | None = None) -> float:
        """Seconds the media stream now attached has run (0 without one)."""
        if self.stream_started_at is None:
            return 0.0
        end = self.ended_at or (now if now is not None else time.time())
        return max(0.0, end - self.stream_started_at)

    def book(self, usage: Usage) -> None:
        """Put one usage on this call's bill (also after the call ended: a request read on
        in the background still costs money)."""
        if self.observer is not None:
            self.observer.usage(self, usage)

    def _enter_call(self) -> None:
        """Run in a task's context: its requests bill this call, its log lines name it."""
        bind_sink(self.book)
        structlog.contextvars.bind_contextvars(call_sid=self.call_sid)

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

    def answered(self) -> None:
        """Twilio answered the call (its webhook): the duration cap runs from now, and its
        media stream has `engine.start_timeout_s` to start."""
        self._start_cap_timer()
        self._stream_timer = asyncio.get_running_loop().call_later(
            self.config.engine.start_timeout_s, self._stream_deadline)

    def _start_cap_timer(self) -> None:
        if self._cap_timer is None:
            self._cap_timer = asyncio.get_running_loop().call_later(
                self.config.engine.max_call_seconds, self._duration_cap_reached)

    def _stream_deadline(self) -> None:
        # Ended here, not hung up: Twilio ends a call whose stream never connected itself,
        # and a REST hang-up could cut the call if another engine now serves it.
        if self.state is CallState.CONNECTED:
            self.log.warning("call.no_media_stream", waited_s=self.config.engine.start_timeout_s)
            self.spawn(self.end("no media stream"), "end")

    def attach_stream(self, stream_sid: str, audio_out: AudioOut,
                      end_stream: EndStream) -> None:
        """The media stream started: the call is live and the agent takes it."""
        self.stream_sid = stream_sid
        self.voice.attach(audio_out)
        self._end_stream = end_stream
        self.stream_started_at = time.time()
        self.transition(CallState.AI, "stream started")
        if self.observer is not None:
            self.observer.stream_started(self)
        self._start_cap_timer()
        if self.conversation is not None:
            self.spawn(self.conversation.start(), "conversation.start")

    def reattach_stream(self, stream_sid: str, audio_out: AudioOut,
                        end_stream: EndStream) -> None:
        """The new stream Twilio opened after a <Say>: the conversation carries on."""
        self.stream_sid = stream_sid
        self.voice.attach(audio_out)
        self._end_stream = end_stream
        self.stream_started_at = time.time()
        self.awaiting_stream = False
        self.log.info("call.stream_reattached", stream_sid=stream_sid)

    def stream_lost_while_awaiting(self) -> None:
        """Twilio ended the old stream to play our <Say>; give the new one a while."""
        self._stream_ended()
        self.voice.detach()
        loop = asyncio.get_running_loop()
        loop.call_later(60.0, self._reconnect_deadline)

    def _reconnect_deadline(self) -> None:
        if self.awaiting_stream and not self.ended:
            self.log.warning("call.no_new_stream", detail="Twilio did not reconnect after <Say>")
            self.spawn(self.end("media stream did not come back"), "end")

    def _stream_ended(self) -> None:
        """The attached media stream is over: Twilio bills its minutes on their own."""
        if self.stream_started_at is None or self.stream_sid is None:
            return
        duration = self.stream_duration_s()
        self.stream_started_at = None
        if self.observer is not None:
            self.observer.stream_ended(self, self.stream_sid, duration)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run work owned by this call (billed to it); its failure is logged and contained
        here."""
        context = contextvars.copy_context()
        context.run(self._enter_call)
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.call_sid}:{name}",
                                                      context=context)
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
        for timer in (self._cap_timer, self._stream_timer):
            if timer is not None:
                timer.cancel()
        self.voice.close()
        current = asyncio.current_task()
        cancelled = [task for task in self._tasks if task is not current]
        for task in cancelled:
            task.cancel()
        if self.conversation is not None:
            try:
                await self.conversation.aclose()
            except Exception:
                self.log.exception("call.conversation_close_failed")
        if cancelled:
            # Their `finally` blocks still report (the cut reply's turn): before the end.
            _, late = await asyncio.wait(cancelled, timeout=END_GRACE_S)
            if late:
                self.log.warning("call.tasks_still_running", tasks=len(late))
        self._stream_ended()
        self._ended.set()
        player = self.voice.player
        self.log.info("call.ended", reason=reason, duration_s=round(self.duration_s(), 2),
                      frames_in=self.stats.frames_in,
                      frames_out=player.frames_sent if player else 0,
                      bad_messages=self.stats.bad_messages or None)
        if self.observer is not None:
            self.observer.call_ended(self, reason)

    # -- inbound (from the telephony edge) ---------------------------------------------

    def on_audio(self, ulaw: bytes) -> None:
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(ulaw)
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
        self.voice.on_mark(name)

    def count_bad_message(self, reason: str) -> int:
        bad = self.stats.bad_messages
        bad[reason] = bad.get(reason, 0) + 1
        return sum(bad.values())

    # -- control of the live call --------------------------------------------------------

    async def say_via_twilio(self, text: str) -> ControlResult:
        """Have Twilio speak `text` itself (<Say>) when no text-to-speech works, then
        reconnect the media stream. The caller hears it; the call goes on."""
        self.awaiting_stream = True
        result = await self.control.say_then_reconnect(self.call_sid, text, self.from_number,
                                                       self.to_number)
        if not result.ok or result.already_ended:
            self.awaiting_stream = False
            self.log.warning("call.say_fallback_failed", error=result.error)
        else:
            self.log.warning("call.say_fallback", chars=len(text))
            self.book(twilio_say_usage(text))
            if self.observer is not None:
                self.observer.transcript(self, "agent", text, True,
                                         line_id=f"{self.call_sid}-say{time.monotonic_ns()}")
        return result

    async def transfer(self, number: str, reason: str, announcement: str | None = None
                       ) -> ControlResult:
        """Hand the call to a human number: an announcement, then a dial, on the live call."""
        previous = self.state
        self.transition(CallState.TRANSFERRING, reason)
        if self.conversation is not None:
            self.conversation.set_listening(False)
        if announcement is None:
            announcement = self.config.transfer.announcement
        result = await self.control.transfer(self.call_sid, number, announcement)
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
            if announcement:
                self.book(twilio_say_usage(announcement))
        return result

    async def hang_up(self, reason: str) -> ControlResult:
        """End the call at the provider, then close our side."""
        # Twilio ends the stream as it completes the call: that end is ours, not the caller's.
        self.hangup_reason = reason
        result = await self.control.hang_up(self.call_sid)
        if not result.ok:
            # Closing the stream also ends the call: no TwiML follows </Connect>.
            self.log.warning("call.hangup_rest_failed", error=result.error)
        await self._close_stream("call ended by engine")
        await self.end(reason)
        return result

    async def _close_stream(self, why: str) -> None:
        if self._end_stream is not None:
            try:
                await self._end_stream(why)
            except Exception:
                self.log.exception("call.stream_close_failed")

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
        voice = self.voice
        if voice.is_playing():
            if self.conversation is not None:
                self.conversation.interrupt("supervisor line")  # also stops its reply
            await voice.clear()  # cleared before the new line is queued
        with bill_to(self.book):  # runs in the supervisor's task, not one of the call's
            await voice.say(text, speaker)

    # -- the caps -----------------------------------------------------------------------

    def cost_cap_reached(self) -> None:
        """The ledger says this call has cost its cap (told as the booking lands): the
        conversation closes it at its next safe point."""
        if not self.ended and self.conversation is not None:
            self.conversation.cost_cap_reached()

    def _duration_cap_reached(self) -> None:
        if self.state not in (CallState.CONNECTED, CallState.AI, CallState.HUMAN_TAKEOVER):
            return
        self.log.info("call.duration_cap", max_s=self.config.engine.max_call_seconds)
        reason = "duration cap reached"
        self.spawn(self.end(reason) if self.state is CallState.CONNECTED  # no one to hear it
                   else self.say_goodbye_and_hang_up(self.config.engine.goodbye, reason),
                   "duration_cap")

    async def say_goodbye_and_hang_up(self, line: str, reason: str) -> None:
        """Stop the conversation, cut what plays, say `line` in the session's voice, then
        hang up (also when the line cannot be said)."""
        if self.conversation is not None:
            self.conversation.set_listening(False)
        await self.voice.clear()
        try:
            await asyncio.wait_for(self.voice.speak(line, speaker="system"), timeout=20.0)
        except (ProviderError, ConnectionError, TimeoutError) as exc:
            self.log.warning("call.goodbye_failed", error=str(exc))
        await self.hang_up(reason)
