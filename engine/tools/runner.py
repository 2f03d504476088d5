"""One turn's tool calls, round by round: check each call, run the good ones together,
and say what the model is told and what people see.

Before any request a call is checked: a tool the agent was never offered, a call over
the turn's `max_calls`, or arguments that fail the tool's schema are "rejected" (no
request is made) and the reason goes back to the model as that call's result, once per
tool: a tool rejected twice in a turn stops the rounds (the caller hears the failure
line). A built-in's call becomes the turn's `CallAction`. The rest are POSTed at the same
time (`http_tool.py`); a failed or timed-out one makes the round `failed`.

Every call ends as one `ToolCallRecord`, handed to `report` when its round is over, or
when the round is cancelled (barge-in): then a result nobody will use is "discarded".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.providers.base import ChatMessage, ToolCallRequest
from engine.session.records import ToolCallRecord
from engine.tools.builtins import CallAction, builtin_action
from engine.tools.http_tool import SUMMARY_CHARS, HttpTool, ToolResult
from engine.tools.registry import ToolBox


@dataclass(slots=True)
class RoundOutcome:
    """What one round of tool calls gave."""

    messages: list[ChatMessage]  # one "tool" message per call, in the calls' order
    records: list[ToolCallRecord]
    failed: bool = False  # a tool failed or timed out: the caller hears the failure line
    stop: bool = False  # a tool was rejected twice: no more rounds
    action: CallAction | None = None  # a built-in asked to act on the call


@dataclass(slots=True)
class _Call:
    """One call of the round, as it is checked and run."""

    request: ToolCallRequest
    record: ToolCallRecord
    arguments: dict[str, Any] = field(default_factory=dict)
    tool: HttpTool | None = None  # to be POSTed
    result: ToolResult | None = None  # its answer, once in
    content: str = ""  # what the model is told (a rejection, a built-in's "done")


class ToolRunner:
    """The tool calls of one turn (`report` gets each call's record once it is over)."""

    def __init__(self, toolbox: ToolBox, turn: int, call_sid: str,
                 report: Callable[[ToolCallRecord], None]) -> None:
        self.toolbox = toolbox
        self.turn = turn
        self.call_sid = call_sid
        self.report = report
        self.calls_made = 0
        self._rejections: dict[str, int] = {}

    async def run_round(self, requests: list[ToolCallRequest], round_no: int) -> RoundOutcome:
        """Check and run one round's calls; cancelled (barge-in), the results are dropped
        and the calls reported as such."""
        outcome = RoundOutcome([], [])
        calls = [self._check(request, round_no, outcome) for request in requests]
        started = time.monotonic()
        try:
            await asyncio.gather(*(self._post(c, started) for c in calls if c.tool))
        except asyncio.CancelledError:
            self._discard(calls, started)
            raise
        for call in calls:
            result = call.result
            if result is not None:
                call.content = result.content
                call.record.outcome = result.outcome
                call.record.summary = result.summary
                outcome.failed = outcome.failed or result.outcome != "ok"
            outcome.messages.append(ChatMessage("tool", call.content,
                                                tool_call_id=call.request.call_id))
            outcome.records.append(call.record)
            self.report(call.record)
        return outcome

    def refuse(self, requests: list[ToolCallRequest], round_no: int, why: str) -> None:
        """Calls that will not run (the turn's rounds are used up): reported as rejected."""
        for request in requests:
            call = _Call(request, ToolCallRecord(
                turn=self.turn, call_id=request.call_id, name=request.name, arguments={},
                outcome="rejected", summary=_cut(f"rejected: {why}"), round=round_no))
            validator = self.toolbox.validator(request.name)
            if validator is not None:
                call.record.arguments = validator.check(request.arguments).arguments
            self.report(call.record)

    def _check(self, request: ToolCallRequest, round_no: int,
               outcome: RoundOutcome) -> _Call:
        """Everything decided before any request: rejections, limits, built-ins."""
        record = ToolCallRecord(turn=self.turn, call_id=request.call_id, name=request.name,
                                arguments={}, outcome="ok", round=round_no)
        call = _Call(request, record)
        toolbox = self.toolbox
        validator = toolbox.validator(request.name)
        self.calls_made += 1
        if validator is None:
            offered = ", ".join(s.name for s in toolbox.specs)
            return self._reject(call, f"there is no tool named {request.name!r} (the "
                                f"tools are: {offered})", outcome)
        check = validator.check(request.arguments)
        record.arguments = check.arguments
        if self.calls_made > toolbox.use.max_calls:
            return self._reject(call, f"over the limit of {toolbox.use.max_calls} tool "
                                "calls in one turn: answer with what you have", outcome,
                                counts=False)
        if check.problem:
            return self._reject(call, f"invalid arguments: {check.problem}. Call it "
                                "again with arguments that fit its schema, or ask the "
                                "caller for what is missing", outcome)
        if toolbox.is_builtin(request.name):
            action = builtin_action(request.name, check.arguments, toolbox.config)
            outcome.action = outcome.action or action
            record.summary = action.summary
            call.content = json.dumps({"result": "done"})
            return call
        call.tool = toolbox.http_tool(request.name)
        call.arguments = check.arguments
        return call

    def _reject(self, call: _Call, why: str, outcome: RoundOutcome,
                counts: bool = True) -> _Call:
        name = call.request.name
        call.record.outcome = "rejected"
        call.record.summary = _cut(f"rejected: {why}")
        call.content = json.dumps({"error": why})
        if counts:
            self._rejections[name] = self._rejections.get(name, 0) + 1
            # Fed back once; the same mistake again ends the rounds.
            outcome.stop = outcome.stop or self._rejections[name] > 1
        return call

    async def _post(self, call: _Call, started: float) -> None:
        assert call.tool is not None
        call.result = await call.tool.call(self.toolbox.http(), call.arguments, self.call_sid)
        call.record.latency_s = time.monotonic() - started

    def _discard(self, calls: list[_Call], started: float) -> None:
        """The round was cut: results nobody will use are discarded (failures and
        rejections keep their outcome); every call is reported."""
        now = time.monotonic()
        for call in calls:
            record, result = call.record, call.result
            if result is not None:
                record.summary = result.summary
                record.outcome = result.outcome if result.outcome != "ok" else "discarded"
            elif call.tool is not None:
                record.outcome = "discarded"
                record.latency_s = now - started
            elif record.outcome == "ok":  # a built-in's action will not run now
                record.outcome = "discarded"
            self.report(record)


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"
