"""Turn-taking: when the caller speaks, when their turn is over, and what they said.

Where a frame goes: `session/call_session.py` hands every inbound 20 ms frame to
`TurnTaking.on_audio`. That is the hot path, so only the endpointer runs on it
(`audio/vad.py`), plus barge-in: caller speech over the agent, voiced for long enough,
cuts the agent off (`Speaking.interrupt`). When the endpointer declares the turn over, a
task transcribes the utterance, drops noise and backchannels ("uh-huh" over the agent),
asks the policies whether the turn gets an answer (`session/policies.py`) and runs the
answer in the same task: next stop `session/replying.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import TYPE_CHECKING, Any

from engine.audio.vad import Endpointer, EndpointerOptions, SpeechEnded, SpeechStarted
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import ProviderError
from engine.session.hearing import HeardTurn, Hearing
from engine.session.records import TurnRecord, TurnTimings
from engine.session.speculation import Speculation
from engine.session.states import CallState

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.conversation import TurnChains
    from engine.session.policies import Policies
    from engine.session.replying import Replying
    from engine.session.speaking import Speaking

log = get_logger(__name__)

_WORDS = re.compile(r"[a-z']+")


class Mode(Enum):
    AI = "ai"  # listen and answer
    TRANSCRIBE = "transcribe"  # a supervisor speaks: keep the transcript, never answer
    OFF = "off"  # transferring or ended


class TurnTaking:
    def __init__(self, session: CallSession, config: Config,
                 chains: Callable[[], TurnChains], speaking: Speaking, policies: Policies,
                 replying: Replying) -> None:
        self.session = session
        self.chains = chains  # a turn's chains, chosen as it starts (the budget may degrade)
        self.speaking = speaking
        self.policies = policies
        self.replying = replying
        turns = config.turns
        options = EndpointerOptions.from_turn_config(
            turns, preroll_ms=turns.preroll_ms, start_window_ms=turns.vad_start_window_ms,
            min_level_dbfs=turns.vad_min_level_dbfs)
        self.endpointer = Endpointer(options, vad_mode=turns.vad_mode,
                                     call_sid=session.call_sid)
        self._interrupt_ms = turns.interruption_min_ms
        self._backchannels = {" ".join(_WORDS.findall(b.lower())) for b in turns.backchannels}
        self._backchannel_words = {w for b in self._backchannels for w in b.split()}
        self._handoff_line = config.policy.handoff_line
        self.mode = Mode.AI
        speculate = turns.speculative_reply
        self.hearing = Hearing(session, turns, self.endpointer, self._turn_ended,
                               self._speculate if speculate else None,
                               self._drop_speculation if speculate else None)
        self._speculation: Speculation | None = None
        self._answering = 0  # answers in progress (their audio may not have started)
        self.turn_index = 0
        self._turn_lock = asyncio.Lock()
        self.log = log.bind(call_sid=session.call_sid)

    # -- inbound ------------------------------------------------------------------------

    def on_audio(self, ulaw: bytes) -> None:
        if self.mode is Mode.OFF:
            return
        event = self.endpointer.feed(ulaw)
        if event is None:
            ep = self.endpointer
            if ep.in_speech:
                self.hearing.frame()
                speaking = self.speaking
                # Voiced time, not time since onset: a short "okay" must not cut the agent off.
                if (not speaking.interrupted and ep.voiced_ms_so_far >= self._interrupt_ms
                        and speaking.agent_speaking()):
                    speaking.interrupt("barge-in")
            return
        if isinstance(event, SpeechEnded):
            self._turn_ended(event)
        elif isinstance(event, SpeechStarted):
            self.hearing.started(self.chains().stt)
            self._emit_partial_caller()

    def _turn_ended(self, ended: SpeechEnded) -> None:
        heard = self.hearing.ended(ended)
        self.session.spawn(self._on_utterance(ended, time.monotonic(), heard), "turn")

    def on_dtmf(self, digit: str) -> None:
        if digit == "0" and self.mode is Mode.AI:
            self.session.spawn(self.policies.handoff("caller pressed 0", self._handoff_line),
                               "handoff")

    def _emit_partial_caller(self) -> None:
        obs = self.session.observer
        if obs is not None and self.mode is not Mode.OFF:
            obs.transcript(self.session, "caller", "…", False,
                           line_id=f"{self.session.call_sid}-c{self.turn_index + 1}")

    # -- a caller turn ------------------------------------------------------------------

    def _speculate(self, words: str) -> None:
        """A pause that may end the turn: start the agent on these words (speculation.py)."""
        self._drop_speculation()
        session = self.session
        agent = self.chains().agent
        if (self.mode is not Mode.AI or session.state is not CallState.AI
                or agent.runs_locally or self._turn_lock.locked() or self._answering
                or self.speaking.agent_speaking()):
            return  # nothing to gain, or a turn still being answered
        tools = self.replying.deps.tools
        self._speculation = Speculation(session, words, agent, self.replying.prompt,
                                        tools.specs if tools is not None else ())

    def _drop_speculation(self) -> None:
        """The caller went on: a reply started on their earlier words is thrown away."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            speculation.cancel()

    async def _on_utterance(self, ended: SpeechEnded, detected_at: float,
                            heard: HeardTurn | None) -> None:
        speculation, self._speculation = self._speculation, None
        answer = None
        try:
            async with self._turn_lock:
                answer = await self._hear(ended, detected_at, heard, speculation)
        finally:
            if answer is None and speculation is not None:
                speculation.cancel()  # the turn gets no answer: billed, not used
        if answer is not None:
            # The answer runs on in this task, not a new one: a new task waits a whole
            # loop iteration to start (~5 ms p95 at 100 calls, bench/bench_turns.py).
            self.speaking.speak_in_this_task()
            self._answering += 1
            try:
                await answer
            finally:
                self._answering -= 1

    async def _hear(self, ended: SpeechEnded, detected_at: float, heard: HeardTurn | None,
                    speculation: Speculation | None = None
                    ) -> Coroutine[Any, Any, None] | None:
        """Transcribe and judge the utterance; the answer to run, if the turn gets one."""
        session = self.session
        obs = session.observer
        line_id = f"{session.call_sid}-c{self.turn_index + 1}"
        chains = self.chains()
        started = time.monotonic()
        try:
            if heard is not None:  # transcribed while spoken, mostly
                transcript = await heard.transcript()
            else:
                transcript = await chains.stt.transcribe(ended.utterance_pcm16, 8000)
        except ProviderError as exc:
            self.log.warning("turn.stt_failed", error=str(exc))
            if obs is not None:
                obs.transcript(session, "caller", "(not transcribed)", True, line_id=line_id)
            if self.mode is Mode.AI and not self.speaking.agent_speaking():
                await self.policies.misunderstood("speech recognition failed")
            return None
        stt_s = time.monotonic() - started  # booked by the chain, noise and backchannels too
        text = transcript.text.strip()
        unclear = self.policies.unclear(transcript)
        if not self._is_turn(text, unclear, line_id):
            return None
        self.turn_index += 1
        if obs is not None:
            obs.transcript(session, "caller", text, True, line_id=line_id,
                           low_confidence=unclear)
        if self.mode is not Mode.AI or session.state is not CallState.AI:
            return None
        if not await self.policies.allow_answer(text, transcript, unclear):
            return None
        endpointing_s = ended.trailing_silence_ms / 1000
        record = TurnRecord(idx=self.turn_index, caller_text=text,
                            caller_audio_s=ended.speech_ms / 1000,
                            timings=TurnTimings(stt=stt_s, endpointing=endpointing_s))
        self.speaking.tts = chains.tts
        # When the caller actually stopped: the endpointer waited for the silence.
        return self.replying.reply(record, speech_end=detected_at - endpointing_s,
                                   agent=chains.agent, speculation=speculation)

    def _is_turn(self, text: str, unclear: bool, line_id: str) -> bool:
        """Noise, an unclear sound or a backchannel over the agent is not a turn; other
        speech over the agent cuts it off."""
        session = self.session
        obs = session.observer
        over_agent = self.speaking.agent_speaking() and not self.speaking.interrupted
        if not text or (unclear and over_agent):
            if obs is not None:
                obs.transcript(session, "caller", "", True, line_id=line_id, discarded=True)
            return False
        if over_agent:
            if self._is_backchannel(text):
                self.log.info("turn.backchannel_ignored", text=text)
                if obs is not None:
                    obs.transcript(session, "caller", text, True, line_id=line_id,
                                   backchannel=True)
                return False
            self.speaking.interrupt("caller spoke over the agent")
        return True

    def _is_backchannel(self, text: str) -> bool:
        words = _WORDS.findall(text.lower())
        if not words:
            return True
        return " ".join(words) in self._backchannels or (
            len(words) <= 3 and all(w in self._backchannel_words for w in words))
