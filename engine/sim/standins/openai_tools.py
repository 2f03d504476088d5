"""The OpenAI stand-in's function calling: scripted tool calls in the real wire format,
and the checks the real API makes on a conversation that carries tool calls.

A `ToolRule` scripts one exchange: when the caller's last message matches `when` and
the request offers the rule's first tool, the reply is that round's tool calls; once the
results of every scripted round are in (the "tool" messages after the caller's message),
the reply is `answer`, a text or a function of those results. A round may also say some
text before its calls (`say`), as models sometimes do.

Streamed, each call goes out in pieces like OpenAI's: a first delta with `index`, `id`,
`type` and `function.name` (arguments ""), then `function.arguments` cut every
`chunk_chars` characters (anywhere, mid-token too), then `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Arguments as a dict (sent as JSON) or as raw text (possibly not JSON at all).
Arguments = dict[str, Any] | str


@dataclass(slots=True)
class ScriptedCall:
    tool: str
    arguments: Arguments = field(default_factory=dict)


@dataclass(slots=True)
class ScriptedRound:
    calls: list[ScriptedCall]
    say: str = ""  # text in the same message, before the calls


@dataclass(slots=True)
class ToolRule:
    """When the last user message matches `when` (a regex, any case), call the tools of
    each round in turn, then answer from their results."""

    when: str
    rounds: list[ScriptedRound]
    # The final answer: a text ("{result}" is the last result's content) or a function
    # of the results' contents (the last round's, in order).
    answer: str | Callable[[list[str]], str] = "{result}"

    @classmethod
    def single(cls, when: str, tool: str, arguments: Arguments,
               answer: str | Callable[[list[str]], str] = "{result}") -> ToolRule:
        """The usual rule: one call, then the answer."""
        return cls(when, [ScriptedRound([ScriptedCall(tool, arguments)])], answer)

    def offered(self, tools: Sequence[str]) -> bool:
        return bool(self.rounds) and all(c.tool in tools for c in self.rounds[0].calls)


@dataclass(slots=True)
class Plan:
    """What one request is answered with: text, then (maybe) tool calls."""

    text: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, args)


def offered_tools(body: dict[str, Any]) -> list[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [str(t.get("function", {}).get("name", "")) for t in tools if isinstance(t, dict)]


def _this_turn(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The last user message, and the messages after it (this turn's tool rounds)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return str(messages[i].get("content") or ""), messages[i + 1:]
    return "", []


def plan_reply(rules: Sequence[ToolRule], messages: list[dict[str, Any]],
               tools: Sequence[str]) -> Plan | None:
    """The scripted reply to this request; None when no rule applies (a plain reply)."""
    user, after = _this_turn(messages)
    rule = next((r for r in rules if r.offered(tools)
                 and re.search(r.when, user, re.IGNORECASE)), None)
    if rule is None:
        return None
    done = sum(1 for m in after if m.get("role") == "assistant" and m.get("tool_calls"))
    if done < len(rule.rounds):
        step = rule.rounds[done]
        calls = [(f"call_{uuid.uuid4().hex[:24]}", c.tool,
                  c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments))
                 for c in step.calls]
        return Plan(step.say, calls)
    results: list[str] = []
    for m in reversed(after):
        if m.get("role") != "tool":
            break
        results.insert(0, str(m.get("content") or ""))
    if callable(rule.answer):
        return Plan(rule.answer(results))
    return Plan(rule.answer.replace("{result}", results[-1] if results else ""))


def call_deltas(calls: list[tuple[str, str, str]], chunk_chars: int) -> list[dict[str, Any]]:
    """The streamed `delta`s of the calls, in OpenAI's pieces."""
    deltas: list[dict[str, Any]] = []
    for index, (call_id, name, arguments) in enumerate(calls):
        deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]})
        for start in range(0, len(arguments), max(1, chunk_chars)):
            piece = arguments[start:start + max(1, chunk_chars)]
            deltas.append({"tool_calls": [{"index": index,
                                           "function": {"arguments": piece}}]})
    return deltas


def message_with_calls(text: str, calls: list[tuple[str, str, str]]) -> dict[str, Any]:
    """A non-streamed reply's message."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function",
                                  "function": {"name": n, "arguments": a}}
                                 for i, n, a in calls]
    return message


def conversation_problem(body: dict[str, Any]) -> str | None:
    """What the real API refuses (400) in a conversation with tool calls: malformed
    `tools`, a tool message answering no call, a call left without its answer."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict) and t["function"].get("name")
            for t in tools)):
        return "Invalid 'tools': each must be {type: 'function', function: {name, ...}}."
    open_ids: list[str] = []
    for message in body.get("messages", []):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_ids:
                return ("Invalid parameter: messages with role 'tool' must be a response "
                        "to a preceeding message with 'tool_calls'.")
            open_ids.remove(call_id)
            continue
        if open_ids:
            return ("An assistant message with 'tool_calls' must be followed by tool "
                    "messages responding to each 'tool_call_id'. The following "
                    f"tool_call_ids did not have response messages: {', '.join(open_ids)}")
        if role == "assistant":
            open_ids = [str(c.get("id")) for c in message.get("tool_calls") or []]
    if open_ids:
        return f"tool_call_ids did not have response messages: {', '.join(open_ids)}"
    return None
