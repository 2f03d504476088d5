"""JSON Schema checks with `jsonschema`: a tool's schema at start, the model's arguments
before any request.

Arguments the model invents are checked against the tool's schema before anything is
sent: a failure becomes a short message the model can act on (fed back as the tool's
result), never an HTTP request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema import validators

# A schema that names no dialect is read as the newest one (what OpenAI documents).
_DEFAULT_DIALECT = jsonschema.Draft202012Validator
# How many of the argument errors the model is told at once.
_MAX_ERRORS = 3


def _validator_class(schema: dict[str, Any]) -> Any:
    return validators.validator_for(schema, default=_DEFAULT_DIALECT)


def schema_problem(schema: Any) -> str | None:
    """What is wrong with a tool's parameter schema (None when it is usable): valid JSON
    Schema, and an object's (function arguments are a JSON object)."""
    if not isinstance(schema, dict):
        return "the schema must be a JSON object"
    try:
        _validator_class(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"{exc.message} (at {where or 'the top'})"
    if schema.get("type") != "object":
        return 'the arguments schema must have "type": "object"'
    return None


@dataclass(slots=True, frozen=True)
class ArgumentCheck:
    """The model's arguments: parsed and valid (`problem` empty), or why not."""

    arguments: dict[str, Any]
    problem: str = ""


class ArgumentValidator:
    """One tool's compiled schema."""

    __slots__ = ("_validator",)

    def __init__(self, schema: dict[str, Any]) -> None:
        self._validator = _validator_class(schema)(schema)

    def check(self, text: str) -> ArgumentCheck:
        """Parse the model's JSON text and check it against the schema."""
        try:
            value = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            return ArgumentCheck({}, f"the arguments are not valid JSON ({exc.msg})")
        if not isinstance(value, dict):
            return ArgumentCheck({}, "the arguments must be a JSON object")
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if not errors:
            return ArgumentCheck(value)
        messages = []
        for error in errors[:_MAX_ERRORS]:
            where = "/".join(str(p) for p in error.absolute_path)
            messages.append(f"{where}: {error.message}" if where else error.message)
        return ArgumentCheck(value, "; ".join(messages))
