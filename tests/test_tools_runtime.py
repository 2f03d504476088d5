"""The tool runtime without a phone call: `[[tools]]` config checked at start, the HTTP
tool against a real local server (auth, failures, retries), and whole tool turns with the
real `openai` SDK client against the OpenAI stand-in (schema rejections fed back once,
round limits, a barge-in while a tool runs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.bus import events as ev
from engine.config import Config, ConfigError, load_config
from engine.hub import OpsHub
from engine.providers.base import (
    AgentDone,
    AgentEvent,
    ChatMessage,
    TextDelta,
    Usage,
)
from engine.providers.booking import bill_to
from engine.providers.builtin.llm_openai import OpenAIChatAgent
from engine.providers.fallback import FallbackAgent
from engine.session.call_session import CallSession
from engine.session.records import TurnRecord
from engine.session.tool_turns import EngineLine, ToolTurn
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_tools import ScriptedCall, ScriptedRound, ToolRule
from engine.tools.registry import ToolBox
from tests.test_billing import _Control
from tests.tool_service import OrderApi

SID = "CA" + "7" * 32
ORDER_SCHEMA = {"type": "object", "required": ["order_id"], "additionalProperties": False,
                "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{3,10}$"}}}


def tool_config(url: str, **tool: Any) -> Config:
    use = tool.pop("tool_use", {})
    entry = {"name": "lookup_order", "description": "Look up an order by its number.",
             "url": url, "parameters": ORDER_SCHEMA, **tool}
    return Config.model_validate({"tools": [entry], "tool_use": use,
                                  "transfer": {"number": "+15550100999"}})


# -- config: checked at start --------------------------------------------------------------


def test_an_invalid_schema_stops_the_engine_at_start_naming_the_tool(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[tools]]\nname = "book_table"\ndescription = "Book a table."\n'
                    'url = "https://bookings.example.com/book"\n'
                    'parameters = \'{"type": "object", "properties": '
                    '{"people": {"type": "integr"}}}\'\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "book_table" in str(caught.value) and "integr" in str(caught.value)


@pytest.mark.parametrize(("change", "expected"), [
    ({"url_": "http://orders.example.com/x"}, "must be https"),
    ({"parameters": {"type": "array"}}, '"type": "object"'),
    ({"auth_header": "Authorization"}, "go together"),
    ({"name": "end_call"}, "built-in"),
])
def test_other_bad_tool_entries_are_refused_with_the_tools_name(change: dict[str, Any],
                                                                 expected: str) -> None:
    url = change.pop("url_", "https://orders.example.com/x")
    with pytest.raises(ValueError) as caught:
        tool_config(url, **change)
    assert expected in str(caught.value)
    assert "lookup_order" in str(caught.value) or change.get("name") == "end_call"


def test_a_missing_secret_stops_the_engine_naming_the_variable() -> None:
    config = tool_config("https://orders.example.com/x", auth_header="Authorization",
                         auth_env="ORDERS_KEY")
    with pytest.raises(ConfigError, match=r"lookup_order.*ORDERS_KEY"):
        ToolBox.from_config(config, env={})
    # No tools and no built-ins: none offered (requests carry no tool definitions).
    assert ToolBox.from_config(Config(tool_use={"builtins": False}), env={}) is None
    default = ToolBox.from_config(Config(), env={})  # built-ins on by default
    assert default is not None and [s.name for s in default.specs] == ["end_call"]


# -- the HTTP tool ---------------------------------------------------------------------------


async def test_the_tool_posts_the_arguments_with_the_secret_and_returns_json() -> None:
    api = OrderApi()
    url = await api.start()
    config = tool_config(url, auth_header="X-Api-Key", auth_env="ORDERS_KEY")
    box = ToolBox(config, env={"ORDERS_KEY": "k-123"})
    try:
        result = await box.http_tool("lookup_order").call(box.http(), {"order_id": "4471"})
    finally:
        await box.aclose()
        await api.stop()
    assert api.requests == [{"order_id": "4471"}]
    assert api.headers[0]["X-Api-Key"] == "k-123"
    assert result.outcome == "ok" and result.summary == "order 4471: shipped"
    assert json.loads(result.content)["status"] == "shipped"


@pytest.mark.parametrize(("behaviour", "outcome"),
                         [("500", "error"), ("garbage", "error"), ("hang", "timeout"),
                          ("huge", "error")])
async def test_a_failing_endpoint_is_a_failed_result_and_one_log_line(
        behaviour: str, outcome: str) -> None:
    api = OrderApi(behaviour=behaviour)  # type: ignore[arg-type]
    url = await api.start()
    box = ToolBox(tool_config(url, timeout_s=0.4), env={})
    try:
        with capture_logs() as logs:
            result = await box.http_tool("lookup_order").call(box.http(), {"order_id": "1"},
                                                               call_sid=SID)
    finally:
        await box.aclose()
        await api.stop()
    assert result.outcome == outcome
    assert len(api.requests) == 1  # not idempotent: never tried again
    failures = [e for e in logs if e["event"] == "tool.failed"]
    assert len(failures) == 1 and failures[0]["call_sid"] == SID
    assert failures[0]["tool"] == "lookup_order"
    assert "error" in json.loads(result.content)


async def test_an_idempotent_lookup_is_retried_after_a_500_but_not_after_a_timeout() -> None:
    api = OrderApi(behaviour="500")
    url = await api.start()
    box = ToolBox(tool_config(url, idempotent=True, retries=2, timeout_s=0.3), env={})
    try:
        failed = await box.http_tool("lookup_order").call(box.http(), {"order_id": "1"})
        assert failed.outcome == "error" and len(api.requests) == 3
        api.behaviour, api.requests = "hang", []
        timed_out = await box.http_tool("lookup_order").call(box.http(), {"order_id": "1"})
        assert timed_out.outcome == "timeout" and len(api.requests) == 1
    finally:
        await box.aclose()
        await api.stop()


# -- whole tool turns against the OpenAI stand-in ---------------------------------------------


class Turn:
    """One caller turn with tools, through a real agent chain and a real hub."""

    def __init__(self, config: Config, standin: OpenAIStandin) -> None:
        self.hub = OpsHub.from_config(config)
        self.published: list[ev.EventBase] = []
        self.hub.publish = self.published.append  # type: ignore[method-assign]
        self.session = CallSession(SID, config, tts=None, control=_Control(),  # type: ignore[arg-type]
                                   observer=self.hub)
        self.hub.call_created(self.session)
        self.agent = FallbackAgent([OpenAIChatAgent(
            "sk-test", standin.base_url, model="gpt-4o-mini", reasoning_effort="",
            timeout_s=5, first_token_timeout_s=5)], first_token_timeout_s=5)
        self.box = ToolBox(config, env={})
        self.record = TurnRecord(idx=1, caller_text="")
        self.tools = ToolTurn(self.session, self.box, self.record)
        self.booked: list[Usage] = []

    async def run(self, question: str) -> list[AgentEvent]:
        self.record.caller_text = question
        messages = [ChatMessage("system", "You are Acme's phone agent."),
                    ChatMessage("user", question)]
        with bill_to(self.booked.append):
            return [e async for e in self.tools.events(self.agent, messages)]

    def tool_events(self) -> list[ev.ToolCalled]:
        return [e for e in self.published if isinstance(e, ev.ToolCalled)]

    async def close(self) -> None:
        await self.agent.aclose()
        await self.box.aclose()


def said(events: list[AgentEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


def answer_from(results: list[str]) -> str:
    found = json.loads(results[-1])
    return f"Your order {found['order_id']} is {found['status']}."


async def test_invented_arguments_are_rejected_before_any_request_and_fed_back_once() -> None:
    api = OrderApi()
    url = await api.start()
    async with OpenAIStandin() as standin:
        standin.tool_rules = [ToolRule("order", [
            ScriptedRound([ScriptedCall("lookup_order", {"order_id": "the big one"})]),
            ScriptedRound([ScriptedCall("lookup_order", {"order_id": "4471"})])],
            answer_from)]
        turn = Turn(tool_config(url), standin)
        try:
            events = await turn.run("Where is my order 4471?")
        finally:
            await turn.close()
            await api.stop()
    assert api.requests == [{"order_id": "4471"}]  # the invented one never left
    assert said(events) == "Your order 4471 is shipped."
    assert [(r.outcome, r.round) for r in turn.record.tool_calls] == \
        [("rejected", 1), ("ok", 2)]
    # The model was told why, as that call's result, and tried again.
    second = standin.requests[1].json["messages"]
    assert second[-1]["role"] == "tool" and "invalid arguments" in second[-1]["content"]
    assert [e.outcome for e in turn.tool_events()] == ["rejected", "ok"]
    # Three LLM rounds, each booked as the vendor billed it.
    assert len(turn.booked) == 3 == len(standin.bill())
    assert isinstance(events[-1], AgentDone) and events[-1].action == "answer"


async def test_the_same_mistake_twice_ends_in_the_failure_line_without_a_request() -> None:
    api = OrderApi()
    url = await api.start()
    bad = ScriptedRound([ScriptedCall("lookup_order", '{"order_id": 4471')])  # not JSON
    async with OpenAIStandin() as standin:
        standin.tool_rules = [ToolRule("order", [bad, bad, bad], answer_from)]
        config = tool_config(url)
        turn = Turn(config, standin)
        try:
            events = await turn.run("Where is my order?")
        finally:
            await turn.close()
            await api.stop()
    assert api.requests == []
    assert said(events) == config.tool_use.failure_line
    assert isinstance(events[-2], EngineLine)
    assert [r.outcome for r in turn.record.tool_calls] == ["rejected", "rejected"]
    assert len(standin.requests) == 2  # no round after the second mistake


async def test_rounds_stop_at_the_configured_limit() -> None:
    api = OrderApi()
    url = await api.start()
    again = ScriptedRound([ScriptedCall("lookup_order", {"order_id": "5000"})])
    async with OpenAIStandin() as standin:
        standin.tool_rules = [ToolRule("order", [again] * 5, answer_from)]
        config = tool_config(url, tool_use={"max_rounds": 2})
        turn = Turn(config, standin)
        try:
            events = await turn.run("Where is my order?")
        finally:
            await turn.close()
            await api.stop()
    assert len(api.requests) == 2 and len(standin.requests) == 3
    assert [r.outcome for r in turn.record.tool_calls] == ["ok", "ok", "rejected"]
    assert said(events) == config.tool_use.failure_line


async def test_a_barge_in_while_a_tool_runs_discards_it_and_keeps_the_rounds_cost() -> None:
    api = OrderApi(delay_s=3.0)
    url = await api.start()
    async with OpenAIStandin() as standin:
        standin.tool_rules = [ToolRule.single("order", "lookup_order", {"order_id": "4471"},
                                              answer_from)]
        turn = Turn(tool_config(url, tool_use={"filler_after_ms": 200}), standin)
        seen: list[AgentEvent] = []

        async def consume() -> None:
            with bill_to(turn.booked.append):
                messages = [ChatMessage("user", "Where is my order 4471?")]
                async for event in turn.tools.events(turn.agent, messages):
                    seen.append(event)

        task = asyncio.create_task(consume())
        try:
            for _ in range(200):  # the filler means the tool is running
                if seen:
                    break
                await asyncio.sleep(0.02)
            task.cancel()  # the caller spoke over the filler
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await turn.close()
            await api.stop()
    assert [e.text for e in seen] == ["Let me check that for you. "]
    [record] = turn.record.tool_calls
    assert record.outcome == "discarded" and record.latency_s > 0.1
    assert [e.outcome for e in turn.tool_events()] == ["discarded"]
    # The round that asked for the tool is on the bill; no round ran after it.
    assert len(standin.requests) == 1
    assert [(u.input_tokens, u.output_tokens) for u in turn.booked] == \
        [(u.input_tokens, u.output_tokens) for u in standin.bill()]
