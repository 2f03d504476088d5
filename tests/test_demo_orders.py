"""The demo's order lookup: the offline FAQ agent speaks the tool protocol (asks for the
`order_status` tool with the number the caller said, answers from its result), the demo's
order service is a real HTTP server, the answer key scores looked-up answers, and end to
end a simulated caller asks where order 4471 is and hears the service's answer."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.bus.events import CallStarted, ToolCalled, TranscriptLine
from engine.config import Config, load_config
from engine.providers.base import (
    AgentDone,
    AgentEvent,
    ChatMessage,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
)
from engine.providers.builtin.agent_faq import FaqAgent
from engine.providers.faq.lookup import LOOKUP_FAILED
from engine.providers.faq.numbers import heard_number
from engine.sim.order_service import ORDER_STATUS_PARAMETERS, OrderService
from engine.sim.scenario import Scenario, bundled_scenarios_dir
from engine.sim.scoring import AnswerKey, word_errors
from switchboard.demo import ORDER_TOOL, demo_config, with_order_lookup
from switchboard.demo_watch import DemoWatcher
from tests.harness import EventLog, base_sections, make_local_engine, running_engine

ROOT = Path(__file__).resolve().parent.parent
ORDER_SPEC = ToolSpec(ORDER_TOOL, "Look up an order.", ORDER_STATUS_PARAMETERS)


def order_config() -> Config:
    config = load_config(ROOT / "config.toml", env={})
    with_order_lookup(config, "http://127.0.0.1:9/orders/status")
    return config


async def collect(agent: FaqAgent, messages: list[ChatMessage],
                  tools: tuple[ToolSpec, ...] = (ORDER_SPEC,)) -> list[AgentEvent]:
    return [event async for event in agent.respond(messages, tools)]


def text_of(events: list[AgentEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def done_of(events: list[AgentEvent]) -> AgentDone:
    done = events[-1]
    assert isinstance(done, AgentDone)
    return done


@pytest.mark.parametrize("said", ["Where is my order 4471?", "Hi. Where is my order 4471?",
                                  "where is my order four four seven one",
                                  "What is the status of order 4,471?"])
def test_the_order_number_is_read_from_the_callers_words(said: str) -> None:
    number = heard_number(said)
    assert number is not None and number.value == "4471"


async def test_faq_agent_asks_for_the_tool_then_answers_from_its_result() -> None:
    config = order_config()
    agent = FaqAgent(config.faq)
    question = [ChatMessage("system", "You are Acme's phone assistant."),
                ChatMessage("user", "Hi. Where is my order 4471?")]
    first = await collect(agent, question)
    [request] = [e for e in first if isinstance(e, ToolCallRequest)]
    assert request.name == ORDER_TOOL and json.loads(request.arguments) == {"order_id": "4471"}
    assert done_of(first).action == "tool_calls" and not text_of(first)

    result = json.dumps({"order_id": "4471", "status": "shipped", "eta": "Thursday"})
    conversation = [*question, ChatMessage("assistant", "", tool_calls=(request,)),
                    ChatMessage("tool", result, tool_call_id=request.call_id)]
    second = await collect(agent, conversation)
    assert text_of(second) == "Order 4471 is shipped, arriving Thursday."
    done = done_of(second)
    # This caller's own answer: never cached for the next one who asks.
    assert done.action == "answer" and done.cache_key is None
    assert AnswerKey(config).entry(text_of(second)) == "order_status"


@pytest.mark.parametrize("result", ['{"error": "no order 4471"}', "<html>oops</html>",
                                    '{"status": "shipped"}', '{"status": {}, "eta": 1}'])
async def test_a_result_the_answer_cannot_be_made_from_gets_a_graceful_line(
        result: str) -> None:
    config = order_config()
    agent = FaqAgent(config.faq)
    request = ToolCallRequest("call_1", ORDER_TOOL, '{"order_id": "4471"}')
    events = await collect(agent, [
        ChatMessage("user", "Where is my order 4471?"),
        ChatMessage("assistant", "", tool_calls=(request,)),
        ChatMessage("tool", result, tool_call_id="call_1")])
    entry = next(e for e in config.faq.entries if e.id == ORDER_TOOL)
    assert text_of(events) == f"{LOOKUP_FAILED} {entry.answer}"
    assert done_of(events).action == "answer"


@pytest.mark.parametrize(("said", "tools"), [
    ("Where is my order?", (ORDER_SPEC,)),  # no number: nothing to look up
    ("Where is my order 4471?", ()),  # the tool is not offered
    ("What are your opening hours?", (ORDER_SPEC,)),
])
async def test_without_a_number_or_the_tool_the_faq_answers_as_before(
        said: str, tools: tuple[ToolSpec, ...]) -> None:
    config = order_config()
    events = await collect(FaqAgent(config.faq), [ChatMessage("user", said)], tools)
    assert not any(isinstance(e, ToolCallRequest) for e in events)
    assert done_of(events).action == "answer" and text_of(events)


async def test_an_integer_argument_is_sent_as_a_number() -> None:
    config = order_config()
    spec = ToolSpec(ORDER_TOOL, "Look up an order.", {
        "type": "object", "properties": {"order_id": {"type": "integer"}}})
    events = await collect(FaqAgent(config.faq),
                           [ChatMessage("user", "Where is my order 4471?")], (spec,))
    [request] = [e for e in events if isinstance(e, ToolCallRequest)]
    assert json.loads(request.arguments) == {"order_id": 4471}


async def test_order_service_answers_over_http() -> None:
    service = OrderService(token="s3cret")
    url = await service.start()
    headers = {"Authorization": "Bearer s3cret"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={"order_id": "4471"}, headers=headers) as resp:
                assert resp.status == 200
                assert await resp.json() == {"order_id": "4471", "status": "shipped",
                                             "eta": "Thursday"}
            async with http.post(url, json={"order_id": "1"}, headers=headers) as resp:
                assert resp.status == 404 and "error" in await resp.json()
            async with http.post(url, data=b"not json", headers=headers) as resp:
                assert resp.status == 400
            async with http.post(url, json={"order_id": "4471"}) as resp:
                assert resp.status == 401
    finally:
        await service.stop()
    assert service.requests == [{"order_id": "4471"}, {"order_id": "1"}]


def test_the_demo_scenario_and_config_look_the_order_up() -> None:
    scenario = Scenario.from_file(bundled_scenarios_dir() / "order-status.toml")
    assert "4471" in (scenario.steps[0].say or "")
    assert scenario.expected()[scenario.steps[0].say or ""] == "order_status"
    config = demo_config(load_config(ROOT / "config.toml", env={}))
    with_order_lookup(config, "http://127.0.0.1:8123/orders/status")
    [tool] = [t for t in config.tools if t.name == ORDER_TOOL]
    assert tool.url == "http://127.0.0.1:8123/orders/status" and tool.idempotent
    entry = next(e for e in config.faq.entries if e.id == "order_status")
    assert entry.tool == ORDER_TOOL and entry.tool_argument == "order_id"
    assert "{status}" in entry.tool_answer


def test_the_demo_prints_the_lookup_and_scores_past_a_filler_line() -> None:
    out = io.StringIO()
    watcher = DemoWatcher(out, fillers=["Let me check that for you."])
    watcher.scenario_of["+15550100018"] = "order-status"
    watcher.handle(CallStarted(call_sid="CA1", from_number="+15550100018"))
    for speaker, text in (("caller", "Where is my order 4,471?"),
                          ("agent", "Let me check that for you."),
                          ("agent", "Order 4471 is shipped, arriving Thursday.")):
        watcher.handle(TranscriptLine(call_sid="CA1", speaker=speaker,  # type: ignore[arg-type]
                                      text=text, line_id=text))
    watcher.handle(ToolCalled(call_sid="CA1", name=ORDER_TOOL, arguments={"order_id": "4471"},
                              summary="shipped", latency_s=0.012))
    assert "tool: looked up order_status {order_id: 4471} -> shipped (12 ms)" in out.getvalue()
    # The answer the scoring reads is the one after the filler.
    assert [h.text for h in watcher.calls["CA1"].timeline] == [
        "Where is my order 4,471?", "Order 4471 is shipped, arriving Thursday."]
    # A number written with a thousands separator is the scripted number.
    assert word_errors("Where is my order 4471?", "Where is my order 4,471?").errors == 0


# -- end to end: engine + order service + a simulated caller ----------------------------


@pytest.mark.slow
async def test_a_caller_asks_where_order_4471_is_and_hears_the_services_answer(
        tmp_path: Path) -> None:
    """Needs the turn loop that runs tools (engine/session/replying.py, issue 13)."""
    service = OrderService()
    url = await service.start()
    shipped = load_config(ROOT / "config.toml", env={})
    with_order_lookup(shipped, url)
    sections: dict[str, dict[str, Any]] = base_sections()
    sections["faq"] = shipped.faq.model_dump()
    # Deadlines for a busy test machine (the answer is what is tested, not the speed).
    sections["providers"] = {"stt_timeout_s": 15.0, "tts_first_audio_timeout_s": 10.0}

    async def make(config: Config):  # type: ignore[no-untyped-def]
        config.tools.extend(shipped.tools)  # the order service, as the demo configures it
        return await make_local_engine(config)

    try:
        async with running_engine(tmp_path, make, None, **sections) as run:
            events = EventLog(run)
            caller = run.caller()
            scenario = Scenario.from_file(bundled_scenarios_dir() / "order-status.toml")
            result = await asyncio.wait_for(caller.run(scenario), 90)
            await run.engine.hub.drain()
            await events.close()
    finally:
        await service.stop()
    assert result.error is None
    assert service.requests == [{"order_id": "4471"}]
    [tool] = [e for e in events.events if isinstance(e, ToolCalled)]
    assert (tool.name, tool.arguments, tool.outcome) == \
        (ORDER_TOOL, {"order_id": "4471"}, "ok")
    agent = [e.text for e in events.events if isinstance(e, TranscriptLine)
             and e.speaker == "agent" and e.final]
    assert "Order 4471 is shipped, arriving Thursday." in agent, agent
