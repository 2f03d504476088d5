"""A turn in which the agent may call tools: up to `tool_use.max_rounds` rounds of
"the agent asks for tools, they run, the agent goes on with their results".

`ToolTurn.events` is the turn's answer stream for `session/replying.py`: the agent's
text as it comes, in every round, and one `AgentDone` at the end (each round's own is
booked by the agent's chain, so every extra round is on the bill). Between rounds the
tool calls run (`engine/tools/runner.py`); the assistant's tool-call message and the
results join this turn's messages only.

The engine's own lines go into the same stream as `EngineLine`s, spoken at once: a
filler ("Let me check that for you.") when a tool has not answered after
`filler_after_ms` and the caller has heard nothing yet this turn, the failure line when
a tool failed or the model kept asking wrongly, and a goodbye or hand-off line when a
built-in ends the call and the agent said nothing. A built-in's action (`action`) runs
once the caller has heard the answer (`Replying`).

A barge-in cancels the turn while a tool runs: the round's results are discarded (the
runner reports them so); the LLM rounds already made stay booked. Afterwards the context
keeps a short note of what was looked up (`notes`), so later turns can refer to it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.log import get_logger
from engine.providers.base import (
    Agent,
    AgentAction,
    AgentDone,
    AgentEvent,
    ChatMessage,
    TextDelta,
    ToolCallRequest,
)
from engine.session.records import ToolCallRecord, TurnRecord
from engine.tools.builtins import CallAction
from engine.tools.registry import ToolBox
from engine.tools.runner import RoundOutcome, ToolRunner

if TYPE_CHECKING:
    from engine.session.call_session import CallSession

log = get_logger(__name__)

# A tool's answer as the context keeps it for later turns.
NOTE_RESULT_CHARS = 300
_ACTIONS: dict[str, AgentAction] = {"goodbye": "goodbye", "handoff": "handoff",
                                    "transfer": "answer"}


@dataclass(slots=True)
class EngineLine(TextDelta):
    """A line the engine says itself within the answer (a filler, the failure line):
    spoken at once, not held for the next sentence."""


class ToolTurn:
    """One caller turn's answer with tools."""

    def __init__(self, session: CallSession, toolbox: ToolBox, record: TurnRecord) -> None:
        self.session = session
        self.toolbox = toolbox
        self.record = record
        self.runner = ToolRunner(toolbox, record.idx, session.call_sid, self._report)
        self.action: CallAction | None = None  # a built-in's, run after the answer
        self.notes: list[str] = []  # what was looked up, for later turns' context
        self.said = False  # the caller was given text this turn
        self.log = log.bind(call_sid=session.call_sid)

    @property
    def used_tools(self) -> bool:
        return bool(self.record.tool_calls)

    def _report(self, record: ToolCallRecord) -> None:
        self.record.tool_calls.append(record)
        obs = self.session.observer
        if obs is not None:
            obs.tool_called(self.session, record)

    async def events(self, agent: Agent,
                     messages: list[ChatMessage]) -> AsyncGenerator[AgentEvent, None]:
        use = self.toolbox.use
        for round_no in range(1, use.max_rounds + 2):
            requests: list[ToolCallRequest] = []
            text: list[str] = []
            done: AgentDone | None = None
            async with aclosing(agent.respond(messages, self.toolbox.specs)) as stream:
                async for event in stream:
                    if isinstance(event, ToolCallRequest):
                        requests.append(event)
                    elif isinstance(event, AgentDone):
                        done = event
                    else:
                        text.append(event.text)
                        self.said = self.said or bool(event.text.strip())
                        yield event
            if done is None:  # the chain always ends with one; nothing more to say
                return
            if not requests:
                if self.used_tools and not self.said and use.failure_line:  # cut or empty
                    yield self._line(use.failure_line)
                yield self._last(done, done.action if not self.used_tools else "answer")
                return
            if round_no > use.max_rounds:
                self.runner.refuse(requests, round_no,
                                   f"over the limit of {use.max_rounds} tool rounds")
                self.log.warning("tool.rounds_exhausted", rounds=use.max_rounds)
                if not self.said and use.failure_line:
                    yield self._line(use.failure_line)
                yield self._last(done, "answer")
                return
            outcome: RoundOutcome | None = None
            async with aclosing(self._run_round(requests, round_no)) as round_events:
                async for item in round_events:
                    if isinstance(item, RoundOutcome):
                        outcome = item
                    else:
                        yield item
            assert outcome is not None
            self._note(outcome)
            if outcome.action is not None:
                self.action = outcome.action
                line = self._action_line(outcome.action)
                if line and not self.said:
                    yield self._line(line)
                yield self._last(done, _ACTIONS[outcome.action.kind])
                return
            if outcome.failed or outcome.stop:
                if use.failure_line:
                    yield self._line(use.failure_line)
                yield self._last(done, "answer")
                return
            messages = [*messages,
                        ChatMessage("assistant", "".join(text), tool_calls=tuple(requests)),
                        *outcome.messages]

    async def _run_round(self, requests: list[ToolCallRequest], round_no: int
                         ) -> AsyncGenerator[EngineLine | RoundOutcome, None]:
        """The round's calls run in a task of their own; a filler is said if they take
        long. Cut (barge-in, the generator closed), the task is cancelled: the runner
        reports the calls discarded."""
        use = self.toolbox.use
        task = asyncio.ensure_future(self.runner.run_round(requests, round_no))
        try:
            if not self.said and use.filler_lines:
                finished, _ = await asyncio.wait({task}, timeout=use.filler_after_ms / 1000)
                if not finished:
                    yield self._line(self._filler())
            yield await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _line(self, text: str) -> EngineLine:
        """One of the engine's lines, spaced from the agent's text around it."""
        line = EngineLine((" " if self.said else "") + text.strip() + " ")
        self.said = True
        return line

    def _filler(self) -> str:
        lines = self.toolbox.use.filler_lines
        return lines[(self.record.idx - 1) % len(lines)]

    def _action_line(self, action: CallAction) -> str:
        """What the caller hears before a built-in acts when the agent said nothing (a
        transfer has its own announcement)."""
        config = self.session.config
        if action.kind == "goodbye":
            return config.engine.goodbye
        if action.kind == "handoff":
            return config.policy.handoff_line
        return ""

    def _last(self, done: AgentDone, action: AgentAction) -> AgentDone:
        """The turn's one `AgentDone`: the last round's (already booked). An answer that
        used tools is never cached: it depends on what they said then."""
        if not self.used_tools:
            return done
        return replace(done, action=action, cache_key=None)

    def _note(self, outcome: RoundOutcome) -> None:
        hidden = set(self.toolbox.use.redact_arguments)
        for record, message in zip(outcome.records, outcome.messages, strict=True):
            if record.outcome not in ("ok", "error", "timeout"):
                continue
            args = {k: ("***" if k in hidden else v) for k, v in record.arguments.items()}
            said = message.content if record.outcome == "ok" else "failed"
            if len(said) > NOTE_RESULT_CHARS:
                said = said[:NOTE_RESULT_CHARS - 1] + "…"
            self.notes.append(f"{record.name}({json.dumps(args, ensure_ascii=False)})"
                              f" -> {said}")
