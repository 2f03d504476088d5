"""Reading a console's frame: a command, a command with invalid arguments, or no command.

A frame that still names a known command on a call (with an id) but fails validation is
a command with bad arguments: refused and audited like any other refusal. Anything else
that is not a valid command gets an error frame only. Slow path: bad frames only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from engine.supervision.api_schema import ACTING_COMMANDS, COMMAND, Command


@dataclass(frozen=True, slots=True)
class BadFrame:
    message: str  # what is wrong, for the console's user
    command: Command | None  # the command it still names, to refuse and audit; or None


def read_command(data: str) -> Command | BadFrame:
    try:
        return COMMAND.validate_json(data)
    except ValidationError as exc:
        raw = _json_object(data)
        return BadFrame(_explain(raw, exc), _named_command(raw))


def _explain(raw: dict[str, Any], exc: ValidationError) -> str:
    """A message the console's user can act on."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<frame>'}: {err['msg']}"
        for err in exc.errors()[:3])
    command_id = f" {raw['id'][:64]!r}" if isinstance(raw.get("id"), str) else ""
    return f"invalid command{command_id}: {problems}"[:500]


def _named_command(raw: dict[str, Any]) -> Command | None:
    command_id, name, call_sid = raw.get("id"), raw.get("command"), raw.get("call_sid")
    if not (isinstance(command_id, str) and 0 < len(command_id) <= 64
            and name in ACTING_COMMANDS
            and isinstance(call_sid, str) and 0 < len(call_sid) <= 64):
        return None
    text, number = raw.get("text"), raw.get("number")
    return Command.model_construct(id=command_id, command=name, call_sid=call_sid,
                                   text=text[:1000] if isinstance(text, str) else None,
                                   number=number[:32] if isinstance(number, str) else None)


def _json_object(data: str) -> dict[str, Any]:
    """The frame's JSON object; {} when it is none (RecursionError: nested too deep)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}
