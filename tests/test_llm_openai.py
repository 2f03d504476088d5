"""OpenAIChatAgent through the real `openai` SDK against the local OpenAI stand-in."""

from __future__ import annotations

import re

import pytest

from engine.config import Config
from engine.providers.base import Agent, AgentDone, ChatMessage, ProviderError, TextDelta
from engine.providers.builtin.llm_openai import OpenAIChatAgent
from engine.providers.registry import registry
from engine.sim.standins.openai_api import OpenAIStandin
from tests.cloud_fixtures import OPENAI_KEY, Stopwatch, closed_port_url, collect

CONVERSATION = [ChatMessage("system", "You are the phone assistant of Acme."),
                ChatMessage("user", "What are your opening hours?")]
REPLY = "We are open from nine to five, Monday to Friday, and closed on public holidays."


def make_agent(base_url: str, timeout_s: float = 5.0,
               first_token_timeout_s: float = 3.0) -> OpenAIChatAgent:
    # gpt-4o-mini does not reason: no reasoning effort, the classic request.
    return OpenAIChatAgent(api_key=OPENAI_KEY, base_url=base_url, model="gpt-4o-mini",
                           temperature=0.2, max_tokens=120, timeout_s=timeout_s,
                           first_token_timeout_s=first_token_timeout_s, reasoning_effort="")


async def test_streamed_reply_usage_and_timing() -> None:
    async with OpenAIStandin() as server:
        server.reply = REPLY
        server.cached_tokens = 17
        server.latency_s = 0.15
        server.token_interval_s = 0.01
        agent = make_agent(server.base_url)
        assert isinstance(agent, Agent)
        events = await collect(agent.respond(CONVERSATION))
        await agent.aclose()

    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == re.findall(r"\s*\S+", REPLY)  # every token, in order
    done = events[-1]
    assert isinstance(done, AgentDone) and sum(isinstance(e, AgentDone) for e in events) == 1
    sent = server.last_usage
    assert sent is not None
    assert done.usage.input_tokens == sent["prompt_tokens"]
    assert done.usage.cached_input_tokens == 17
    assert done.usage.output_tokens == sent["completion_tokens"] == len(deltas)
    assert not done.usage.estimated
    assert (done.usage.provider, done.usage.kind, done.usage.model) == ("openai", "llm",
                                                                          "gpt-4o-mini")
    assert done.timing.first_byte_s is not None
    assert 0.15 <= done.timing.first_byte_s < done.timing.total_s

    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    body = request.json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] == 120
    assert body["temperature"] == 0.2
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in CONVERSATION]


async def test_reply_can_depend_on_the_question_and_prefix_cache_is_reported() -> None:
    long_system = "Policy: " + "refunds are processed within five days. " * 150
    async with OpenAIStandin() as server:
        server.reply = lambda question: f"You asked: {question}"
        agent = make_agent(server.base_url)
        first = await collect(agent.respond([ChatMessage("system", long_system),
                                             ChatMessage("user", "first question")]))
        second = await collect(agent.respond([ChatMessage("system", long_system),
                                              ChatMessage("user", "second question")]))
        await agent.aclose()
    assert "".join(e.text for e in second if isinstance(e, TextDelta)) == \
        "You asked: second question"
    first_done, second_done = first[-1], second[-1]
    assert isinstance(first_done, AgentDone) and isinstance(second_done, AgentDone)
    assert first_done.usage.cached_input_tokens == 0  # nothing seen before
    cached = second_done.usage.cached_input_tokens
    assert cached >= 1024 and cached % 128 == 0 and cached <= second_done.usage.input_tokens


@pytest.mark.parametrize(("mode", "status", "retryable"),
                         [("401", 401, False), ("429", 429, True), ("500", 500, True)])
async def test_http_errors_map_to_provider_error(mode: str, status: int,
                                                 retryable: bool) -> None:
    async with OpenAIStandin() as server:
        server.mode = mode  # type: ignore[assignment]
        agent = make_agent(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(agent.respond(CONVERSATION))
        await agent.aclose()
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert info.value.provider == "openai"
    assert len(server.requests) == 1  # max_retries=0: the fallback chain decides, not the SDK


async def test_wrong_api_key_is_not_retryable() -> None:
    async with OpenAIStandin(api_key="sk-other") as server:
        agent = make_agent(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(agent.respond(CONVERSATION))
        await agent.aclose()
    assert info.value.status == 401 and not info.value.retryable
    assert "Incorrect API key" in str(info.value)


async def test_request_timeout_is_bounded() -> None:
    async with OpenAIStandin() as server:
        server.mode = "timeout"
        agent = make_agent(server.base_url, timeout_s=0.5, first_token_timeout_s=10.0)
        watch = Stopwatch()
        with pytest.raises(ProviderError) as info:
            await collect(agent.respond(CONVERSATION))
        elapsed = watch.elapsed
        await agent.aclose()
    assert elapsed < 2 * 0.5
    assert info.value.retryable and info.value.status is None
    assert "timed out" in str(info.value)


async def test_first_token_timeout_is_bounded() -> None:
    async with OpenAIStandin() as server:
        server.latency_s = 3.0
        agent = make_agent(server.base_url, timeout_s=10.0, first_token_timeout_s=0.3)
        watch = Stopwatch()
        with pytest.raises(ProviderError) as info:
            await collect(agent.respond(CONVERSATION))
        elapsed = watch.elapsed
        await agent.aclose()
    assert elapsed < 2 * 0.3
    assert info.value.retryable and "first token" in str(info.value)


async def test_connection_refused_is_retryable() -> None:
    agent = make_agent(closed_port_url("/v1"))
    with pytest.raises(ProviderError) as info:
        await collect(agent.respond(CONVERSATION))
    await agent.aclose()
    assert info.value.retryable and info.value.status is None


async def test_cut_stream_keeps_deltas_and_ends_with_estimated_usage() -> None:
    async with OpenAIStandin() as server:
        server.reply = REPLY
        server.mode = "cut"
        agent = make_agent(server.base_url)
        events = await collect(agent.respond(CONVERSATION))
        await agent.aclose()
    tokens = re.findall(r"\s*\S+", REPLY)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == tokens[:len(tokens) // 2]  # what arrived before the cut, in order
    done = events[-1]
    assert isinstance(done, AgentDone)
    assert done.usage.estimated
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0


async def test_closing_early_stops_the_server_stream() -> None:
    async with OpenAIStandin() as server:
        server.reply = " ".join(f"word{i}" for i in range(40))
        server.token_interval_s = 0.1
        agent = make_agent(server.base_url)
        stream = agent.respond(CONVERSATION)
        received = [await anext(stream), await anext(stream)]
        await stream.aclose()  # barge-in
        assert await server.wait_disconnect(within_s=2.0)
        await agent.aclose()
    assert all(isinstance(e, TextDelta) for e in received)
    assert server.requests[0].disconnected


async def test_summarize_is_a_plain_request() -> None:
    async with OpenAIStandin() as server:
        server.reply = "The caller asked about opening hours."
        agent = make_agent(server.base_url)
        summary, usage = await agent.summarize([*CONVERSATION, ChatMessage("assistant", REPLY)])
        await agent.aclose()
    assert summary == "The caller asked about opening hours."
    sent = server.last_usage
    assert sent is not None
    assert usage.input_tokens == sent["prompt_tokens"]
    assert usage.output_tokens == sent["completion_tokens"] and not usage.estimated
    body = server.requests[0].json
    assert not body.get("stream")
    assert body["messages"][0]["role"] == "system"
    assert "opening hours" in body["messages"][1]["content"]  # the turns to summarize


async def test_summarize_error_maps_to_provider_error() -> None:
    async with OpenAIStandin() as server:
        server.mode = "429"
        agent = make_agent(server.base_url)
        with pytest.raises(ProviderError) as info:
            await agent.summarize(CONVERSATION)
        await agent.aclose()
    assert info.value.status == 429 and info.value.retryable


# --- reasoning models -------------------------------------------------------------------


def configured_agent(base_url: str, **openai: object) -> OpenAIChatAgent:
    """The agent as the engine builds it from `[providers.openai]`."""
    config = Config.model_validate({"providers": {"openai": {
        "api_key": OPENAI_KEY, "base_url": base_url, "llm_max_tokens": 120, **openai}}})
    spec = registry.spec("agent", "openai")
    agent = spec.build(config.providers.settings("openai", spec.settings), config)
    assert isinstance(agent, OpenAIChatAgent)
    return agent


async def test_the_default_agent_asks_for_the_lowest_reasoning_effort() -> None:
    async with OpenAIStandin() as server:
        server.reply = REPLY
        agent = configured_agent(server.base_url)  # the shipped defaults
        events = await collect(agent.respond(CONVERSATION))
        summary, _ = await agent.summarize(CONVERSATION)
        await agent.aclose()
    assert isinstance(events[-1], AgentDone) and summary == REPLY
    streamed, summarized = (request.json for request in server.requests)
    for body in (streamed, summarized):
        assert body["model"] == "gpt-5.4-mini" and body["reasoning_effort"] == "none"
        # Reasoning models refuse max_tokens: the reply limit goes as max_completion_tokens.
        assert body["max_completion_tokens"] == 120 and "max_tokens" not in body
    assert streamed["stream"] is True and not summarized.get("stream")


async def test_a_configured_effort_is_sent_and_an_empty_one_is_not() -> None:
    async with OpenAIStandin() as server:
        low = configured_agent(server.base_url, llm_reasoning_effort="low")
        await collect(low.respond(CONVERSATION))
        await low.aclose()
        # A compatible server that rejects the parameter: "" sends the classic request.
        plain = configured_agent(server.base_url, llm_model="llama-3.1-8b",
                                 llm_reasoning_effort="")
        await collect(plain.respond(CONVERSATION))
        await plain.summarize(CONVERSATION)
        await plain.aclose()
    first, *rest = (request.json for request in server.requests)
    assert first["reasoning_effort"] == "low" and first["max_completion_tokens"] == 120
    assert len(rest) == 2
    for body in rest:
        assert "reasoning_effort" not in body and "max_completion_tokens" not in body
        assert body["max_tokens"] == 120 and body["model"] == "llama-3.1-8b"


def test_an_unknown_reasoning_effort_is_refused() -> None:
    with pytest.raises(ValueError, match=r"providers\.openai\.llm_reasoning_effort"):
        Config.model_validate({"providers": {"openai": {"llm_reasoning_effort": "lowest"}}})
