"""Tools in real phone calls: a simulated caller (Twilio's protocol, real audio) talks to
an engine whose recognizer, LLM agent and voice are the OpenAI stand-in (through the real
`openai` SDK), and whose `[[tools]]` endpoint is a local aiohttp server playing the
business's order API. A lookup answered within one turn, a filler line on a slow tool, a
failing tool, a transfer by tool, and a barge-in while a tool runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bus import events as ev
from engine.config import Config
from engine.sim.call_result import CallResult
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_tools import ScriptedCall, ScriptedRound, ToolRule
from engine.wiring import build_engine
from tests.harness import EventLog, RunningEngine, base_sections, running_engine
from tests.tool_service import OrderApi

ORDER_SCHEMA = {"type": "object", "required": ["order_id"], "additionalProperties": False,
                "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{3,10}$"}}}
FILLER = "Let me check that for you."


def order_answer(results: list[str]) -> str:
    found = json.loads(results[-1])
    return f"Your order {found['order_id']} is {found['status']}."


@dataclass
class ToolCall:
    run: RunningEngine
    events: EventLog
    openai: OpenAIStandin
    api: OrderApi

    async def call(self, *steps: Step, hangup: bool = True) -> CallResult:
        caller = self.run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(
            name="tools", steps=list(steps), hangup_at_end=hangup)), 90)
        await asyncio.sleep(0.2)
        await self.run.engine.hub.drain()
        return result

    def agent_lines(self, call_sid: str) -> list[ev.TranscriptLine]:
        greeting = self.run.config.engine.greeting
        return [e for e in self.events.lines(call_sid, "agent") if e.text != greeting]

    def tools(self, call_sid: str) -> list[ev.ToolCalled]:
        return [e for e in self.events.events
                if isinstance(e, ev.ToolCalled) and e.call_sid == call_sid]

    def llm_costs(self, call_sid: str) -> list[ev.UsageCost]:
        return [e for e in self.events.events if isinstance(e, ev.UsageCost)
                and e.call_sid == call_sid and e.kind == "llm"]


@asynccontextmanager
async def tool_engine(tmp_path: Path, heard: list[str], rules: list[ToolRule],
                      tool: dict[str, Any] | None = None, stt: str = "openai",
                      **sections: dict[str, Any]) -> AsyncIterator[ToolCall]:
    """An engine on the OpenAI stand-in; the recognizer (`stt`) hears `heard`, line by
    line."""
    api, openai = OrderApi(), OpenAIStandin(api_key="sk-test")
    api_url, oa_url = await api.start(), await openai.start()
    lines = iter(heard)
    last = [heard[-1]]
    openai.transcript = lambda _seconds: next(lines, last[0])
    openai.tool_rules = rules
    openai.reply = "We are open from nine to five."
    all_sections = base_sections()
    all_sections["providers"] = {
        "stt": [stt], "agent": ["openai"], "tts": ["openai"],
        "openai": {"api_key": "sk-test", "base_url": oa_url, "stt_model": "whisper-1"}}
    all_sections["engine"] = {"greeting": "Hello."}  # short: calls run in real time
    all_sections.update(sections)

    async def make(config: Config):  # type: ignore[no-untyped-def]
        entry = {"name": "lookup_order", "description": "Look up an order by its number.",
                 "url": api_url, "parameters": ORDER_SCHEMA, **(tool or {})}
        config.tools.append(type(config).model_validate({"tools": [entry]}).tools[0])
        return await build_engine(config, history=False, supervisor_api=False)

    try:
        async with running_engine(tmp_path, make_engine=make, **all_sections) as run:
            events = EventLog(run)
            try:
                yield ToolCall(run, events, openai, api)
            finally:
                await events.close()
    finally:
        await openai.stop()
        await api.stop()


def texts(lines: list[ev.TranscriptLine]) -> list[str]:
    return [line.text for line in lines]


async def test_a_lookup_is_answered_in_the_turn_and_a_slow_one_gets_a_filler(
        tmp_path: Path) -> None:
    rules = [ToolRule.single("4471", "lookup_order", {"order_id": "4471"}, order_answer),
             ToolRule.single("5000", "lookup_order", {"order_id": "5000"}, order_answer)]
    heard = ["Where is my order 4471?", "And my order 5000?"]
    async with tool_engine(tmp_path, heard, rules,
                           tool_use={"filler_after_ms": 400}) as t:
        t.api.delay_s = 0.0
        slow_second: Callable[[], None] = lambda: setattr(t.api, "delay_s", 1.2)  # noqa: E731
        result = await t.call(Step(say="Where is my order 4471?"))
        slow_second()
        second = await t.call(Step(say="And my order five thousand?"))
    assert result.error is None and second.error is None
    # Looked up and answered within the turn, no filler needed.
    assert texts(t.agent_lines(result.call_sid)) == ["Your order 4471 is shipped."]
    [lookup] = t.tools(result.call_sid)
    assert (lookup.name, lookup.arguments, lookup.outcome, lookup.summary) == \
        ("lookup_order", {"order_id": "4471"}, "ok", "order 4471: shipped")
    # Both LLM rounds are on the bill.
    assert len(t.llm_costs(result.call_sid)) == 2
    # The slow one: the caller heard the filler, then the answer, in one line.
    assert texts(t.agent_lines(second.call_sid)) == [f"{FILLER} Your order 5000 is being "
                                                     "packed."]
    [slow] = t.tools(second.call_sid)
    assert slow.outcome == "ok" and slow.latency_s >= 1.2
    assert t.api.requests == [{"order_id": "4471"}, {"order_id": "5000"}]


async def test_a_failing_tool_ends_in_the_graceful_line_and_the_call_goes_on(
        tmp_path: Path) -> None:
    rules = [ToolRule.single("order", "lookup_order", {"order_id": "4471"}, order_answer)]
    heard = ["Where is my order?", "Where is my order now?", "Is my order there?",
             "What are your hours?"]
    async with tool_engine(tmp_path, heard, rules, tool={"timeout_s": 0.6},
                           tool_use={"filler_after_ms": 5000}) as t:
        t.api.plan = ["500", "garbage", "hang"]
        t.api.hang_s = 3.0
        result = await t.call(Step(say="Where is my order?"),
                              Step(say="Where is my order now?"),
                              Step(say="Is my order there?"),
                              Step(say="What are your hours?"))
        failure_line = t.run.config.tool_use.failure_line
    assert result.error is None
    assert texts(t.agent_lines(result.call_sid)) == \
        [failure_line] * 3 + ["We are open from nine to five."]
    outcomes = [(e.outcome, e.turn) for e in t.tools(result.call_sid)]
    assert outcomes == [("error", 1), ("error", 2), ("timeout", 3)]
    assert len(t.api.requests) == 3  # never retried: the tool is not idempotent


async def test_the_agent_transfers_the_call_with_its_transfer_tool(tmp_path: Path) -> None:
    put_through = ScriptedRound([ScriptedCall("transfer_call", {"destination": "Billing"})],
                                say="I'll put you through to Billing.")
    rules = [ToolRule("billing", [put_through], "unused")]
    async with tool_engine(
            tmp_path, ["I have a question about my bill, billing please."], rules,
            tool_use={"builtins": True},
            transfer={"destinations": [{"name": "Billing", "number": "+15550100901"},
                                       {"name": "Sales", "number": "+15550100902"}]}) as t:
        result = await t.call(Step(say="I have a question about my bill."), hangup=False)
        updates = t.run.rest.updates_for(result.call_sid)
    assert result.ended_by == "redirect"
    assert any("+15550100901" in str(u.form) for u in updates), updates
    assert texts(t.agent_lines(result.call_sid)) == ["I'll put you through to Billing."]
    [transfer] = t.tools(result.call_sid)
    assert (transfer.name, transfer.arguments, transfer.outcome, transfer.summary) == \
        ("transfer_call", {"destination": "Billing"}, "ok", "transfer to Billing")
    [chat] = [r.json for r in t.openai.requests if r.path.endswith("/chat/completions")]
    offered = {tool["function"]["name"] for tool in chat["tools"]}  # no round after it
    assert offered == {"lookup_order", "transfer_call", "end_call", "hand_to_human"}


async def test_a_barge_in_during_a_tool_call_discards_it_and_its_round_stays_billed(
        tmp_path: Path) -> None:
    rules = [ToolRule.single("4471", "lookup_order", {"order_id": "4471"}, order_answer)]
    heard = ["Where is my order 4471?", "Actually, what are your hours?"]
    async with tool_engine(tmp_path, heard, rules,
                           tool_use={"filler_after_ms": 300}) as t:
        t.api.delay_s = 4.0
        result = await t.call(Step(say="Where is my order 4471?"),
                              Step(say="Actually what are your hours", barge_in=True,
                                   after_s=0.3))
        chats = [r.json for r in t.openai.requests if r.path.endswith("/chat/completions")]
        billed = [u for u in t.openai.bill() if u.kind == "llm"]
    assert result.error is None
    [lookup] = t.tools(result.call_sid)
    assert lookup.outcome == "discarded" and lookup.turn == 1
    lines = t.agent_lines(result.call_sid)
    assert lines[0].interrupted and lines[0].text.startswith("Let me check"), lines
    assert lines[-1].text == "We are open from nine to five."
    # The tool round was billed by the vendor and booked on the call; no round used the
    # discarded result.
    assert [bool(c.get("tools")) for c in chats].count(True) == len(chats)
    assert not any(m["role"] == "tool" for c in chats for m in c["messages"])
    booked = t.llm_costs(result.call_sid)
    assert len(booked) == len(chats) >= 2
    assert sorted((c.input_tokens, c.output_tokens) for c in booked) == \
        sorted((u.input_tokens, u.output_tokens) for u in billed)
