"""Replying: the agent's answer to one caller turn, spoken while it is being written.

Where the frame goes: `session/turn_taking.py` hands a caller turn to `Replying.reply`.
The answer comes from the answer cache when the question is a known one, else from the
agent, streamed; the text is cut into sentences (`sentences.py`) and each whole sentence
goes at once to `session/speaking.py`, so the first audio leaves before the agent has
finished. Afterwards the turn's record (said, heard, stage timings) goes to the observer,
the context keeps only what the caller heard, a complete answer is cached, and the
policies act on the agent's verdict (handoff, goodbye, could not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.log import get_logger
from engine.providers.base import (
    Agent,
    AgentDone,
    AgentEvent,
    ChatMessage,
    ProviderError,
    TextDelta,
    Usage,
)
from engine.providers.fallback_tts import FallbackTTS
from engine.providers.sentences import SentenceAggregator
from engine.providers.text_feed import TextFeed
from engine.session.context import ConversationContext
from engine.session.records import TurnRecord
from engine.session.speaking import Speaking
from engine.session.speculation import SpeculatedAgent, Speculation
from engine.session.states import CallState
from engine.session.tool_turns import EngineLine, ToolTurn
from engine.session.voice import Spoken

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.conversation import PipelineDeps
    from engine.session.policies import Policies

log = get_logger(__name__)

# Usage.provider of an answer served from the answer cache (free: no agent request).
ANSWER_CACHE = "answer_cache"


@dataclass(slots=True)
class _Answer:
    """One answer in progress."""

    record: TurnRecord
    line_id: str
    spoken: list[Spoken] = field(default_factory=list)
    first_audio: list[float] = field(default_factory=list)  # (when, TTS seconds to it)
    text_parts: list[str] = field(default_factory=list)
    unsaid: list[str] = field(default_factory=list)  # for Twilio's <Say>: no voice works
    done: AgentDone | None = None
    first_text_at: float = 0.0
    # First text -> first whole sentence: time the LLM was still writing it.
    sentence_wait: float | None = None
    completed: bool = False
    tools: ToolTurn | None = None  # the turn's tool calls, when the agent has tools


@dataclass(slots=True)
class Prompt:
    """What the agent is asked for one caller turn (`Replying.prompt`)."""

    messages: list[ChatMessage] = field(default_factory=list)
    passages: tuple[str, ...] = ()  # the knowledge retrieved, rendered into `messages`
    knowledge_ids: tuple[str, ...] = ()
    cache_key: str | None = None  # the FAQ entry whose answer may be cached
    cached: str | None = None  # the answer cache's answer: no agent request at all


class Replying:
    def __init__(self, session: CallSession, deps: PipelineDeps, context: ConversationContext,
                 speaking: Speaking, policies: Policies) -> None:
        self.session = session
        self.deps = deps
        self.context = context
        self.speaking = speaking
        self.policies = policies
        self.log = log.bind(call_sid=session.call_sid)

    async def reply(self, record: TurnRecord, speech_end: float, agent: Agent,
                    speculation: Speculation | None = None) -> None:
        """Answer the caller's turn with `agent` (the turn's chain); `speech_end` is when
        the caller stopped speaking; `speculation`, one started on the caller's words at
        a pause (used if they are the turn's words)."""
        answer = _Answer(record, f"{self.session.call_sid}-a{record.idx}")
        if self.deps.tools is not None:
            answer.tools = ToolTurn(self.session, self.deps.tools, record)
        stream = self._agent_stream(record, agent, answer.tools, speculation)
        try:
            await self._speak_as_written(answer, stream)
            await self._finish_speaking(answer, speech_end)
            answer.completed = True
        except ProviderError as exc:
            self.log.warning("turn.reply_failed", error=str(exc))
            obs = self.session.observer
            if obs is not None:
                obs.alert(self.session, "provider_down", "critical", f"no reply: {exc}", {})
        finally:
            await stream.aclose()
            text = self._close_turn(answer)
        if answer.completed and answer.done is not None:
            await self._after_reply(record, answer.done, text, agent, answer.tools)

    async def prompt(self, caller_text: str, agent: Agent) -> Prompt:
        """What the agent is asked for `caller_text`: the answer cache's answer when the
        question is a known one, else the messages (with the knowledge retrieved)."""
        deps = self.deps
        key = None
        if deps.matcher is not None and agent.name != "faq":
            match = deps.matcher.match(caller_text)
            # An entry that looks its answer up (a tool) has no one answer to cache.
            if match is not None and match.entry.action == "answer" and match.entry.tool is None:
                key = f"faq:{match.entry.id}"
                cached = await deps.cache.get_answer(key)
                if cached:
                    return Prompt(cache_key=key, cached=cached)
        found = await deps.knowledge.retrieve(caller_text, self.session.call_sid) \
            if deps.knowledge is not None and agent.name != "faq" else ()
        passages = tuple(p.render() for p in found)
        return Prompt(self.context.messages(caller_text, passages), passages,
                      tuple(p.id for p in found), key)

    async def _agent_stream(self, record: TurnRecord, agent: Agent,
                            tools: ToolTurn | None = None,
                            speculation: Speculation | None = None
                            ) -> AsyncGenerator[AgentEvent, None]:
        """The reply: from the answer cache when the question is a known one; with
        `tools`, in as many rounds as the agent's tool calls take (`tool_turns.py`);
        from `speculation` when it was started on these words."""
        prompt = None
        if speculation is not None:
            prompt = await speculation.prompt_for(record.caller_text, agent,
                                                  self.context.messages)
            if prompt is None:
                await speculation.discard()  # other words: billed, not used
            elif prompt.cached is None:
                agent = SpeculatedAgent(agent, speculation)
                record.speculated = True
        if prompt is None:
            prompt = await self.prompt(record.caller_text, agent)
        key = prompt.cache_key
        if prompt.cached is not None:
            record.cached = True
            # No agent request: a free line on the bill that says why.
            self.session.book(Usage(provider=ANSWER_CACHE, kind="llm", model=agent.model,
                                    cached=True))
            yield TextDelta(prompt.cached)
            return
        record.knowledge_ids = prompt.knowledge_ids
        messages = list(prompt.messages)
        started = time.monotonic()  # the LLM's first token: retrieval is engine time
        # Closed with this generator: a cut reply reaches the chain at once, which reads
        # it on for its usage.
        async with aclosing(tools.events(agent, messages) if tools is not None
                            else agent.respond(messages)) as events:
            async for event in events:
                if isinstance(event, TextDelta) and record.timings.llm_first_token is None:
                    record.timings.llm_first_token = time.monotonic() - started
                if isinstance(event, AgentDone) and key and event.cache_key is None \
                        and not record.tool_calls:
                    event.cache_key = key
                yield event

    async def _speak_as_written(self, answer: _Answer,
                                stream: AsyncGenerator[AgentEvent, None]) -> None:
        """The text goes to the voice as it is written: as it comes to a voice that takes
        it so (input streaming), else sentence by sentence (the first piece may be a
        clause). A cached answer is spoken by sentence: their audio is cached too."""
        first = await anext(stream, None)
        tts = self.speaking.tts
        events = _prepend(first, stream)
        if isinstance(tts, FallbackTTS) and tts.streams_text and not answer.record.cached:
            await self._speak_streamed(answer, events, tts)
        else:
            await self._speak_by_sentence(answer, events)

    async def _speak_streamed(self, answer: _Answer, stream: AsyncIterator[AgentEvent],
                              tts: FallbackTTS) -> None:
        feed = TextFeed()
        answer.sentence_wait = 0.0  # the voice starts on the first text, not a sentence
        speaker = asyncio.ensure_future(self.speaking.say_streamed(
            feed, tts, answer.spoken, answer.first_audio,
            lambda: self._show_progress(answer)))
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    answer.text_parts.append(event.text)
                    feed.push(event.text)
                elif isinstance(event, AgentDone):
                    self._agent_done(answer, event)
            feed.close()
            try:
                await asyncio.shield(speaker)
            except ProviderError as exc:
                if answer.spoken:
                    raise  # cut after some of the answer went out: it ends there
                self.log.error("turn.tts_unavailable", error=str(exc))
                text = "".join(answer.text_parts).strip()
                if text:
                    answer.unsaid.append(text)
        finally:
            # No more text (a cut, a failure): a voice still at work ends with what it has.
            feed.close()
            if not speaker.done():
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError, ProviderError):
                    await speaker
            elif not speaker.cancelled():
                speaker.exception()  # seen (raised above, or moot: the agent failed)

    def _show_progress(self, answer: _Answer) -> None:
        obs = self.session.observer
        if obs is not None:
            obs.transcript(self.session, "agent", " ".join(s.text for s in answer.spoken),
                           False, line_id=answer.line_id)

    def _agent_done(self, answer: _Answer, done: AgentDone) -> None:
        answer.done = done  # its usage is booked by the agent's chain
        if answer.first_audio:
            answer.record.timings.audio_lead_over_llm = time.monotonic() - answer.first_audio[0]

    async def _speak_by_sentence(self, answer: _Answer,
                                 stream: AsyncIterator[AgentEvent]) -> None:
        """Each sentence goes to speech as soon as the agent has written it."""
        aggregator = SentenceAggregator(self.session.config.turns.first_clause_words)
        async for event in stream:
            if isinstance(event, TextDelta):
                if not answer.text_parts:
                    answer.first_text_at = time.monotonic()
                answer.text_parts.append(event.text)
                sentences = aggregator.push(event.text)
                if isinstance(event, EngineLine):  # said at once, not held for more text
                    sentences += filter(None, [aggregator.flush()])
                for sentence in sentences:
                    if answer.sentence_wait is None:
                        answer.sentence_wait = time.monotonic() - answer.first_text_at
                    await self.speaking.say_sentence(sentence, answer.spoken,
                                                     answer.first_audio, answer.unsaid)
                    self._show_progress(answer)
            elif isinstance(event, AgentDone):
                self._agent_done(answer, event)
        rest = aggregator.flush()
        if rest:
            if answer.sentence_wait is None:
                answer.sentence_wait = time.monotonic() - answer.first_text_at
            await self.speaking.say_sentence(rest, answer.spoken, answer.first_audio,
                                             answer.unsaid)

    async def _finish_speaking(self, answer: _Answer, speech_end: float) -> None:
        """The <Say> fallback if needed, the latency record, then wait until heard."""
        record, spoken, done = answer.record, answer.spoken, answer.done
        if answer.unsaid:
            await self.speaking.say_via_twilio(answer.unsaid)
        if answer.first_audio:
            _record_latency(record, speech_end, answer.first_audio, answer.sentence_wait or 0.0)
        # Answered from the cache: no paid agent call and no synthesis at all.
        free_answer = record.cached or (done is not None and done.usage.provider == "faq")
        record.cached = bool(spoken) and free_answer and all(s.from_cache for s in spoken)
        if spoken:
            await self.speaking.voice.wait_mark(spoken[-1].mark, timeout=60.0)

    def _close_turn(self, answer: _Answer) -> str:
        """Fill in and report the turn's record; returns the agent's whole answer."""
        session = self.session
        record, spoken = answer.record, answer.spoken
        text = "".join(answer.text_parts).strip()
        heard = self.speaking.heard(spoken)
        record.agent_text = text
        record.heard_text = heard
        record.interrupted = bool(spoken) and heard != " ".join(s.text for s in spoken)
        voice = self.speaking.voice
        record.agent_audio_s = sum(s.audio_bytes for s in spoken
                                   if voice.mark_heard(s.mark)) / 8000
        # Only what the caller heard stays in the context; a question whose answer was
        # cut before any of it was heard stays as an unanswered user turn.
        self.context.add_turn(record.caller_text, heard,
                              "; ".join(answer.tools.notes) if answer.tools else "")
        obs = session.observer
        if obs is not None:
            if spoken or text:
                obs.transcript(session, "agent", text if answer.completed else heard or "…",
                               True, line_id=answer.line_id, interrupted=record.interrupted,
                               heard_text=heard)
            obs.turn_completed(session, record)
        return text

    async def _after_reply(self, record: TurnRecord, done: AgentDone, text: str,
                           agent: Agent, tools: ToolTurn | None) -> None:
        if done.cache_key and not record.cached and done.action == "answer" and text \
                and not done.truncated:
            await self.deps.cache.put_answer(done.cache_key, text)
        action = tools.action if tools is not None else None
        if action is not None and action.kind == "transfer":  # the agent's transfer tool
            if self.session.state is CallState.AI:
                await self.session.transfer(action.number,
                                            f"agent transferred to {action.destination}")
            return
        if not await self.policies.after_answer(done.action):
            return
        if self.context.needs_summary():
            await self.context.summarize(agent)


def _record_latency(record: TurnRecord, speech_end: float, first_audio: list[float],
                    sentence_wait: float) -> None:
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


async def _prepend(first: AgentEvent | None,
                   rest: AsyncGenerator[AgentEvent, None]) -> AsyncIterator[AgentEvent]:
    """`first` (already read from `rest`), then the rest."""
    if first is None:
        return
    yield first
    async for event in rest:
        yield event
