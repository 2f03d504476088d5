"""Outbound audio to Twilio: whole 20 ms mu-law frames, paced to real time with a lead.

The last stop of the agent's voice: `session/speaking.py` queues synthesized audio and
marks into an `OutboundPlayer` (the session's `AudioOut` port), and the `Pacer` sends
them over the Media Streams WebSocket. Twilio echoes the marks back, which arrive through
`telephony/media_stream.py` at `CallSession.on_mark`.

One `Pacer` task per process ticks every 20 ms and tops up every playing stream so that
Twilio holds `lead` seconds of audio ahead of playback: one timer wake-up serves hundreds
of calls, instead of a sleeping task per call. A stream whose socket cannot keep up
(the transport's write buffer grows) is skipped for that tick, so one slow caller never
delays the others.

Marks ride in the same queue, after the audio they follow; Twilio echoes a mark when the
audio before it has played, which is how the session learns what the caller heard.

Ticks keep one fixed 20 ms phase (a late tick skips whole ticks) and players are pumped
with the tick's scheduled time, not the wake-up time: a stream's frame boundaries then sit
on the tick grid, so each tick sends exactly one frame per stream. With wake-up times,
a stream whose frame boundary fell near the wake-up jitter flipped between sending 0 and
2 frames per tick (0/40 ms gaps at the caller: 20 ms of jitter).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.audio.codec import ULAW_SILENCE
from engine.audio.frames import FRAME_BYTES, FRAME_S
from engine.log import get_logger
from engine.telephony.messages import OutboundEncoder

log = get_logger(__name__)

# Skip a stream for a tick while this much is waiting in its socket buffer.
MAX_WRITE_BUFFER = 64 * 1024
_COMPACT_AT = 32 * 1024


class OutboundPlayer:
    """Audio and marks queued for one Media Stream; sent by the Pacer."""

    __slots__ = (
        "__weakref__", "_audio", "_closed", "_enqueued", "_marks", "_pacer", "_pos", "_send",
        "_transport", "audio_at", "backpressure_skips", "call_sid", "encoder", "frames_sent",
        "marks_sent", "play_until",
    )

    def __init__(self, call_sid: str, stream_sid: str,
                 send: Callable[[str], Awaitable[None]],
                 transport: asyncio.BaseTransport | None, pacer: Pacer) -> None:
        self.call_sid = call_sid
        self.encoder = OutboundEncoder(stream_sid)
        self._send = send
        self._transport = transport
        self._pacer = pacer
        self._audio = bytearray()
        self._pos = 0  # bytes of _audio already sent
        self._enqueued = 0  # total bytes ever enqueued (mark positions refer to it)
        self._marks: deque[tuple[int, str]] = deque()
        self._closed = False
        # Monotonic time at which Twilio finishes playing everything sent so far.
        self.play_until = 0.0
        self.frames_sent = 0
        self.marks_sent = 0
        self.backpressure_skips = 0
        self.audio_at = 0.0  # monotonic time audio was last queued (a reply in progress)
        pacer.players.add(self)

    # -- producer side (the call session) --------------------------------------------

    def enqueue_audio(self, ulaw: bytes) -> None:
        if self._closed or not ulaw:
            return
        self._audio += ulaw
        self._enqueued += len(ulaw)
        self.audio_at = time.monotonic()
        self._pacer.wake(self)

    def enqueue_mark(self, name: str, pad: bool = True) -> None:
        """Queue a mark after the audio queued so far, padded to a whole frame; or, with
        `pad=False` (progress marks inside a sentence), after the last whole frame, so
        no silence is inserted mid-speech."""
        if self._closed:
            return
        if pad:
            self._pad_to_frame()
            position = self._enqueued
        else:
            position = self._enqueued - (len(self._audio) - self._pos) % FRAME_BYTES
        self._marks.append((position, name))
        self._pacer.wake(self)

    def _pad_to_frame(self) -> None:
        partial = (len(self._audio) - self._pos) % FRAME_BYTES
        if partial:
            pad = FRAME_BYTES - partial
            self._audio += bytes((ULAW_SILENCE,)) * pad
            self._enqueued += pad

    def drop_queued(self) -> list[str]:
        """Forget unsent audio and marks (barge-in). Returns the dropped mark names."""
        dropped = [name for _, name in self._marks]
        self._marks.clear()
        self._enqueued -= len(self._audio) - self._pos
        del self._audio[:]
        self._pos = 0
        return dropped

    async def clear(self) -> list[str]:
        """Drop unsent audio and tell Twilio to empty its buffer (`clear`)."""
        dropped = self.drop_queued()
        self.play_until = 0.0
        if not self._closed:
            try:
                await self._send(self.encoder.clear())
            except (ConnectionError, RuntimeError) as exc:
                self._close(str(exc))
        return dropped

    @property
    def queued_bytes(self) -> int:
        return len(self._audio) - self._pos

    def is_playing(self, now: float) -> bool:
        """True while audio is queued here or still playing at Twilio."""
        return bool(self.queued_bytes or self._marks) or now < self.play_until

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._close("closed")

    def _close(self, why: str) -> None:
        if not self._closed:
            self._closed = True
            self.drop_queued()

    # -- consumer side (the pacer) ------------------------------------------------------

    async def pump(self, now: float, lead_s: float) -> bool:
        """Send what is due. Returns False when nothing is left to send."""
        if self._closed:
            return False
        transport = self._transport
        if transport is not None:
            if transport.is_closing():
                self._close("transport closing")
                return False
            if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:  # type: ignore[attr-defined]
                self.backpressure_skips += 1
                return True
        if now > self.play_until:
            self.play_until = now  # Twilio's buffer ran dry: playback restarts now
        # Half a frame of slack: frame boundaries sit on the tick grid, and float sums of
        # 20 ms must not tip a boundary into an extra frame (lead rounds to whole frames).
        limit = now + lead_s - FRAME_S / 2
        audio = self._audio
        try:
            while True:
                sent_total = self._enqueued - (len(audio) - self._pos)
                marks = self._marks
                if marks and marks[0][0] <= sent_total:
                    await self._send(self.encoder.mark(marks.popleft()[1]))
                    self.marks_sent += 1
                    continue
                if self.play_until >= limit or len(audio) - self._pos < FRAME_BYTES:
                    break
                pos = self._pos
                frame = bytes(audio[pos:pos + FRAME_BYTES])
                self._pos = pos + FRAME_BYTES
                await self._send(self.encoder.media(frame))
                self.frames_sent += 1
                self.play_until += FRAME_S
        except (ConnectionError, RuntimeError) as exc:
            self._close(str(exc) or type(exc).__name__)
            return False
        if self._pos >= _COMPACT_AT:
            del audio[:self._pos]
            self._pos = 0
        return bool(self._marks) or len(audio) - self._pos >= FRAME_BYTES


class Pacer:
    """One 20 ms ticker for every stream in the process."""

    def __init__(self, lead_s: float = 0.08) -> None:
        self.lead_s = lead_s
        self._active: set[OutboundPlayer] = set()
        self.players: weakref.WeakSet[OutboundPlayer] = weakref.WeakSet()  # every stream
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.late_ticks = 0
        self.ticks = 0
        # Awaited after each tick's sends with the tick's time, when every playing stream
        # holds its full lead: the safe moment for a pause (`collector.FullCollections`).
        self.after_tick: Callable[[float], Awaitable[None]] | None = None

    def create_player(self, call_sid: str, stream_sid: str, ws: web.WebSocketResponse,
                      transport: asyncio.BaseTransport | None) -> OutboundPlayer:
        return OutboundPlayer(call_sid, stream_sid, ws.send_str, transport, self)

    def wake(self, player: OutboundPlayer) -> None:
        if player not in self._active:
            self._active.add(player)
            self._wakeup.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pacer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def pump_all(self, tick_at: float, lead_s: float) -> None:
        """Top every playing stream up to `lead_s` ahead of `tick_at` (a tick's work; with
        a longer lead, audio sent ahead of a planned pause)."""
        done: list[OutboundPlayer] = []
        for player in tuple(self._active):
            try:
                if not await player.pump(tick_at, lead_s):
                    done.append(player)
            except Exception:  # one stream's bug must not stop the others' audio
                log.exception("pacer.pump_failed", call_sid=player.call_sid)
                player.close()
                done.append(player)
        for player in done:
            # A player with a partial frame left waits for more audio or a mark.
            self._active.discard(player)

    @property
    def asleep(self) -> bool:
        """No stream has anything to send: no tick runs."""
        return not self._active

    def short_streams(self, tick_at: float, ahead_s: float, recent_s: float = 0.3) -> int:
        """Streams in the middle of a reply (audio queued in the last `recent_s`) that hold
        less than `ahead_s` at Twilio: a pause now could run them dry."""
        now = time.monotonic()
        return sum(1 for p in self.players if not p.closed and now - p.audio_at < recent_s
                   and p.play_until - tick_at < ahead_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            if not self._active:
                self._wakeup.clear()
                await self._wakeup.wait()
                next_tick = loop.time()
            tick_at = next_tick  # the scheduled time: see the module docstring
            self.ticks += 1
            await self.pump_all(tick_at, self.lead_s)
            if self.after_tick is not None:
                await self.after_tick(tick_at)
            next_tick += FRAME_S
            delay = next_tick - loop.time()
            if delay < 0:
                self.late_ticks += 1
                # Skip the ticks missed entirely (the next one refills the lead), but keep
                # the phase: the tick runs now, pumping with the last grid time passed.
                next_tick += (-delay // FRAME_S) * FRAME_S
                delay = 0
            await asyncio.sleep(delay)
