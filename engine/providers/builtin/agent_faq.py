"""The offline default agent: answers from the configured FAQ, says so when it cannot.

No model, no network, no cost: the caller's last utterance is matched against the FAQ
(`FaqMatcher`); the entry's answer is streamed sentence by sentence, and its action
(answer / handoff / goodbye) tells the call policy what to do next. A question the FAQ
does not cover gets `unknown_answer` and the action "unknown". An entry with a `tool`
looks its answer up when that tool is offered (engine/providers/faq/lookup.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from engine.config import Config, FaqConfig
from engine.log import get_logger
from engine.providers.base import (
    AgentAction,
    AgentDone,
    AgentEvent,
    ChatMessage,
    TextDelta,
    Timing,
    ToolSpec,
    Usage,
)
from engine.providers.faq.embeddings import SemanticFaqStage, load_semantic_stage
from engine.providers.faq.intent import Intent, detect_intent
from engine.providers.faq.lookup import answer_from_result, tool_request
from engine.providers.faq.matcher import FaqMatch, FaqMatcher
from engine.providers.faq.text import normalize
from engine.providers.registry import Billing, BillingUnit, NoSettings, ProviderSpec, register

log = get_logger(__name__)

# Answers are spoken: one TextDelta per sentence lets TTS start on the first one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_GREETINGS = frozenset({"hi", "hello", "hey", "hiya", "yo", "morning", "afternoon",
                        "evening", "good", "there", "um", "uh", "erm", "hmm", "ok", "okay",
                        "yes", "yeah", "thanks", "thank", "you"})
_SUMMARY_QUOTE_CHARS = 80

DEFAULT_PROMPT = "Hello, this is {business}. How can I help you today?"
DEFAULT_HANDOFF = "Of course. Let me connect you with a member of our team."
DEFAULT_GOODBYE = "Thank you for calling {business}. Goodbye!"


def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def _is_greeting_or_empty(text: str) -> bool:
    words = normalize(text)
    return not words or (len(words) <= 4 and all(w in _GREETINGS for w in words))


def _usage() -> Usage:
    return Usage(provider=FaqAgent.name, kind="llm", model=FaqAgent.model, input_tokens=0,
                 output_tokens=0)


@dataclass(slots=True)
class _Reply:
    text: str
    action: AgentAction
    cache_key: str | None


@dataclass(slots=True)
class FaqSummary:
    """What the caller asked, for the context window and the supervisor."""

    topics: list[str] = field(default_factory=list)  # matched entry ids, first-asked order
    unanswered: list[str] = field(default_factory=list)  # caller's words, truncated
    intents: list[Intent] = field(default_factory=list)

    def as_text(self) -> str:
        parts = [f"Topics asked: {', '.join(self.topics) if self.topics else 'none'}."]
        if self.unanswered:
            quoted = "; ".join(f'"{q}"' for q in self.unanswered)
            parts.append(f"Unanswered: {quoted}.")
        if self.intents:
            parts.append(f"Caller intents: {', '.join(self.intents)}.")
        return " ".join(parts)


class FaqAgent:
    """Agent over a FAQ; matching takes well under a millisecond, so it runs inline."""

    name = "faq"
    model = "faq"
    runs_locally = True  # a cut reply is closed, not read on (engine.providers.base)

    def __init__(self, faq: FaqConfig, matcher: FaqMatcher | None = None, *,
                 semantic: SemanticFaqStage | None = None,
                 prompt_answer: str = DEFAULT_PROMPT) -> None:
        self.faq = faq
        self.matcher = matcher or FaqMatcher(faq.entries, faq.match_threshold)
        # Optional embedding stage (engine.providers.faq.embeddings), asked only when the
        # lexical matcher finds nothing; ~10 ms in a thread. Loaded by warm_up when
        # faq.semantic_threshold is set.
        self.semantic = semantic
        self.prompt_answer = prompt_answer.format(business=faq.business_name)

    async def reply_for(self, text: str) -> _Reply:
        """The answer to one caller utterance (exposed for the cache and the tests)."""
        if _is_greeting_or_empty(text):
            return _Reply(self.prompt_answer, "answer", None)
        found: FaqMatch | None = self.matcher.match(text)
        if found is None and self.semantic is not None and detect_intent(text) is None:
            found = await self.semantic.amatch(text)
        if found is not None:
            log.debug("faq_match", entry=found.entry.id, score=found.score,
                      method=found.method)
            return _Reply(found.entry.answer, found.entry.action, f"faq:{found.entry.id}")
        # A person or a goodbye must be honoured even when the FAQ has no such entry.
        intent = detect_intent(text)
        if intent == "handoff":
            return _Reply(DEFAULT_HANDOFF, "handoff", None)
        if intent == "goodbye":
            return _Reply(DEFAULT_GOODBYE.format(business=self.faq.business_name),
                          "goodbye", None)
        return _Reply(self.faq.unknown_answer, "unknown", None)

    async def respond(self, messages: list[ChatMessage],
                      tools: Sequence[ToolSpec] = ()) -> AsyncGenerator[AgentEvent, None]:
        started = time.perf_counter()
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        looked_up = answer_from_result(self.matcher, self.faq.entries, messages)
        request = tool_request(self.matcher, last_user, tools) \
            if tools and looked_up is None and messages and messages[-1].role == "user" \
            else None
        if request is not None:
            log.debug("faq_tool_call", tool=request.name)
            yield request
            yield AgentDone(usage=_usage(), timing=Timing(
                first_byte_s=None, total_s=time.perf_counter() - started),
                action="tool_calls")
            return
        if not last_user.strip():
            log.info("faq_empty_input", messages=len(messages))
        # A looked-up answer is this call's own: it has no cache key.
        reply = _Reply(looked_up, "answer", None) if looked_up is not None \
            else await self.reply_for(last_user)
        log.debug("faq_reply", action=reply.action, cache_key=reply.cache_key)
        first_byte: float | None = None
        for sentence in split_sentences(reply.text) or [reply.text]:
            # Deltas concatenate to the answer, like an LLM's: sentences keep their space.
            if first_byte is None:
                first_byte = time.perf_counter() - started
                yield TextDelta(sentence)
            else:
                yield TextDelta(" " + sentence)
        yield AgentDone(
            usage=_usage(),
            timing=Timing(first_byte_s=first_byte, total_s=time.perf_counter() - started),
            action=reply.action,
            cache_key=reply.cache_key,
        )

    def summary_of(self, messages: list[ChatMessage]) -> FaqSummary:
        summary = FaqSummary()
        for message in messages:
            if message.role != "user" or _is_greeting_or_empty(message.content):
                continue
            text = " ".join(message.content.split())
            intent = detect_intent(text)
            if intent is not None and intent not in summary.intents:
                summary.intents.append(intent)
            found = self.matcher.match(text)
            if found is not None:
                if found.entry.id not in summary.topics:
                    summary.topics.append(found.entry.id)
            elif intent is None:
                if len(text) > _SUMMARY_QUOTE_CHARS:
                    text = text[: _SUMMARY_QUOTE_CHARS - 1].rstrip() + "…"
                summary.unanswered.append(text)
        return summary

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        return self.summary_of(messages).as_text(), _usage()

    async def warm_up(self) -> None:
        """Load the embedding stage when configured (logged and skipped if unavailable)."""
        if self.semantic is None and self.faq.semantic_threshold > 0 and self.faq.entries:
            self.semantic = await load_semantic_stage(self.faq.entries,
                                                      self.faq.semantic_threshold)

    async def aclose(self) -> None:
        return None


def build(settings: NoSettings, config: Config) -> FaqAgent:
    prompt = config.faq.prompt_answer.replace("{business}", config.faq.business_name)
    return FaqAgent(config.faq, prompt_answer=prompt)


# Reads the [faq] section; its own provider table has nothing in it.
SPEC = register(ProviderSpec(name="faq", kind="agent", settings=NoSettings, build=build,
                             billing=(Billing(BillingUnit.FREE),)))
