"""The offline agent's tool use: an FAQ entry with `tool` looks its answer up.

Round one: the caller's words carry a number and match an entry whose `tool` is offered;
the agent asks for the tool with the number as `tool_argument` (a `ToolCallRequest`).
Round two: the conversation ends with the tool's result (a "tool" message); the agent
answers with the entry's `tool_answer` filled from the arguments and the result. A
result the template cannot be filled from (an error, garbage) gets a graceful line and
the entry's plain answer.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from engine.config.sections import FaqEntry
from engine.log import get_logger
from engine.providers.base import ChatMessage, ToolCallRequest, ToolSpec
from engine.providers.faq.matcher import FaqMatcher
from engine.providers.faq.numbers import heard_number

log = get_logger(__name__)

LOOKUP_FAILED = "Sorry, I couldn't look that up just now."


def tool_request(matcher: FaqMatcher, text: str,
                 tools: Sequence[ToolSpec]) -> ToolCallRequest | None:
    """The tool call the caller's words ask for, or None (answer without a tool)."""
    offered = {spec.name: spec for spec in tools}
    number = heard_number(text) if offered else None
    if number is None:
        return None
    # The number itself is no part of the question: match the words around it.
    found = matcher.match(number.rest) or matcher.match(text)
    entry = found.entry if found is not None else None
    if entry is None or entry.tool is None or entry.tool not in offered:
        return None
    value: str | int = number.value
    properties = offered[entry.tool].parameters.get("properties", {})
    if properties.get(entry.tool_argument, {}).get("type") == "integer":
        value = int(number.value)
    return ToolCallRequest(call_id=f"faq_{secrets.token_hex(6)}", name=entry.tool,
                           arguments=json.dumps({entry.tool_argument: value}))


def answer_from_result(matcher: FaqMatcher, entries: Sequence[FaqEntry],
                       messages: list[ChatMessage]) -> str | None:
    """The reply to a conversation that ends with a tool's result; None when it does not
    end with one of ours."""
    if not messages or messages[-1].role != "tool":
        return None
    result = messages[-1]
    asked = next((call for m in reversed(messages) if m.role == "assistant"
                  for call in m.tool_calls if call.call_id == result.tool_call_id), None)
    if asked is None:
        return None
    entry = _entry_for(matcher, entries, asked.name, messages)
    if entry is None:
        return None
    values = {**_json_object(asked.arguments), **_json_object(result.content)}
    template = entry.tool_answer or entry.answer
    try:
        return template.format_map(_Strict(values))
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        log.info("faq.tool_result_unusable", tool=asked.name, error=type(exc).__name__)
        return f"{LOOKUP_FAILED} {entry.answer}"


def _entry_for(matcher: FaqMatcher, entries: Sequence[FaqEntry], tool: str,
               messages: list[ChatMessage]) -> FaqEntry | None:
    """The entry that asked for `tool`: the one the caller's question matches, else the
    first that names it."""
    text = next((m.content for m in reversed(messages) if m.role == "user"), "")
    number = heard_number(text)
    found = matcher.match(number.rest if number else text)
    if found is not None and found.entry.tool == tool:
        return found.entry
    return next((e for e in entries if e.tool == tool), None)


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object's fields (one level of {"result": {...}} unwrapped); {} otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if isinstance(value, dict) and len(value) == 1:
        inner = next(iter(value.values()))
        if isinstance(inner, dict):
            value = inner
    return value if isinstance(value, dict) else {}


class _Strict(dict[str, Any]):
    """Template values: a missing field or a nested value fails the template."""

    def __missing__(self, key: str) -> Any:
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, Mapping | list) or value is None or value == "":
            raise ValueError(f"no usable {key}")
        return value


