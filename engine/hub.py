"""The operations hub: what sessions report becomes events, money, metrics and history.

Sessions call the hub synchronously (it implements `SessionObserver`); anything that
waits (bus publish, SQLite) runs in background tasks so a call never stalls on it. It
also serves the supervisor API (`SupervisorBackend`): snapshots of live calls and the
commands supervisors send, each audited in the log, on the bus and in the history.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.bus import events as ev
from engine.bus.event_bus import BusPublishError, EventBus, make_event_bus
from engine.config import Config
from engine.log import get_logger
from engine.money.ledger import BudgetAlert, SpendLedger, SpendUpdate
from engine.providers.base import Usage
from engine.record.history import CallHistory
from engine.record.metrics import EngineMetrics
from engine.session.records import TurnRecord
from engine.session.states import CallState
from engine.supervision.api_schema import (
    CallSnapshot,
    Command,
    Hello,
    Reply,
    Snapshot,
    SpendTotals,
    TranscriptEntry,
)

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.registry import CallRegistry

log = get_logger(__name__)

_NUMBER = re.compile(r"^\+?[0-9]{3,15}$")
_BUDGET_ALERT_KIND: dict[str, ev.AlertKind] = {
    "call_cap": "call_cost_cap", "daily_budget": "daily_budget", "monthly_budget": "daily_budget"}


@dataclass
class CallView:
    """What the supervisor API shows of one call (kept small and bounded)."""

    call_sid: str
    from_number: str
    to_number: str
    started_at: float
    state: str = "connected"
    ended_at: float | None = None
    end_reason: str | None = None
    cost_usd: float = 0.0
    turns: int = 0
    v2v: deque[float] = field(default_factory=lambda: deque(maxlen=30))
    transcript: dict[str, TranscriptEntry] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)


class OpsHub:
    def __init__(self, config: Config, bus: EventBus, ledger: SpendLedger,
                 metrics: EngineMetrics, history: CallHistory | None,
                 engine_id: str) -> None:
        self.config = config
        self.bus = bus
        self.ledger = ledger
        self.metrics = metrics
        self.history = history
        self.engine_id = engine_id
        self.stamper = ev.EventStamper(engine_id)
        self.registry: CallRegistry | None = None
        self.views: dict[str, CallView] = {}
        self._ended_views: deque[str] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_failures = 0
        self.escalations = 0

    @classmethod
    def from_config(cls, config: Config, history: CallHistory | None = None) -> OpsHub:
        """The bus the config names, a ledger and metrics; history when given."""
        return cls(config, make_event_bus(config), SpendLedger(config.prices, config.budget),
                   EngineMetrics(config.metrics, config.metrics.alert_min_turns), history,
                   ev.new_engine_id())

    # -- plumbing ------------------------------------------------------------------------

    def _bg(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def publish(self, event: ev.EventBase) -> None:
        stamped = self.stamper.stamp(event)
        self._bg(self._publish(stamped))

    async def _publish(self, event: ev.EventBase) -> None:
        try:
            await self.bus.publish(event)  # type: ignore[arg-type]
        except BusPublishError as exc:
            self._publish_failures += 1
            if self._publish_failures in (1, 10, 100) or self._publish_failures % 1000 == 0:
                log.warning("ops.publish_failed", error=str(exc), failures=self._publish_failures,
                            call_sid=event.call_sid or None)

    def _history(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.history is not None:
            self._bg(coro)
        else:
            coro.close()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for background publishes and history writes (shutdown, tests)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # -- SessionObserver -----------------------------------------------------------------

    def call_created(self, session: CallSession) -> None:
        sid = session.call_sid
        self.views[sid] = CallView(sid, session.from_number, session.to_number,
                                   session.created_at)
        self.ledger.open_call(sid, self.config.policy.call_cost_cap_usd)
        self.metrics.call_started()
        self.publish(ev.CallStarted(call_sid=sid, from_number=session.from_number,
                                    to_number=session.to_number,
                                    cost_cap_usd=self.config.policy.call_cost_cap_usd))
        if self.history is not None:
            self._history(self.history.call_started(sid, session.from_number,
                                                    session.to_number, session.created_at))

    def stream_started(self, session: CallSession) -> None:
        self.publish(ev.CallUpdated(call_sid=session.call_sid,
                                    extra={"stream_sid": session.stream_sid or ""}))
        session.spawn(self._bill_phone_minutes(session), "phone_minutes")

    async def _bill_phone_minutes(self, session: CallSession) -> None:
        """Twilio bills each minute as it starts: the call's cost (and cap) sees it live."""
        while not session.ended:
            elapsed = session.duration_s()
            update = self.ledger.phone_progress(session.call_sid, max(elapsed, 0.001))
            if update.entry.cost_usd:
                self._priced(session, update, None, call_seconds=elapsed)
                if self.history is not None:
                    self._history(self.history.phone_recorded(session.call_sid, elapsed,
                                                              update.entry.cost_usd))
            await asyncio.sleep(60.0 - elapsed % 60.0 + 0.01)

    def state_changed(self, session: CallSession, old: CallState, new: CallState,
                      reason: str) -> None:
        view = self.views.get(session.call_sid)
        if view is not None:
            view.state = new.value
        self.publish(ev.StateChanged(call_sid=session.call_sid, old=old.value, new=new.value,
                                     reason=reason))
        if self.history is not None:
            self._history(self.history.call_state(session.call_sid, new.value))

    def transcript(self, session: CallSession, speaker: str, text: str, final: bool,
                   **extra: Any) -> None:
        line_id = str(extra.get("line_id") or f"{session.call_sid}-{speaker}-{time.time_ns()}")
        if extra.get("discarded"):
            view = self.views.get(session.call_sid)
            if view is not None:
                view.transcript.pop(line_id, None)
        interrupted = bool(extra.get("interrupted", False))
        entry = TranscriptEntry(line_id=line_id, speaker=speaker, text=text,  # type: ignore[arg-type]
                                final=final, interrupted=interrupted, ts=time.time())
        view = self.views.get(session.call_sid)
        if view is not None and not extra.get("discarded"):
            view.transcript[line_id] = entry
            limit = self.config.console_api.snapshot_transcript_lines
            while len(view.transcript) > limit:
                view.transcript.pop(next(iter(view.transcript)))
        session.log.info("call.transcript", speaker=speaker, text=text, final=final,
                         interrupted=interrupted or None)
        self.publish(ev.TranscriptLine(
            call_sid=session.call_sid, speaker=speaker, text=text,  # type: ignore[arg-type]
            line_id=line_id, final=final, interrupted=interrupted,
            heard_text=str(extra.get("heard_text") or ""),
            low_confidence=bool(extra.get("low_confidence", False))))

    def usage(self, session: CallSession | None, usage: Usage) -> None:
        sid = session.call_sid if session is not None else None
        update = self.ledger.record(sid, usage)
        self._priced(session, update, usage)

    def _priced(self, session: CallSession | None, update: SpendUpdate,
                usage: Usage | None, call_seconds: float = 0.0) -> None:
        entry = update.entry
        sid = session.call_sid if session is not None else ""
        if session is not None and (view := self.views.get(sid)) is not None:
            view.cost_usd = entry.total_usd
        call = self.ledger.call(sid) if sid else None
        self.metrics.cost(entry.kind, entry.cost_usd)
        kind: ev.UsageKind = "telephony" if entry.kind == "phone" else entry.kind  # type: ignore[assignment]
        self.publish(ev.UsageCost(
            call_sid=sid, provider=entry.provider, kind=kind, model=entry.model,
            audio_seconds=usage.audio_seconds if usage else 0.0,
            input_tokens=usage.input_tokens if usage else 0,
            cached_input_tokens=usage.cached_input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            characters=usage.characters if usage else 0, call_seconds=call_seconds,
            estimated=usage.estimated if usage else False, cost_usd=entry.cost_usd,
            call_cost_usd=entry.total_usd,
            realtime_equivalent_usd=call.realtime_equivalent_usd if call else 0.0,
            day_cost_usd=self.ledger.today_usd,
            month_projection_usd=self.ledger.monthly_projection_usd))
        if usage is not None and self.history is not None:
            self._history(self.history.usage_recorded(sid or None, usage, entry.cost_usd))
        for alert in update.alerts:
            self._budget_alert(session, alert)

    def _budget_alert(self, session: CallSession | None, alert: BudgetAlert) -> None:
        kind = _BUDGET_ALERT_KIND[alert.kind]
        message = (f"{alert.kind.replace('_', ' ')}: ${alert.spent_usd:.4f} of "
                   f"${alert.limit_usd:g} ({alert.period})")
        self.alert(session, kind, "critical" if alert.kind != "call_cap" else "warning",
                   message, {"spent_usd": alert.spent_usd, "limit_usd": alert.limit_usd})

    def turn_completed(self, session: CallSession, record: TurnRecord) -> None:
        sid = session.call_sid
        t = record.timings
        view = self.views.get(sid)
        if view is not None:
            view.turns += 1
            if t.voice_to_voice is not None:
                view.v2v.append(t.voice_to_voice)
        if record.caller_audio_s or record.agent_audio_s:
            self.ledger.record_turn(sid, record.caller_audio_s, record.agent_audio_s)
        if record.cached:
            self.metrics.cache_hit()
        elif record.agent_text:
            self.metrics.cache_miss()
        if t.voice_to_voice is not None:
            alert = self.metrics.record_turn(sid, t)
            self.publish(ev.TurnLatency(
                call_sid=sid, turn=record.idx, endpointing_s=t.endpointing, stt_s=t.stt,
                llm_first_token_s=t.llm_first_token, tts_first_audio_s=t.tts_first_audio,
                engine_overhead_s=t.engine_overhead, voice_to_voice_s=t.voice_to_voice,
                audio_lead_over_llm_s=t.audio_lead_over_llm,
                llm_first_sentence_s=t.llm_first_sentence))
            if alert is not None and alert.firing:
                self.alert(None, "latency_p95", "warning",
                           f"voice-to-voice p95 {alert.p95_s:.2f} s over "
                           f"{alert.threshold_s:.2f} s", {"p95_s": alert.p95_s})
        if self.history is not None:
            self._history(self.history.turn_completed(sid, record))

    def alert(self, session: CallSession | None, kind: str, severity: str, message: str,
              data: dict[str, Any]) -> None:
        sid = session.call_sid if session is not None else ""
        if kind == "handoff_requested":
            self.metrics.escalation()
            self.escalations += 1
        view = self.views.get(sid)
        if view is not None and kind not in view.alerts:
            view.alerts.append(kind)
        (session.log if session is not None else log).warning(
            "ops.alert", kind=kind, severity=severity, message=message)
        clean: dict[str, ev.JsonScalar] = {
            k: v for k, v in data.items() if isinstance(v, str | int | float | bool)}
        self.publish(ev.Alert(call_sid=sid, kind=kind, severity=severity,  # type: ignore[arg-type]
                              message=message, data=clean))

    def provider_switched(self, kind: str, from_provider: str, to_provider: str | None,
                          error: str) -> None:
        message = f"{kind}: {from_provider} failed ({error}); " + (
            f"using {to_provider}" if to_provider else "no provider left")
        self.metrics.provider_failure(from_provider)
        self.alert(None, "provider_failover", "warning", message,
                   {"from": from_provider, "to": to_provider or ""})
        self.publish(ev.ProviderHealthChanged(provider=from_provider, kind=kind,  # type: ignore[arg-type]
                                              healthy=False, detail=error[:200]))

    def call_ended(self, session: CallSession, reason: str) -> None:
        sid = session.call_sid
        if self.registry is not None:
            self.registry.retire(session)
        duration = session.duration_s()
        ledger, update = self.ledger.end_call(sid, duration)
        self._priced(session, update, None, call_seconds=duration)
        self.metrics.call_ended(sid)
        view = self.views.get(sid)
        if view is not None:
            view.ended_at = session.ended_at
            view.end_reason = reason
            view.state = "ended"
            self._ended_views.append(sid)
            while len(self._ended_views) > 50:
                self.views.pop(self._ended_views.popleft(), None)
        escalated = session.escalated
        self.publish(ev.CallEnded(call_sid=sid, reason=reason, duration_s=duration,
                                  cost_usd=ledger.total_usd))
        if self.history is not None:
            self._history(self._record_end(sid, duration, update.entry.cost_usd, reason,
                                           ledger.total_usd, escalated, session.ended_at))

    async def _record_end(self, sid: str, duration: float, phone_cost: float, reason: str,
                          total: float, escalated: bool, ended_at: float | None) -> None:
        assert self.history is not None
        if phone_cost:
            await self.history.phone_recorded(sid, duration, phone_cost)
        await self.history.call_ended(sid, reason, total, escalated=escalated,
                                      ended_at=ended_at, duration_s=duration)

    def cost_of(self, call_sid: str) -> float:
        call = self.ledger.call(call_sid)
        return call.total_usd if call is not None else 0.0

    # -- SupervisorBackend -----------------------------------------------------------------

    def hello(self) -> Hello:
        cfg = self.config.transfer
        return Hello(engine_id=self.engine_id,
                     transfer_destinations=[(d.name, d.number) for d in cfg.destinations],
                     default_transfer_number=cfg.number)

    def snapshot(self) -> Snapshot:
        now = time.time()
        calls = []
        for view in self.views.values():
            calls.append(CallSnapshot(
                call_sid=view.call_sid, from_number=view.from_number, to_number=view.to_number,
                state=view.state,  # type: ignore[arg-type]
                started_at=view.started_at, ended_at=view.ended_at,
                end_reason=view.end_reason, cost_usd=view.cost_usd,
                cost_cap_usd=self.config.policy.call_cost_cap_usd, turns=view.turns,
                voice_to_voice_s=list(view.v2v), transcript=list(view.transcript.values()),
                alerts=list(view.alerts)))
        budget = self.config.budget
        totals = SpendTotals(
            today_usd=self.ledger.today_usd, daily_budget_usd=budget.daily_usd,
            month_to_date_usd=self.ledger.month_to_date_usd,
            monthly_projection_usd=self.ledger.monthly_projection_usd,
            monthly_budget_usd=budget.monthly_usd,
            p95_voice_to_voice_s=self.metrics.overall_p95("voice_to_voice"))
        return Snapshot(server_time=now, calls=calls, totals=totals)

    async def execute(self, command: Command, actor: str) -> Reply:
        error = await self._execute(command)
        ok = error is None
        args: dict[str, ev.JsonScalar] = {}
        if command.text is not None:
            args["text"] = command.text[:200]
        if command.number is not None:
            args["number"] = command.number
        log.info("ops.command", actor=actor, command=command.command,
                 call_sid=command.call_sid, ok=ok, error=error, **args)
        self.publish(ev.CommandAudit(call_sid=command.call_sid, actor=actor,
                                     command=command.command, args=args, ok=ok, error=error or ""))
        if self.history is not None:
            self._history(self.history.action_recorded(
                command.call_sid, actor, command.command, dict(args), ok, error,
                escalation=ok and command.command in ("transfer", "escalate")))
        return Reply(id=command.id, ok=ok, error=error)

    async def _execute(self, command: Command) -> str | None:
        """Perform a command; the error that says why it was refused, or None."""
        assert self.registry is not None
        session = self.registry.get(command.call_sid)
        if session is None:
            if self.registry.get_any(command.call_sid) is not None:
                return "call already ended"
            return "unknown call"
        state = session.state
        name = command.command
        if name == "take_over":
            if state is not CallState.AI:
                return f"not allowed in state {state.value}"
            session.take_over()
            return None
        if name == "hand_back":
            if state is not CallState.HUMAN_TAKEOVER:
                return f"not allowed in state {state.value}"
            session.hand_back()
            return None
        if name == "say":
            text = (command.text or "").strip()
            if not text:
                return "say needs text"
            if state not in (CallState.AI, CallState.HUMAN_TAKEOVER):
                return f"not allowed in state {state.value}"
            try:
                await session.say_now(text, speaker="supervisor")
            except Exception as exc:  # the caller must not lose the call over a TTS error
                return f"could not speak the line: {exc}"
            return None
        if name in ("transfer", "escalate"):
            if state not in (CallState.AI, CallState.HUMAN_TAKEOVER):
                return f"not allowed in state {state.value}"
            number = self._destination(command.number if name == "transfer" else None)
            if number is None:
                return "no transfer destination: give a number or set transfer.number"
            if not _NUMBER.match(number):
                return f"invalid transfer number {number!r}"
            result = await session.transfer(number, f"supervisor {name}")
            if not result.ok and not result.already_ended:
                return f"transfer failed: {result.error}"
            self.metrics.escalation()
            return None
        if name == "hang_up":
            await session.hang_up("supervisor hung up")
            return None
        return f"unknown command {name!r}"

    def _destination(self, given: str | None) -> str | None:
        cfg = self.config.transfer
        if given:
            for dest in cfg.destinations:
                if dest.name.lower() == given.lower():
                    return dest.number
            return given.replace(" ", "")
        return cfg.number or None

