"""The conversation of one call: hear, understand, answer, speak — interruptible.

Per inbound frame (`on_audio`, the hot path) only the endpointer runs. When it declares
the caller's turn over, a task transcribes the utterance, applies the policies (low
confidence, handoff intent, cost cap), and starts the reply: the agent's streamed text
is cut into sentences and each sentence goes to text-to-speech as soon as it is
complete, so the first audio leaves before the agent has finished. Each sentence is
followed by a mark; marks tell what the caller actually heard, and after a barge-in the
context keeps only that.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from engine.audio.vad import Endpointer, EndpointerOptions, SpeechEnded, SpeechStarted
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import (
    Agent,
    AgentDone,
    AgentEvent,
    AudioChunk,
    ProviderError,
    SpeechToText,
    SynthesisDone,
    TextDelta,
    TextToSpeech,
    Transcript,
)
from engine.providers.faq.matcher import FaqMatcher, detect_intent
from engine.providers.response_cache import ResponseCache
from engine.session.context import ConversationContext
from engine.session.records import TurnRecord, TurnTimings
from engine.session.sentences import SentenceAggregator
from engine.session.states import CallState

if TYPE_CHECKING:
    from engine.session.call_session import CallSession

log = get_logger(__name__)

_WORDS = re.compile(r"[a-z']+")


class Mode(Enum):
    AI = "ai"  # listen and answer
    TRANSCRIBE = "transcribe"  # a supervisor speaks: keep the transcript, never answer
    OFF = "off"  # transferring or ended


@dataclass(slots=True)
class PipelineDeps:
    """What every call's pipeline shares (built once per engine)."""

    config: Config
    stt: SpeechToText
    agent: Agent
    tts: TextToSpeech
    cache: ResponseCache
    matcher: FaqMatcher | None = None  # answer-cache keys for common questions


# A progress mark every this many bytes of a sentence (400 ms of audio): after a
# barge-in, the part of the sentence the caller heard is known to within 400 ms.
PROGRESS_MARK_BYTES = 3200


@dataclass(slots=True)
class _Spoken:
    text: str
    mark: str
    audio_bytes: int
    from_cache: bool  # replayed from the response cache: no TTS call
    progress: list[tuple[str, int]]  # (mark, audio bytes of this sentence before it)


class ConversationPipeline:
    def __init__(self, session: CallSession, deps: PipelineDeps,
                 cost_so_far: Callable[[], float] = lambda: 0.0) -> None:
        self.session = session
        self.deps = deps
        cfg = deps.config
        self.cfg = cfg
        turns = cfg.turns
        options = EndpointerOptions.from_turn_config(
            turns, preroll_ms=turns.preroll_ms, start_window_ms=turns.vad_start_window_ms,
            min_level_dbfs=turns.vad_min_level_dbfs)
        self.endpointer = Endpointer(options, vad_mode=turns.vad_mode,
                                     call_sid=session.call_sid)
        self._interrupt_ms = turns.interruption_min_ms
        self._backchannels = {" ".join(_WORDS.findall(b.lower())) for b in turns.backchannels}
        self._backchannel_words = {w for b in self._backchannels for w in b.split()}
        prompt = cfg.policy.system_prompt.replace("{business}", cfg.faq.business_name)
        self.context = ConversationContext(prompt, cfg.policy.context_max_tokens,
                                           cfg.policy.context_keep_recent_turns,
                                           session.call_sid)
        self.mode = Mode.AI
        self.cost_so_far = cost_so_far
        self.log = log.bind(call_sid=session.call_sid)
        self.turn_index = 0
        self.misunderstandings = 0
        self._reply_task: asyncio.Task[None] | None = None
        self._turn_lock = asyncio.Lock()
        self._interrupted = False
        self.barge_ins = 0

    # -- Conversation protocol -----------------------------------------------------------

    def on_audio(self, ulaw: bytes) -> None:
        if self.mode is Mode.OFF:
            return
        event = self.endpointer.feed(ulaw)
        if event is None:
            ep = self.endpointer
            # Voiced time, not time since onset: a short "okay" must not cut the agent off.
            if (ep.in_speech and not self._interrupted and ep.voiced_ms_so_far
                    >= self._interrupt_ms and self.agent_speaking()):
                self.interrupt("barge-in")
            return
        if isinstance(event, SpeechEnded):
            self.session.spawn(self._on_utterance(event, time.monotonic()), "turn")
        elif isinstance(event, SpeechStarted):
            self._emit_partial_caller()

    def on_dtmf(self, digit: str) -> None:
        if digit == "0" and self.mode is Mode.AI:
            self.session.spawn(self.handoff("caller pressed 0", self.cfg.policy.handoff_line),
                               "handoff")

    async def start(self) -> None:
        self._start_reply_task(self._greet())

    def set_listening(self, active: bool) -> None:
        if active:
            self.mode = Mode.AI
        else:
            self.mode = Mode.OFF
            self._cancel_reply()

    def take_over(self) -> None:
        """A supervisor speaks now: stop the agent, keep transcribing."""
        self.mode = Mode.TRANSCRIBE
        if self.agent_speaking():
            self.interrupt("supervisor took over")

    def hand_back(self) -> None:
        self.mode = Mode.AI
        self.endpointer.reset()

    async def aclose(self) -> None:
        self.mode = Mode.OFF
        self._cancel_reply()

    # -- barge-in ------------------------------------------------------------------------

    def agent_speaking(self) -> bool:
        task = self._reply_task
        return (task is not None and not task.done()) or self.session.is_playing()

    def interrupt(self, reason: str) -> None:
        """Stop generation and synthesis, and cut what the caller hears now."""
        self._interrupted = True
        self.barge_ins += 1
        self.log.info("turn.barge_in", reason=reason)
        self._cancel_reply()
        self.session.spawn(self.session.interrupt(), "clear")

    def _cancel_reply(self) -> None:
        task = self._reply_task
        # Never the running task: a reply that ends in a handoff must finish the handoff.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _start_reply_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self._interrupted = False
        self._reply_task = self.session.spawn(coro, "reply")

    # -- a caller turn -----------------------------------------------------------------

    def _emit_partial_caller(self) -> None:
        obs = self.session.observer
        if obs is not None and self.mode is not Mode.OFF:
            obs.transcript(self.session, "caller", "…", False,
                           line_id=f"{self.session.call_sid}-c{self.turn_index + 1}")

    def _is_backchannel(self, text: str) -> bool:
        words = _WORDS.findall(text.lower())
        if not words:
            return True
        return " ".join(words) in self._backchannels or (
            len(words) <= 3 and all(w in self._backchannel_words for w in words))

    def _low_confidence(self, transcript: Transcript) -> bool:
        conf = transcript.confidence
        policy = self.cfg.policy
        if conf.avg_logprob is not None and conf.avg_logprob < policy.min_avg_logprob:
            return True
        if conf.no_speech_prob is not None and conf.no_speech_prob > policy.max_no_speech_prob:
            return True
        return (conf.token_logprob_mean is not None
                and conf.token_logprob_mean < policy.min_avg_logprob)

    async def _on_utterance(self, ended: SpeechEnded, detected_at: float) -> None:
        async with self._turn_lock:
            reply = await self._handle_utterance(ended, detected_at)
        if reply is not None:
            # The answer runs on in this task, not a new one: a new task waits a whole
            # loop iteration to start (~5 ms p95 at 100 calls, bench/bench_turns.py).
            self._interrupted = False
            self._reply_task = asyncio.current_task()
            await reply

    async def _handle_utterance(self, ended: SpeechEnded,
                                detected_at: float) -> Coroutine[Any, Any, None] | None:
        """Transcribe and apply the policies; the reply to run, if the turn gets one."""
        session = self.session
        obs = session.observer
        endpointing_s = ended.trailing_silence_ms / 1000
        speech_end = detected_at - endpointing_s  # when the caller actually stopped
        line_id = f"{session.call_sid}-c{self.turn_index + 1}"
        started = time.monotonic()
        try:
            transcript = await self.deps.stt.transcribe(ended.utterance_pcm16, 8000)
        except ProviderError as exc:
            self.log.warning("turn.stt_failed", error=str(exc))
            if obs is not None:
                obs.transcript(session, "caller", "(not transcribed)", True, line_id=line_id)
            if self.mode is Mode.AI and not self.agent_speaking():
                await self._misunderstood("speech recognition failed")
            return None
        stt_s = time.monotonic() - started
        if obs is not None:
            obs.usage(session, transcript.usage)
        text = transcript.text.strip()
        low = self._low_confidence(transcript)
        speaking = self.agent_speaking() and not self._interrupted
        if not text or (low and speaking):
            if obs is not None:
                obs.transcript(session, "caller", "", True, line_id=line_id, discarded=True)
            return None  # noise, or an unclear sound over the agent: not a turn
        if speaking:
            if self._is_backchannel(text):
                self.log.info("turn.backchannel_ignored", text=text)
                if obs is not None:
                    obs.transcript(session, "caller", text, True, line_id=line_id,
                                   backchannel=True)
                return None
            self.interrupt("caller spoke over the agent")
        self.turn_index += 1
        if obs is not None:
            obs.transcript(session, "caller", text, True, line_id=line_id, low_confidence=low)
        if self.mode is not Mode.AI or session.state is not CallState.AI:
            return None
        if low:
            self.log.info("turn.low_confidence", text=text,
                          avg_logprob=transcript.confidence.avg_logprob,
                          no_speech_prob=transcript.confidence.no_speech_prob)
            await self._misunderstood("low confidence transcript")
            return None
        if detect_intent(text) == "handoff":
            await self.handoff("caller asked for a person", self.cfg.policy.handoff_line)
            return None
        cap = self.cfg.policy.call_cost_cap_usd
        if cap > 0 and self.cost_so_far() >= cap:
            await self.handoff("call cost cap reached", self.cfg.policy.cost_cap_line)
            return None
        user_text = text
        timings = TurnTimings(stt=stt_s, endpointing=endpointing_s)
        record = TurnRecord(idx=self.turn_index, caller_text=user_text,
                            caller_audio_s=ended.speech_ms / 1000, timings=timings)
        return self._reply(record, speech_end)

    async def _misunderstood(self, why: str) -> None:
        self.misunderstandings += 1
        obs = self.session.observer
        if self.misunderstandings >= self.cfg.policy.max_misunderstandings:
            if obs is not None:
                obs.alert(self.session, "low_confidence", "warning",
                          f"{self.misunderstandings} misunderstandings in a row", {"why": why})
            await self.handoff("repeated misunderstandings", self.cfg.policy.handoff_line)
            return
        self._start_reply_task(self._say_lines([self.cfg.policy.not_understood], "system"))

    # -- speaking ------------------------------------------------------------------------

    async def _greet(self) -> None:
        await self._say_lines([self.cfg.engine.greeting], "agent")

    async def _say_lines(self, lines: list[str], speaker: str) -> None:
        spoken: list[_Spoken] = []
        unsaid: list[str] = []
        line_id = f"{self.session.call_sid}-{speaker[0]}{time.monotonic_ns()}"
        try:
            for line in lines:
                await self._say_sentence(line, spoken, None, unsaid)
            if unsaid:
                await self._say_via_twilio(unsaid)
            if spoken:
                await self.session.wait_mark(spoken[-1].mark, timeout=30.0)
        finally:
            heard = self._heard(spoken)
            obs = self.session.observer
            if obs is not None and spoken:
                full = " ".join(s.text for s in spoken)
                obs.transcript(self.session, speaker, full, True, line_id=line_id,
                               interrupted=heard != full, heard_text=heard)

    async def _say_via_twilio(self, unsaid: list[str]) -> None:
        """Every voice failed: let Twilio say it (<Say>), and the call goes on."""
        obs = self.session.observer
        if obs is not None:
            obs.alert(self.session, "provider_down", "critical",
                      "no text-to-speech provider works: Twilio <Say> used", {})
        await self.session.say_via_twilio(" ".join(unsaid))

    async def _say_sentence(self, text: str, spoken: list[_Spoken],
                            first_audio: list[float] | None, unsaid: list[str]) -> None:
        """Synthesize one sentence straight into the outbound queue, then a mark.

        When every voice has failed (nothing synthesized yet), the sentence goes to
        `unsaid`, for Twilio's own <Say>; so do the sentences after it.
        """
        if unsaid:
            unsaid.append(text)
            return
        session = self.session
        obs = session.observer
        started = time.monotonic()
        audio_bytes = 0
        from_cache = False
        progress: list[tuple[str, int]] = []
        try:
            async for event in self.deps.tts.synthesize(text):
                if isinstance(event, AudioChunk):
                    if not audio_bytes and first_audio is not None and not first_audio:
                        now = time.monotonic()
                        first_audio.extend((now, now - started))
                    audio_bytes += len(event.ulaw)
                    session.queue_audio(event.ulaw)
                    last = progress[-1][1] if progress else 0
                    if audio_bytes - last >= PROGRESS_MARK_BYTES:
                        progress.append((session.queue_progress_mark(), audio_bytes))
                elif isinstance(event, SynthesisDone):
                    from_cache = event.usage.provider.endswith(":cache")
                    if obs is not None:
                        obs.usage(session, event.usage)
        except ProviderError as exc:
            if audio_bytes:
                raise
            self.log.error("turn.tts_unavailable", error=str(exc))
            unsaid.append(text)
            return
        spoken.append(_Spoken(text, session.queue_mark("s"), audio_bytes, from_cache,
                              progress))

    def _heard(self, spoken: list[_Spoken]) -> str:
        """What the caller heard, from the marks that came back before any clear: whole
        sentences, then the share of the cut sentence its progress marks vouch for."""
        heard: list[str] = []
        for s in spoken:
            if self.session.mark_heard(s.mark):
                heard.append(s.text)
                continue
            played = max((n for m, n in s.progress if self.session.mark_heard(m)), default=0)
            words = s.text.split()
            count = int(len(words) * played / s.audio_bytes) if s.audio_bytes else 0
            if count:
                heard.append(" ".join(words[:count]) + "…")
            break
        return " ".join(heard)

    async def _agent_stream(self, record: TurnRecord) -> AsyncGenerator[AgentEvent, None]:
        """The reply: from the answer cache when the question is a known one."""
        key = None
        matcher = self.deps.matcher
        if matcher is not None and self.deps.agent.name != "faq":
            match = matcher.match(record.caller_text)
            if match is not None and match.entry.action == "answer":
                key = f"faq:{match.entry.id}"
                cached = await self.deps.cache.get_answer(key)
                if cached:
                    record.cached = True
                    yield TextDelta(cached)
                    return
        started = time.monotonic()
        async for event in self.deps.agent.respond(self.context.messages(record.caller_text)):
            if isinstance(event, TextDelta) and record.timings.llm_first_token is None:
                record.timings.llm_first_token = time.monotonic() - started
            if isinstance(event, AgentDone) and key and event.cache_key is None:
                event.cache_key = key
            yield event

    async def _reply(self, record: TurnRecord, speech_end: float) -> None:
        session = self.session
        obs = session.observer
        spoken: list[_Spoken] = []
        first_audio: list[float] = []
        aggregator = SentenceAggregator()
        text_parts: list[str] = []
        done: AgentDone | None = None
        line_id = f"{session.call_sid}-a{record.idx}"
        completed = False
        first_text_at = 0.0
        # First text -> first whole sentence: time the LLM was still writing it.
        sentence_wait: float | None = None
        unsaid: list[str] = []
        stream = self._agent_stream(record)
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if not text_parts:
                        first_text_at = time.monotonic()
                    text_parts.append(event.text)
                    for sentence in aggregator.push(event.text):
                        if sentence_wait is None:
                            sentence_wait = time.monotonic() - first_text_at
                        await self._say_sentence(sentence, spoken, first_audio, unsaid)
                        if obs is not None:
                            obs.transcript(session, "agent",
                                           " ".join(s.text for s in spoken), False,
                                           line_id=line_id)
                elif isinstance(event, AgentDone):
                    done = event
                    if first_audio:
                        record.timings.audio_lead_over_llm = time.monotonic() - first_audio[0]
                    if obs is not None:
                        obs.usage(session, event.usage)
            rest = aggregator.flush()
            if rest:
                if sentence_wait is None:
                    sentence_wait = time.monotonic() - first_text_at
                await self._say_sentence(rest, spoken, first_audio, unsaid)
            if unsaid:
                await self._say_via_twilio(unsaid)
            if first_audio:
                self._record_latency(record, speech_end, first_audio, sentence_wait or 0.0)
            # Answered from the cache: no paid agent call and no synthesis at all.
            free_answer = record.cached or (done is not None and done.usage.provider == "faq")
            record.cached = bool(spoken) and free_answer and all(s.from_cache for s in spoken)
            if spoken:
                await session.wait_mark(spoken[-1].mark, timeout=60.0)
            completed = True
        except ProviderError as exc:
            self.log.warning("turn.reply_failed", error=str(exc))
            if obs is not None:
                obs.alert(session, "provider_down", "critical", f"no reply: {exc}", {})
        finally:
            await stream.aclose()
            answer = "".join(text_parts).strip()
            heard = self._heard(spoken)
            record.agent_text = answer
            record.heard_text = heard
            record.interrupted = bool(spoken) and heard != " ".join(s.text for s in spoken)
            record.agent_audio_s = sum(s.audio_bytes for s in spoken
                                       if session.mark_heard(s.mark)) / 8000
            # Only what the caller heard stays in the context; a question whose answer was
            # cut before any of it was heard stays as an unanswered user turn.
            self.context.add_turn(record.caller_text, heard)
            if obs is not None:
                if spoken or answer:
                    obs.transcript(session, "agent", answer if completed else heard or "…",
                                   True, line_id=line_id, interrupted=record.interrupted,
                                   heard_text=heard)
                obs.turn_completed(session, record)
        if completed and done is not None:
            await self._after_reply(record, done, answer)

    def _record_latency(self, record: TurnRecord, speech_end: float,
                        first_audio: list[float], sentence_wait: float) -> None:
        t = record.timings
        t.tts_first_audio = first_audio[1]
        t.voice_to_voice = first_audio[0] - speech_end
        providers = (t.endpointing or 0) + (t.stt or 0) + (t.llm_first_token or 0) \
            + t.tts_first_audio
        if t.llm_first_token is not None:
            # Speech starts at the first whole sentence, and the tokens up to it are the
            # LLM's time, not the engine's.
            t.llm_first_sentence = sentence_wait
            providers += sentence_wait
        t.engine_overhead = max(0.0, t.voice_to_voice - providers)

    async def _after_reply(self, record: TurnRecord, done: AgentDone, answer: str) -> None:
        deps = self.deps
        if done.cache_key and not record.cached and done.action == "answer" and answer \
                and not getattr(done, "truncated", False):
            await deps.cache.put_answer(done.cache_key, answer)
        if done.action == "unknown":
            self.misunderstandings += 1
            if self.misunderstandings >= self.cfg.policy.max_misunderstandings:
                await self.handoff("agent could not answer repeatedly", "")
                return
        else:
            self.misunderstandings = 0
        if done.action == "handoff":
            await self.handoff("agent offered a person", "")
        elif done.action == "goodbye":
            await self.session.hang_up("caller said goodbye")
        if self.context.needs_summary():
            usage = await self.context.summarize(deps.agent)
            if usage is not None and self.session.observer is not None:
                self.session.observer.usage(self.session, usage)

    # -- handoff -------------------------------------------------------------------------

    async def handoff(self, reason: str, line: str) -> None:
        """Say a short line, then transfer the call to the human queue."""
        session = self.session
        if session.state is not CallState.AI:
            return
        obs = session.observer
        self.log.info("turn.handoff", reason=reason)
        if obs is not None:
            obs.alert(session, "handoff_requested", "warning", f"handoff: {reason}",
                      {"reason": reason})
        number = self.cfg.transfer.number
        previous = self.mode
        self.mode = Mode.OFF
        self._cancel_reply()
        if line:
            try:
                await self._say_lines([line], "agent")
            except ProviderError as exc:
                self.log.warning("turn.handoff_line_failed", error=str(exc))
        if not number:
            self.log.warning("turn.handoff_impossible", detail="transfer.number is not set")
            self.mode = previous
            return
        result = await session.transfer(number, reason)
        if not result.ok and not result.already_ended:
            self.mode = previous
