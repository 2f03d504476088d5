"""The bounded context over a long call (real summaries, booked like replies), sentence
streaming, and the policies that do not need audio: low confidence, repeated
misunderstandings, cost cap."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from engine.config import FaqConfig, load_config
from engine.providers.base import ChatMessage, Usage
from engine.providers.booking import bill_to
from engine.providers.builtin.agent_faq import FaqAgent
from engine.providers.builtin.llm_openai import OpenAIChatAgent
from engine.providers.fallback import FallbackAgent
from engine.providers.sentences import SentenceAggregator
from engine.session.context import ConversationContext
from engine.sim.standins.openai_api import OpenAIStandin

ROOT = Path(__file__).resolve().parent.parent
FAQ: FaqConfig = load_config(ROOT / "config.toml").faq
QUESTIONS = ["How much is the basic plan?", "Where is your store?", "When are you open?",
             "How do I return a phone?", "Where is my order?", "How do I cancel?"]


def tokens_of(messages: list[ChatMessage]) -> int:
    return sum(len(m.content) // 4 + 1 for m in messages)


async def _long_call(agent, turns: int) -> tuple[ConversationContext, list[int]]:  # type: ignore[no-untyped-def]
    context = ConversationContext("You are the phone assistant of Acme Telecom. " * 5,
                                  max_tokens=600, keep_recent_turns=4, call_sid="CAlong")
    sizes = []
    for i in range(turns):
        question = QUESTIONS[i % len(QUESTIONS)]
        messages = context.messages(question)
        sizes.append(tokens_of(messages))
        answer = ""
        async for event in agent.respond(messages):
            answer += getattr(event, "text", "")
        context.add_turn(question, answer)
        if context.needs_summary():
            await context.summarize(agent)
    return context, sizes


async def test_long_call_with_faq_agent_stays_within_budget() -> None:
    agent = FaqAgent(FAQ)
    context, sizes = await _long_call(agent, 60)  # ~10 minutes of turns
    one_minute = max(sizes[:6])
    late = sizes[-20:]
    unbounded = sizes[0] + 59 * (sizes[5] - sizes[0]) / 5  # growth without summaries
    assert context.summaries_made >= 3
    assert max(sizes) <= context.max_tokens + 60  # never beyond the budget (+ one turn)
    assert sum(late) / len(late) <= 2.0 * one_minute, (one_minute, late)
    assert max(late) <= 0.4 * unbounded
    # The structured summary remembers what was asked long ago.
    assert "pricing" in context.summary or "price" in context.summary.lower()


async def test_long_call_with_llm_summarizes_through_the_api() -> None:
    async with OpenAIStandin(api_key="sk-test") as standin:
        standin.reply = "Sure. The basic plan is 20 dollars a month."
        agent = OpenAIChatAgent("sk-test", standin.base_url, timeout_s=5,
                                first_token_timeout_s=5)
        try:
            context, sizes = await _long_call(agent, 40)
        finally:
            await agent.aclose()
        summary_requests = [r for r in standin.requests
                            if r.json and not r.json.get("stream")]
    assert context.summaries_made >= 2
    assert summary_requests, "the summary is a real LLM request"
    assert context.summary  # what the LLM answered
    assert max(sizes) <= context.max_tokens + 60
    unbounded = sizes[0] + 39 * (sizes[5] - sizes[0]) / 5
    assert sum(sizes[-10:]) / 10 <= 0.6 * unbounded


async def test_summaries_are_booked_through_the_agent_chain() -> None:
    async with OpenAIStandin(api_key="sk-test") as standin:
        standin.reply = "Sure. The basic plan is 20 dollars a month."
        agent = FallbackAgent([OpenAIChatAgent("sk-test", standin.base_url, timeout_s=5,
                                               first_token_timeout_s=5)],
                              first_token_timeout_s=5)
        booked: list[Usage] = []
        try:
            with bill_to(booked.append):
                context, _ = await _long_call(agent, 30)
        finally:
            await agent.aclose()
        summaries = [r for r in standin.requests if r.json and not r.json.get("stream")]
    assert context.summaries_made >= 1 and summaries
    # Replies and summaries alike: what the vendor billed is what was booked.
    assert Counter((u.input_tokens, u.output_tokens) for u in booked) == \
        Counter((u.input_tokens, u.output_tokens) for u in standin.bill())
    assert not any(u.estimated for u in booked)


def test_sentences_stream_as_soon_as_complete() -> None:
    agg = SentenceAggregator()
    out: list[str] = []
    for piece in ["The basic plan", " costs $4.99 a month", ". Dr. Smith", " can help", "! Bye"]:
        out += agg.push(piece)
    assert out == ["The basic plan costs $4.99 a month.", "Dr. Smith can help!"]
    assert agg.flush() == "Bye"
