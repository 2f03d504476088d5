"""A tool call as it is shown outside the call: the `ToolCalled` event (and so the console,
the snapshot and the history) carries the arguments with the configured names redacted.

`[tool_use] redact_arguments` names the arguments shown as "***" wherever a tool call is
published (a PIN, a date of birth); a name is redacted at any depth. Nested values become
compact JSON text, so every reader can show them without knowing the tool.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

from engine.bus.events import JsonScalar, ToolCalled
from engine.config import Config
from engine.session.records import ToolCallRecord

REDACTED = "***"


def redacted_names(config: Config) -> frozenset[str]:
    """The argument names to redact: `[tool_use] redact_arguments`."""
    return frozenset(config.tool_use.redact_arguments)


def _redact(value: Any, names: Collection[str]) -> Any:
    if isinstance(value, Mapping):
        return {str(k): REDACTED if k in names else _redact(v, names)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, names) for v in value]
    return value


def published_arguments(arguments: Mapping[str, Any],
                        names: Collection[str]) -> dict[str, JsonScalar]:
    """The arguments as published: redacted, nested values as compact JSON text."""
    out: dict[str, JsonScalar] = {}
    for key, value in _redact(arguments, names).items():
        if value is None or isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            out[key] = json.dumps(value, separators=(",", ":"), default=str)
    return out


def redacted_record(record: ToolCallRecord, names: Collection[str]) -> ToolCallRecord:
    """The record with its arguments redacted (what the history keeps)."""
    if not names:
        return record
    return dataclasses.replace(record, arguments=_redact(record.arguments, names))


def tool_called_event(call_sid: str, record: ToolCallRecord,
                      names: Collection[str]) -> ToolCalled:
    return ToolCalled(call_sid=call_sid, turn=record.turn, call_id=record.call_id,
                      name=record.name,
                      arguments=published_arguments(record.arguments, names),
                      outcome=record.outcome, summary=record.summary,
                      latency_s=record.latency_s, round=record.round)
