"""The operations hub: what sessions report becomes events, money, metrics and history.

Sessions call the hub synchronously (it implements `SessionObserver`); anything that
waits (bus publish, SQLite) runs in background tasks so a call never stalls on it. The
hub is also what the supervisor API talks to (`SupervisorBackend`): it keeps the call
views the snapshots are built from (supervision/views.py) and hands commands to the
supervisor commands (supervision/commands.py), which audit them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
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
from engine.supervision.api_schema import Command, Hello, Reply, Snapshot, TranscriptEntry
from engine.supervision.commands import SupervisorCommands
from engine.supervision.views import CallViews

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.registry import CallRegistry

log = get_logger(__name__)

_BUDGET_ALERT_KIND: dict[str, ev.AlertKind] = {
    "call_cap": "call_cost_cap", "daily_budget": "daily_budget", "monthly_budget": "daily_budget"}


class OpsHub:
    """Fans out what sessions report: events, the ledger, metrics, history, call views."""

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
        self.views = CallViews(config, ledger, metrics, engine_id)
        self.commands = SupervisorCommands(config, metrics, history, self.publish, self._bg)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publish_failures = 0
        self.escalations = 0

    @classmethod
    def from_config(cls, config: Config, history: CallHistory | None = None) -> OpsHub:
        """The bus the config names, a ledger and metrics; history when given."""
        return cls(config, make_event_bus(config), SpendLedger(config.prices, config.budget),
                   EngineMetrics(config.metrics, config.metrics.alert_min_turns), history,
                   ev.new_engine_id())

    @property
    def registry(self) -> CallRegistry | None:
        """The engine's calls (set by the app): commands find their call in it, and an
        ended call is retired from it."""
        return self.commands.registry

    @registry.setter
    def registry(self, registry: CallRegistry | None) -> None:
        self.commands.registry = registry

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

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for background publishes and history writes (shutdown, tests)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # -- SessionObserver -----------------------------------------------------------------

    def call_created(self, session: CallSession) -> None:
        sid = session.call_sid
        self.views.open(sid, session.from_number, session.to_number, session.created_at)
        self.ledger.open_call(sid, self.config.policy.call_cost_cap_usd)
        self.metrics.call_started()
        self.publish(ev.CallStarted(call_sid=sid, from_number=session.from_number,
                                    to_number=session.to_number,
                                    cost_cap_usd=self.config.policy.call_cost_cap_usd))
        if self.history is not None:
            self._bg(self.history.call_started(sid, session.from_number, session.to_number,
                                               session.created_at))

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
                    self._bg(self.history.phone_recorded(session.call_sid, elapsed,
                                                         update.entry.cost_usd))
            await asyncio.sleep(60.0 - elapsed % 60.0 + 0.01)

    def state_changed(self, session: CallSession, old: ev.CallState, new: ev.CallState,
                      reason: str) -> None:
        view = self.views.get(session.call_sid)
        if view is not None:
            view.state = new
        self.publish(ev.StateChanged(call_sid=session.call_sid, old=old, new=new, reason=reason))
        if self.history is not None:
            self._bg(self.history.call_state(session.call_sid, new.value))

    def transcript(self, session: CallSession, speaker: str, text: str, final: bool,
                   **extra: Any) -> None:
        line_id = str(extra.get("line_id") or f"{session.call_sid}-{speaker}-{time.time_ns()}")
        interrupted = bool(extra.get("interrupted", False))
        if extra.get("discarded"):
            self.views.drop_line(session.call_sid, line_id)
        else:
            self.views.put_line(session.call_sid, TranscriptEntry(
                line_id=line_id, speaker=speaker, text=text,  # type: ignore[arg-type]
                final=final, interrupted=interrupted, ts=time.time()))
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
            self._bg(self.history.usage_recorded(sid or None, usage, entry.cost_usd))
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
            self._bg(self.history.turn_completed(sid, record))

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
        self.views.close(sid, session.ended_at, reason)
        escalated = session.escalated
        self.publish(ev.CallEnded(call_sid=sid, reason=reason, duration_s=duration,
                                  cost_usd=ledger.total_usd))
        if self.history is not None:
            self._bg(self._record_end(sid, duration, update.entry.cost_usd, reason,
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

    # -- SupervisorBackend ---------------------------------------------------------------

    def hello(self) -> Hello:
        return self.views.hello()

    def snapshot(self) -> Snapshot:
        return self.views.snapshot()

    async def execute(self, command: Command, actor: str) -> Reply:
        return await self.commands.execute(command, actor)
