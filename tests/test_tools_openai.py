"""Function calling over the streamed chat API: the OpenAI agent offers the tools,
assembles tool-call deltas however they are cut, and sends the tool exchange back in the
chat format; checked through the real `openai` SDK client against the stand-in, which
streams calls in OpenAI's wire format and refuses what the real API refuses."""

from __future__ import annotations

import json

import pytest

from engine.providers.base import (
    AgentDone,
    ChatMessage,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
)
from engine.providers.builtin.llm_openai import OpenAIChatAgent
from engine.providers.builtin.openai_tool_calls import ToolCallAssembler
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_tools import ScriptedCall, ScriptedRound, ToolRule
from tests.cloud_fixtures import collect

LOOKUP = ToolSpec("lookup_order", "Look up an order by its number.",
                  {"type": "object", "required": ["order_id"],
                   "properties": {"order_id": {"type": "string"}}})
HOURS = ToolSpec("opening_hours", "Today's opening hours of a store.",
                 {"type": "object", "properties": {"store": {"type": "string"}}})
QUESTION = [ChatMessage("system", "You are Acme's phone agent."),
            ChatMessage("user", "Where is order 4471, and is the Main Street store open?")]
ARGS = [{"order_id": "4471", "note": "caller said \"urgent\" — ünïcode"},
        {"store": "Main Street"}]


def make_agent(base_url: str) -> OpenAIChatAgent:
    return OpenAIChatAgent(api_key="sk-test", base_url=base_url, model="gpt-4o-mini",
                           timeout_s=5.0, first_token_timeout_s=3.0, reasoning_effort="")


@pytest.mark.parametrize("chunk_chars", [1, 3, 7, 1000])
async def test_tool_calls_are_assembled_however_the_arguments_are_cut(
        chunk_chars: int) -> None:
    async with OpenAIStandin() as server:
        server.tool_chunk_chars = chunk_chars
        server.tool_rules = [ToolRule("order", [ScriptedRound(
            [ScriptedCall("lookup_order", ARGS[0]), ScriptedCall("opening_hours", ARGS[1])],
            say="Let me look.")])]
        agent = make_agent(server.base_url)
        events = await collect(agent.respond(QUESTION, [LOOKUP, HOURS]))
        await agent.aclose()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    done = events[-1]
    assert text == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("lookup_order", ARGS[0]), ("opening_hours", ARGS[1])]
    assert all(c.call_id.startswith("call_") for c in calls) and \
        calls[0].call_id != calls[1].call_id
    assert isinstance(done, AgentDone) and done.action == "tool_calls"
    assert done.usage.output_tokens == server.last_usage["completion_tokens"]  # type: ignore[index]
    assert not done.usage.estimated and not done.truncated
    body = server.requests[0].json
    assert body["tools"] == [
        {"type": "function", "function": {"name": t.name, "description": t.description,
                                          "parameters": t.parameters}}
        for t in (LOOKUP, HOURS)]


async def test_the_tool_exchange_goes_back_in_the_chat_format_and_is_answered() -> None:
    async with OpenAIStandin() as server:
        server.tool_rules = [ToolRule.single(
            "order", "lookup_order", {"order_id": "4471"},
            lambda results: "It is " + json.loads(results[0])["status"] + ".")]
        agent = make_agent(server.base_url)
        first = await collect(agent.respond(QUESTION, [LOOKUP]))
        [call] = [e for e in first if isinstance(e, ToolCallRequest)]
        follow_up = [*QUESTION, ChatMessage("assistant", "", tool_calls=(call,)),
                     ChatMessage("tool", '{"status": "shipped"}', tool_call_id=call.call_id)]
        second = await collect(agent.respond(follow_up, [LOOKUP]))
        # A tool result answering no call is refused, as the real API does.
        orphan = [*QUESTION, ChatMessage("tool", "{}", tool_call_id="call_nope")]
        with pytest.raises(Exception, match="tool"):
            await collect(agent.respond(orphan, [LOOKUP]))
        await agent.aclose()
    assert "".join(e.text for e in second if isinstance(e, TextDelta)) == "It is shipped."
    assert isinstance(second[-1], AgentDone) and second[-1].action == "answer"
    sent = server.requests[1].json["messages"]
    assert sent[-2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function",
         "function": {"name": "lookup_order", "arguments": call.arguments}}]}
    assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id,
                        "content": '{"status": "shipped"}'}


async def test_a_stream_cut_inside_a_call_never_yields_half_a_call() -> None:
    async with OpenAIStandin() as server:
        server.mode = "cut"
        server.tool_chunk_chars = 2
        server.tool_rules = [ToolRule.single("order", "lookup_order", ARGS[0])]
        agent = make_agent(server.base_url)
        events = await collect(agent.respond(QUESTION, [LOOKUP]))
        await agent.aclose()
    assert not [e for e in events if isinstance(e, ToolCallRequest)]
    done = events[-1]
    assert isinstance(done, AgentDone) and done.truncated and done.usage.estimated
    assert done.action == "answer"


def test_pieces_without_index_or_with_a_repeated_name_still_assemble() -> None:
    calls = ToolCallAssembler()
    # Some compatible servers leave out `index` and repeat the name in every piece.
    calls.add([{"id": "a", "function": {"name": "lookup_order", "arguments": '{"ord'}}])
    calls.add([{"function": {"name": "lookup_order", "arguments": 'er_id": "1"}'}}])
    calls.add([{"id": "b", "function": {"name": "opening_hours", "arguments": ""}}])
    calls.add([{"function": {"arguments": "{}"}}, "junk", {"index": "x"}])
    got = [(c.call_id, c.name, c.arguments) for c in calls.requests()]
    assert got == [("a", "lookup_order", '{"order_id": "1"}'), ("b", "opening_hours", "{}")]
    # Interleaved by index (two calls streamed side by side), ids given once.
    calls = ToolCallAssembler()
    calls.add([{"index": 1, "id": "y", "function": {"name": "b", "arguments": "[1"}},
               {"index": 0, "id": "x", "function": {"name": "a", "arguments": "{"}}])
    calls.add([{"index": 0, "function": {"arguments": "}"}},
               {"index": 1, "function": {"arguments": "]"}}])
    assert [(c.call_id, c.arguments) for c in calls.requests()] == [("x", "{}"), ("y", "[1]")]
