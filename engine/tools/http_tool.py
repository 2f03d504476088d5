"""A configured tool: the model's (already validated) arguments POSTed as JSON to the
business's endpoint, its JSON answer handed back.

Whatever goes wrong (refused connection, a 4xx/5xx, an answer that is not JSON, no
answer within `timeout_s`) ends in a failed `ToolResult` and ONE log line; nothing is
raised, so the call goes on. Only an idempotent tool (a lookup) is tried again, and only
after a failure a second try may mend (a connection error, a 5xx or 429); a tool that
acts (a booking) never is, since a lost answer may hide a done action. A timeout is never
retried: the caller has waited long enough.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from engine.config.tools import ToolConfig
from engine.log import get_logger

log = get_logger(__name__)

ToolResultOutcome = Literal["ok", "error", "timeout"]
# A short line for people ("order 4471: shipped") is cut to this length.
SUMMARY_CHARS = 80
_RETRY_PAUSE_S = 0.1


@dataclass(slots=True, frozen=True)
class ToolResult:
    """What a tool gave: the outcome, what the model is told, a line for people."""

    outcome: ToolResultOutcome
    content: str
    summary: str


def summarize(value: Any) -> str:
    """A short line for people: the answer's own `summary` (or `status`/`message`) when
    it has one, else its compact JSON."""
    if isinstance(value, dict):
        for key in ("summary", "status", "message"):
            text = value.get(key)
            if isinstance(text, str) and text.strip():
                return _cut(text.strip(), SUMMARY_CHARS)
    return _cut(json.dumps(value, separators=(",", ":"), ensure_ascii=False), SUMMARY_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class _Failed(Exception):
    """One attempt failed: why, and whether trying again may help."""

    def __init__(self, why: str, retryable: bool, status: int | None = None) -> None:
        super().__init__(why)
        self.retryable = retryable
        self.status = status


class HttpTool:
    """One `[[tools]]` endpoint."""

    def __init__(self, config: ToolConfig, secret: str | None,
                 result_max_chars: int = 2000, max_response_bytes: int = 1_000_000) -> None:
        self.config = config
        self.name = config.name
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.auth_header and secret:
            self._headers[config.auth_header] = secret
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._result_max_chars = result_max_chars
        self._max_bytes = max_response_bytes

    async def call(self, http: aiohttp.ClientSession, arguments: dict[str, Any],
                   call_sid: str = "") -> ToolResult:
        """POST the arguments; a failure is a result (outcome error/timeout), logged once."""
        cfg = self.config
        attempts = 1 + (cfg.retries if cfg.idempotent else 0)
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                value = await self._attempt(http, arguments)
            except TimeoutError:
                return self._failed(call_sid, "timeout", f"no answer within {cfg.timeout_s}s",
                                    None, attempt, started)
            except _Failed as exc:
                if exc.retryable and attempt < attempts:
                    await asyncio.sleep(_RETRY_PAUSE_S)
                    continue
                return self._failed(call_sid, "error", str(exc), exc.status, attempt, started)
            content = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            return ToolResult("ok", _cut(content, self._result_max_chars), summarize(value))
        raise AssertionError("unreachable: the last attempt returns")

    async def _attempt(self, http: aiohttp.ClientSession, arguments: dict[str, Any]) -> Any:
        try:
            async with http.post(self.config.url, json=arguments, headers=self._headers,
                                 timeout=self._timeout) as response:
                # An answer past max_response_bytes is refused, not read to its end.
                body = await response.content.read(self._max_bytes + 1)
                status = response.status
        except TimeoutError:
            raise  # aiohttp's read timeouts are connection errors too: a timeout first
        except aiohttp.ClientConnectionError as exc:
            # A refused or dropped connection: (most likely) never reached the service.
            raise _Failed(f"connection failed: {exc.__class__.__name__}", True) from exc
        except aiohttp.ClientError as exc:
            raise _Failed(f"request failed: {exc.__class__.__name__}", False) from exc
        if status >= 400:
            raise _Failed(f"HTTP {status}", status >= 500 or status == 429, status)
        if len(body) > self._max_bytes:
            raise _Failed(f"the answer is larger than {self._max_bytes} bytes", False, status)
        try:
            return json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Failed(f"the answer is not JSON ({len(body)} bytes)", False, status) from exc

    def _failed(self, call_sid: str, outcome: ToolResultOutcome, why: str,
                status: int | None, attempts: int, started: float) -> ToolResult:
        log.warning("tool.failed", call_sid=call_sid, tool=self.name, outcome=outcome,
                    error=why, status=status, attempts=attempts,
                    elapsed_s=round(time.monotonic() - started, 3))
        content = json.dumps({"error": f"the {self.name} service failed: {why}"})
        return ToolResult(outcome, content, f"failed: {why}")
