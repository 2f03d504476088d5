"""Function calling in the chat completions wire format: the request's `tools` and
messages, and tool calls assembled from streamed deltas.

A streamed tool call arrives in pieces under `choices[].delta.tool_calls[]`, keyed by
`index`: the first piece carries `id`, `type` and `function.name`, the later ones only
more of `function.arguments` (JSON text cut anywhere). The calls are whole once the
choice finishes (`finish_reason: "tool_calls"`) or the stream ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.providers.base import ChatMessage, ToolCallRequest, ToolSpec


def tools_body(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """The request's `tools`."""
    return [{"type": "function",
             "function": {"name": t.name, "description": t.description,
                          "parameters": t.parameters}} for t in tools]


def message_body(m: ChatMessage) -> dict[str, Any]:
    """One message as the API takes it: an assistant's tool calls, a tool's result."""
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
    if m.tool_calls:
        return {"role": "assistant", "content": m.content or None,
                "tool_calls": [{"id": c.call_id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]}
    return {"role": m.role, "content": m.content}


@dataclass(slots=True)
class _Call:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """The tool calls of one streamed reply (choice 0), piece by piece."""

    __slots__ = ("_calls", "finished")

    def __init__(self) -> None:
        self._calls: dict[int, _Call] = {}
        self.finished = False  # finish_reason "tool_calls" came

    @property
    def started(self) -> bool:
        return bool(self._calls)

    def add(self, pieces: Any) -> None:
        """A delta's `tool_calls` list."""
        if not isinstance(pieces, list):
            return
        for piece in pieces:
            if not isinstance(piece, dict):
                continue
            call = self._call_for(piece)
            call_id = piece.get("id")
            if isinstance(call_id, str) and call_id and not call.call_id:
                call.call_id = call_id
            function = piece.get("function")
            if not isinstance(function, dict):
                continue
            name = function.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name  # some servers repeat it: the first one counts
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                call.arguments.append(arguments)

    def _call_for(self, piece: dict[str, Any]) -> _Call:
        index = piece.get("index")
        if not isinstance(index, int):
            # A server that leaves out `index`: a new id opens a call, else the last one.
            call_id = piece.get("id")
            known = any(c.call_id == call_id for c in self._calls.values())
            index = len(self._calls) if (call_id and not known) or not self._calls \
                else max(self._calls)
        return self._calls.setdefault(index, _Call())

    def requests(self) -> list[ToolCallRequest]:
        """The assembled calls in index order (a call without a name is dropped)."""
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if call.name:
                out.append(ToolCallRequest(call.call_id or f"call_{index}", call.name,
                                           "".join(call.arguments)))
        return out

    def characters(self) -> int:
        """Characters of the calls so far (for a usage estimate)."""
        return sum(len(c.name) + sum(map(len, c.arguments)) for c in self._calls.values())
