"""The tools the agent may call (`[[tools]]`) and how a turn uses them (`[tool_use]`).

A tool is a business endpoint: the engine POSTs the model's arguments to `url` as JSON
and gives the model the answer. `parameters` is the JSON Schema of those arguments: a
TOML table (inline or `[tools.parameters]`), or the same as a JSON string. A schema the
validator refuses stops the engine at start, naming the tool. Secrets never live here:
`auth_env` names the environment variable holding the auth header's whole value.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from engine.config.base import Section

# The engine's own tools (offered with `tool_use.builtins = true`); a configured tool
# may not take their names.
BUILTIN_TOOL_NAMES = ("transfer_call", "end_call", "hand_to_human")
# Where plain http is allowed: a service on this machine (tests, the demo).
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ToolConfig(Section):
    """One `[[tools]]` entry."""

    # What the model calls it (OpenAI's rule for function names).
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}})
    url: str
    auth_header: str = ""  # e.g. "Authorization"; empty: no auth header
    auth_env: str = ""  # the environment variable holding the header's value
    timeout_s: float = Field(default=3.0, gt=0, le=30)
    # Safe to send twice (a lookup): a failed attempt is retried `retries` times. A tool
    # that acts (a booking) is never retried: a lost answer may hide a done action.
    idempotent: bool = False
    retries: int = Field(default=1, ge=0, le=3)

    @field_validator("parameters", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"parameters is not valid JSON: {exc}") from exc
        return value

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from engine.tools.validation import schema_problem  # jsonschema loads on use

        problem = schema_problem(schema)
        if problem:
            raise ValueError(f"tool {_name(info)}: invalid JSON Schema: {problem}")
        return schema

    @field_validator("url")
    @classmethod
    def _https(cls, url: str, info: ValidationInfo) -> str:
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS:
            return url
        raise ValueError(f"tool {_name(info)}: url must be https (http only for "
                         f"127.0.0.1/localhost): {url!r}")


def _name(info: ValidationInfo) -> str:
    """The tool's name, for errors (fields are validated in order: the name first)."""
    return repr(info.data.get("name", "?"))



def _named_checks(tools: list[ToolConfig]) -> list[ToolConfig]:
    """Each tool's own errors name it; these name the clashes between tools."""
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise ValueError(f"tool {tool.name!r} is defined twice")
        if tool.name in BUILTIN_TOOL_NAMES:
            raise ValueError(f"tool {tool.name!r}: the name belongs to a built-in tool")
        if bool(tool.auth_header) != bool(tool.auth_env):
            raise ValueError(f"tool {tool.name!r}: auth_header and auth_env go together")
        seen.add(tool.name)
    return tools


Tools = Annotated[list[ToolConfig], AfterValidator(_named_checks)]


class ToolUseConfig(Section):
    """`[tool_use]`: limits, the filler, the failure line, redaction, the built-ins."""

    max_rounds: int = Field(default=3, ge=1, le=10)  # LLM rounds with tool calls per turn
    max_calls: int = Field(default=6, ge=1, le=50)  # tool calls per turn, all rounds
    # A tool not done by then gets one filler line, so the caller never hears dead air.
    filler_after_ms: int = Field(default=700, ge=0)
    filler_lines: list[str] = Field(default_factory=lambda: [
        "Let me check that for you.", "One moment while I look that up."])
    # Said when a tool failed (error, garbage, timeout) or the model kept asking wrongly.
    failure_line: str = "Sorry, I can't look that up right now. Is there anything else?"
    # Argument names whose values are shown as "***" wherever tool calls are published
    # (events, the console, the history).
    redact_arguments: list[str] = Field(default_factory=list)
    # The engine's own tools: transfer to a `transfer.destinations` entry, end the call,
    # hand to a human (transfer.number).
    builtins: bool = True
    # A tool's answer is cut to this many characters before the model sees it.
    result_max_chars: int = Field(default=2000, ge=100)
    # A tool's answer larger than this is a failed call (never read to its end).
    max_response_bytes: int = Field(default=1_000_000, ge=1024)


__all__ = ["BUILTIN_TOOL_NAMES", "ToolConfig", "ToolUseConfig", "Tools"]
