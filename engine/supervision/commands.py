"""Supervisor commands on live calls: take over, hand back, say, transfer, escalate, hang up.

A command is checked against its call's state first; a refused one changes nothing and
its error says why. Every command, done or refused (here, or by the supervisor API before
it ran), is audited once under the name of the token it came with: a log line, a
CommandAudit event and a row in the history's actions (a transfer or escalation that went
through marks the call escalated at once).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.bus import events as ev
from engine.bus.events import CallState
from engine.config import Config
from engine.log import get_logger
from engine.record.history import CallHistory
from engine.record.metrics import EngineMetrics
from engine.supervision.api_schema import Command, Reply
from engine.supervision.backend import Actor

if TYPE_CHECKING:
    from engine.experiments.runner import ExperimentRunner
    from engine.session.call_session import CallSession
    from engine.session.registry import CallRegistry

log = get_logger(__name__)

_NUMBER = re.compile(r"^\+?[0-9]{3,15}$")
_SPEAKING = (CallState.AI, CallState.HUMAN_TAKEOVER)  # where say and transfer are allowed

# Performs one command on a live call: None when done, else why it was refused.
_Handler = Callable[["CallSession", Command], Awaitable[str | None]]


class SupervisorCommands:
    """Runs each command on the call it names, then audits it."""

    def __init__(self, config: Config, metrics: EngineMetrics, history: CallHistory | None,
                 publish: Callable[[ev.EventBase], None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], None]) -> None:
        self._config = config
        self._metrics = metrics
        self._history = history
        self._publish = publish
        self._spawn = spawn  # history writes run in the background, like the hub's
        self.registry: CallRegistry | None = None  # set by the app before it serves
        self.experiments: ExperimentRunner | None = None  # the enabled one (wiring sets it)
        self._handlers: dict[str, _Handler] = {
            "take_over": self._take_over, "hand_back": self._hand_back, "say": self._say,
            "transfer": self._transfer, "escalate": self._transfer, "hang_up": self._hang_up}

    async def execute(self, command: Command, actor: Actor) -> Reply:
        """Perform a command on its call, then audit it."""
        return self._audit(command, actor, await self._perform(command))

    def refuse(self, command: Command, actor: Actor, error: str) -> Reply:
        """Audit a command the supervisor API refused before it ran."""
        return self._audit(command, actor, error)

    def _audit(self, command: Command, actor: Actor, error: str | None) -> Reply:
        ok = error is None
        args: dict[str, ev.JsonScalar] = {}
        if command.text is not None:
            args["text"] = command.text[:200]
        if command.number is not None:
            args["number"] = command.number
        if actor.claimed and actor.claimed != actor.name:
            args["claimed_actor"] = actor.claimed  # what the console said, not who it is
        log.info("ops.command", actor=actor.name, role=actor.role, command=command.command,
                 call_sid=command.call_sid, ok=ok, error=error, **args)
        self._publish(ev.CommandAudit(call_sid=command.call_sid, actor=actor.name,
                                      command=command.command, args=args, ok=ok,
                                      error=error or ""))
        if self._history is not None:
            # A call this engine never had gets no row of its own (no phantom call for the
            # report to count): the refusal is kept with the sid it named.
            call_sid: str | None = command.call_sid
            if self.registry is None or self.registry.get_any(command.call_sid) is None:
                call_sid, args = None, {**args, "call_sid": command.call_sid}
            self._spawn(self._history.action_recorded(
                call_sid, actor.name, command.command, dict(args), ok, error,
                escalation=ok and command.command in ("transfer", "escalate")))
        return Reply(id=command.id, ok=ok, error=error)

    async def _perform(self, command: Command) -> str | None:
        """Perform a command; the error that says why it was refused, or None."""
        assert self.registry is not None
        if command.command in ("pause_variant", "resume_variant"):  # not one call's
            return self._variant_command(command)
        session = self.registry.get(command.call_sid)
        if session is None:
            if self.registry.get_any(command.call_sid) is not None:
                return "call already ended"
            return "unknown call"
        handler = self._handlers.get(command.command)
        if handler is None:
            return f"unknown command {command.command!r}"
        return await handler(session, command)

    async def _take_over(self, session: CallSession, command: Command) -> str | None:
        if session.state is not CallState.AI:
            return _not_allowed(session)
        session.take_over()
        return None

    async def _hand_back(self, session: CallSession, command: Command) -> str | None:
        if session.state is not CallState.HUMAN_TAKEOVER:
            return _not_allowed(session)
        session.hand_back()
        return None

    async def _say(self, session: CallSession, command: Command) -> str | None:
        text = (command.text or "").strip()
        if not text:
            return "say needs text"
        if session.state not in _SPEAKING:
            return _not_allowed(session)
        try:
            await session.say_now(text, speaker="supervisor")
        except Exception as exc:  # the caller must not lose the call over a TTS error
            return f"could not speak the line: {exc}"
        return None

    async def _transfer(self, session: CallSession, command: Command) -> str | None:
        """transfer: to the number or destination given; escalate: to transfer.number."""
        name = command.command
        if session.state not in _SPEAKING:
            return _not_allowed(session)
        number = self._destination(command.number if name == "transfer" else None)
        if number is None:
            return "no transfer destination: give a number or set transfer.number"
        if not _NUMBER.match(number):
            return f"invalid transfer number {number!r}"
        result = await session.transfer(number, f"supervisor {name}")
        if not result.ok and not result.already_ended:
            return f"transfer failed: {result.error}"
        self._metrics.escalation()
        return None

    async def _hang_up(self, session: CallSession, command: Command) -> str | None:
        await session.hang_up("supervisor hung up")
        return None

    def _variant_command(self, command: Command) -> str | None:
        """Pause or resume an experiment's variant (engine/experiments/runner.py)."""
        runner = self.experiments
        experiment, _, variant = (command.text or "").strip().partition("/")
        if runner is None or experiment != runner.experiment.name:
            return f"no running experiment {experiment!r} on this engine"
        if command.command == "pause_variant":
            return runner.pause(variant, "paused by a supervisor", "supervisor")
        return runner.resume(variant, "supervisor")

    def _destination(self, given: str | None) -> str | None:
        """A destination's number by its name, a number as given, or transfer.number."""
        cfg = self._config.transfer
        if given:
            for dest in cfg.destinations:
                if dest.name.lower() == given.lower():
                    return dest.number
            return given.replace(" ", "")
        return cfg.number or None


def _not_allowed(session: CallSession) -> str:
    return f"not allowed in state {session.state.value}"
