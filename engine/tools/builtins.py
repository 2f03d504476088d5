"""The engine's own tools (offered with `tool_use.builtins = true`): transfer the call to
a named destination (`transfer.destinations`), end the call, hand it to a human
(`transfer.number`, the usual handoff path).

They act on the call, so they are not run in the middle of the answer: a call to one of
them ends the turn's tool rounds, the caller hears what the agent said (or a fitting
line when it said nothing), and then the action runs (`engine/session/tool_turns.py`).
Each is offered only when it can work: no destinations, no transfer tool; no
transfer.number, no hand-off tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from engine.config import Config
from engine.providers.base import ToolSpec

TRANSFER = "transfer_call"
END_CALL = "end_call"
HAND_TO_HUMAN = "hand_to_human"

ActionKind = Literal["transfer", "goodbye", "handoff"]


@dataclass(slots=True, frozen=True)
class CallAction:
    """What a built-in tool asked for; run once the caller has heard the answer."""

    kind: ActionKind
    summary: str  # for people: "transfer to Billing"
    destination: str = ""  # the transfer's destination name
    number: str = ""  # and its number


def builtin_specs(config: Config) -> list[ToolSpec]:
    """The built-ins this configuration can serve."""
    specs: list[ToolSpec] = []
    names = [d.name for d in config.transfer.destinations]
    if names:
        specs.append(ToolSpec(
            TRANSFER,
            "Transfer the caller to one of the team's destinations ("
            + ", ".join(names) + ") when they ask for it or need it.",
            {"type": "object",
             "properties": {"destination": {"type": "string", "enum": names,
                                            "description": "Where to transfer the call."}},
             "required": ["destination"], "additionalProperties": False}))
    specs.append(ToolSpec(
        END_CALL,
        "End the call once the caller says goodbye or has nothing more to ask. Say "
        "goodbye in the same reply.",
        {"type": "object", "properties": {}, "additionalProperties": False}))
    if config.transfer.number:
        specs.append(ToolSpec(
            HAND_TO_HUMAN,
            "Hand the call to a person on the team, when the caller asks for one or you "
            "cannot help.",
            {"type": "object",
             "properties": {"reason": {"type": "string",
                                       "description": "Why, in a few words."}},
             "additionalProperties": False}))
    return specs


def builtin_action(name: str, arguments: dict[str, Any], config: Config) -> CallAction:
    """The action a built-in's (validated) call asks for."""
    if name == TRANSFER:
        destination = str(arguments["destination"])
        number = next(d.number for d in config.transfer.destinations
                      if d.name == destination)
        return CallAction("transfer", f"transfer to {destination}", destination, number)
    if name == END_CALL:
        return CallAction("goodbye", "end the call")
    if name == HAND_TO_HUMAN:
        return CallAction("handoff", "hand to a human")
    raise KeyError(name)
