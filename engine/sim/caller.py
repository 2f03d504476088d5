"""A simulated caller that does what a person on a phone does, with real audio.

It follows a scenario: waits for the greeting, says scripted lines — politely after the
agent has finished, or over it for a barge-in —, presses DTMF digits, pauses, hangs up.
Its lines are spoken by the neural voice at another rate and pitch than the agent's, or
by espeak-ng where that voice is not installed (`engine/sim/caller_voice.py`). Twilio's
side of the call (webhook, signed Media Streams socket, real-time playout with marks and
`clear`, REST redirects) is `engine/sim/twilio_side.py`.

It records what it heard (a timeline with silence, writable as WAV) and timings: the
delay from the end of each line to the first audio of the answer, and the arrival time
of every frame (for pacing and jitter figures).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from engine.audio.frames import FRAME_S
from engine.log import get_logger
from engine.providers.base import TextToSpeech
from engine.sim.call_result import CallResult, SaidLine
from engine.sim.caller_voice import caller_voice, espeak_caller_voice, speak, voice_key
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.twilio_api import TwilioApiStandIn
from engine.sim.twilio_side import TwilioSide, new_sid

log = get_logger(__name__)

# A pause inside a line (" / " in its text), in seconds of line silence.
PAUSE_S = 0.7
ULAW_SILENCE = b"\xff"  # mu-law zero


class SimulatedCaller:
    """One simulated phone call against an engine.

    It speaks with `speech` (default: the neural caller voice, or espeak's `voice` at
    `rate_wpm` where that is not installed); a scenario naming a voice speaks with that
    espeak voice. `speech_cache` (text per voice) may be shared by many callers.
    """

    def __init__(self, engine_url: str, auth_token: str, account_sid: str = "",
                 *, public_url: str | None = None, voice: str = "en-gb", rate_wpm: int = 165,
                 speech: TextToSpeech | None = None,
                 rest: TwilioApiStandIn | None = None, post_status: bool = True,
                 session: aiohttp.ClientSession | None = None,
                 speech_cache: dict[tuple[str, str], bytes] | None = None) -> None:
        self.engine_url = engine_url.rstrip("/")
        self.public_url = (public_url or engine_url).rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid or new_sid("AC")
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.speech = speech
        self.rest = rest
        self.post_status = post_status
        self._http = session
        self._speech_cache = speech_cache if speech_cache is not None else {}
        self.call_sid = new_sid("CA")
        self.result = CallResult(self.call_sid, new_sid("MZ"))
        self.log = log.bind(call_sid=self.call_sid)
        self.twilio = TwilioSide(self.result, engine_url=self.engine_url,
                                 public_url=self.public_url, auth_token=auth_token,
                                 account_sid=self.account_sid, rest=rest)

    # -- public -------------------------------------------------------------------------

    async def run(self, scenario: Scenario) -> CallResult:
        own_session = self._http is None
        http = self._http or aiohttp.ClientSession()
        res = self.result
        res.started_at = time.monotonic()
        if scenario.voice:
            self.speech = espeak_caller_voice(scenario.voice, self.rate_wpm)
        try:
            await self.twilio.dial(http, scenario)
            try:
                await self._script(scenario)
            finally:
                if not self.twilio.closed.is_set():
                    await self.hang_up()
                await self.twilio.stop()
            if self.post_status and res.ended_by in ("caller", "rest-completed"):
                await self.twilio.post_status("completed")
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            res.ended_by = res.ended_by or "error"
            self.log.warning("sim.call_failed", error=res.error)
        finally:
            res.ended_at = time.monotonic()
            await self.twilio.close()
            if own_session:
                await http.close()
        return res

    async def say(self, text: str, barge_in: bool = False) -> SaidLine:
        """Say `text`; " / " in it is a pause of PAUSE_S inside the line (a caller
        thinking mid-sentence, reading out a number)."""
        parts = [await self._speech_audio(part) for part in text.split(" / ")]
        ulaw = (ULAW_SILENCE * int(PAUSE_S * 8000)).join(parts)
        twilio = self.twilio
        line = SaidLine(text, time.monotonic(), 0.0, barge_in)
        self.result.lines.append(line)
        twilio.agent_frames_since_line = 0
        twilio.queue_speech(ulaw)
        while twilio.speech_pending and not twilio.closed.is_set():
            await asyncio.sleep(FRAME_S)
        line.ended_at = time.monotonic()
        # Only audio after the line counts as the answer to it (not what we talked over).
        twilio.agent_frames_since_line = 0
        return line

    async def press(self, digits: str) -> None:
        for digit in digits:
            self.twilio.press(digit)
            await asyncio.sleep(0.15)

    async def hang_up(self) -> None:
        await self.twilio.hang_up()

    async def wait_agent_done(self, quiet_s: float = 1.0, timeout: float = 30.0,
                              need_audio: bool = True) -> bool:
        """Wait until the agent has spoken (if `need_audio`) and gone quiet."""
        twilio = self.twilio
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not twilio.closed.is_set():
            now = time.monotonic()
            spoke = twilio.agent_frames_since_line > 0 or not need_audio
            if spoke and not twilio.playout and not twilio.reconnecting \
                    and now - twilio.last_agent_frame_at >= quiet_s:
                return True
            await asyncio.sleep(0.05)
        return False

    async def wait_closed(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.twilio.closed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def agent_speaking(self) -> bool:
        twilio = self.twilio
        return bool(twilio.playout) or time.monotonic() - twilio.last_agent_frame_at < 0.3

    # -- script -------------------------------------------------------------------------

    async def _script(self, scenario: Scenario) -> None:
        closed = self.twilio.closed
        if scenario.wait_for_greeting:
            await self.wait_agent_done(timeout=30.0)
        for step in scenario.steps:
            if closed.is_set():
                return
            # A call the engine (or a crash) ends also ends the step in progress.
            step_task = asyncio.create_task(self._step(step))
            ended = asyncio.create_task(closed.wait())
            await asyncio.wait({step_task, ended}, return_when=asyncio.FIRST_COMPLETED)
            for task in (step_task, ended):
                task.cancel()
            await asyncio.gather(step_task, ended, return_exceptions=True)
        if scenario.hangup_at_end and not closed.is_set():
            await self.wait_agent_done(timeout=30.0, need_audio=bool(self.result.lines))
            await self.hang_up()
        else:
            await closed.wait()

    async def _step(self, step: Step) -> None:
        if step.say is not None:
            if step.barge_in:
                # Talk over the agent's answer to our last line, once it has started.
                await self._wait_agent_audio(step.wait_timeout_s)
                await asyncio.sleep(step.after_s)
            else:
                # A polite caller lets the agent finish answering first.
                await self.wait_agent_done(timeout=step.wait_timeout_s,
                                           need_audio=bool(self.result.lines))
            await self.say(step.say, barge_in=step.barge_in)
        elif step.dtmf is not None:
            await self.press(step.dtmf)
        elif step.pause is not None:
            await asyncio.sleep(step.pause)
        elif step.hangup:
            await self.hang_up()

    async def _wait_agent_audio(self, timeout: float) -> None:
        twilio = self.twilio
        deadline = time.monotonic() + timeout
        while twilio.agent_frames_since_line == 0 and time.monotonic() < deadline:
            if twilio.closed.is_set():
                return
            await asyncio.sleep(0.02)

    async def _speech_audio(self, text: str) -> bytes:
        if self.speech is None:  # chosen on the first line: a silent caller loads nothing
            self.speech = caller_voice(espeak_voice=self.voice, rate_wpm=self.rate_wpm)
        key = (voice_key(self.speech), text)
        audio = self._speech_cache.get(key)
        if audio is None:
            audio = await speak(self.speech, text)
            self._speech_cache[key] = audio
        return audio
