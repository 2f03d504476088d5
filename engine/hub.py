"""The operations hub: what sessions report becomes events, money, metrics and history.

Sessions call the hub synchronously (it implements `SessionObserver`); anything that
waits (bus publish, SQLite) runs in background tasks so a call never stalls on it. The
hub is also what the supervisor API talks to (`SupervisorBackend`): it keeps the call
views the snapshots are built from (supervision/views.py) and hands commands to the
supervisor commands (supervision/commands.py), which audit them.

Money: every booking goes through the ledger to the budget (money/budget.py). A call
that reaches its cost cap is told at once (`CallSession.cost_cap_reached`); a change of
the budget's state becomes a `BudgetStateChanged` event (and an alert when it gets
worse), and the state decides whether a new call is taken (`admission`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from engine.bus import events as ev
from engine.bus.event_bus import BusPublishError, EventBus, make_event_bus
from engine.config import Config
from engine.log import get_logger
from engine.money.budget import BudgetChange, budget_from_config
from engine.money.ledger import CapAlert, LedgerEntry, SpendLedger, SpendUpdate
from engine.money.prices import dec, utc_now
from engine.providers.base import Usage
from engine.record.bill import TwilioMinutes
from engine.record.health import bus_section, history_section
from engine.record.history import CallHistory
from engine.record.metrics import EngineMetrics
from engine.session.records import ToolCallRecord, TurnRecord
from engine.supervision.api_schema import Hello, Snapshot, TranscriptEntry
from engine.supervision.commands import SupervisorCommands
from engine.supervision.tool_calls import redacted_names, redacted_record, tool_called_event
from engine.supervision.views import CallViews
from engine.tasks import stop_task
from engine.telephony.webhooks import Admission

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.registry import CallRegistry

log = get_logger(__name__)

_TWILIO_MINUTES = frozenset({"phone", "media_stream"})
_CAP_ALERT_KIND: dict[str, ev.AlertKind] = {
    "call_cap": "call_cost_cap", "call_cap_warning": "call_cost_warning"}
_LIMIT_ALERT_KIND: dict[str, ev.AlertKind] = {
    "daily": "daily_budget", "monthly": "monthly_budget"}
_ADMISSION: dict[str, Admission] = {"forwarding": "forward", "refusing": "refuse"}


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
        metrics.watch_record(history.stats if history is not None else None, bus.health)
        self.escalations = 0
        self.budget = ledger.budget
        self.budget.on_change = self._budget_changed
        self.turned_away: dict[Admission, int] = {}  # new calls not taken, per answer
        self._day_watch: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: Config, history: CallHistory | None = None,
                    clock: Callable[[], datetime] = utc_now) -> OpsHub:
        """The bus the config names, a ledger over the configured budget (this engine's
        totals, or the fleet's through Redis) and metrics; history when given."""
        engine_id = ev.new_engine_id()
        policy = config.policy
        ledger = SpendLedger(config.prices, budget_from_config(config, engine_id, clock),
                             clock, policy.call_cost_cap_usd, policy.call_cost_warning_share)
        return cls(config, make_event_bus(config), ledger,
                   EngineMetrics(config.metrics, config.metrics.alert_min_turns), history,
                   engine_id)

    async def start(self) -> None:
        """Engine start: the budget's totals go live (the fleet's: a first read from
        Redis), its state at start is reported, and each UTC midnight is watched."""
        await self.budget.totals.start()
        self.budget.state()
        self._day_watch = asyncio.get_running_loop().create_task(
            self.budget.watch_days(), name="budget-days")

    async def stop(self) -> None:
        """Engine stop, after the last booking: the fleet's totals get a last flush."""
        await stop_task(self._day_watch)
        await self.budget.totals.aclose()

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

    async def record_health(self, degraded: list[str]) -> dict[str, Any]:
        """/healthz's "history" and "bus" sections; what is wrong goes to `degraded`."""
        history = self.history.stats() if self.history is not None else None
        return {"history": history_section(history, degraded),
                "bus": bus_section(await self.bus.check(), degraded)}

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
        session.spawn(self._bill_minutes(session), "phone_minutes")

    async def _bill_minutes(self, session: CallSession) -> None:
        """Twilio bills each minute as it starts, the call's from the answer (webhook) and
        the media stream's from its start: the call's cost (and cap) sees them live."""
        while not session.ended:
            elapsed = session.duration_s()
            update = self.ledger.phone_progress(session.call_sid, max(elapsed, 0.001))
            if update is not None and update.entry.cost_usd:
                self._priced(session, update, None, call_seconds=elapsed)
            wake = 60.0 - elapsed % 60.0
            if session.stream_sid is not None and session.stream_started_at is not None:
                streamed = session.stream_duration_s()
                self._bill_stream(session, session.stream_sid, max(streamed, 0.001))
                wake = min(wake, 60.0 - streamed % 60.0)
            await asyncio.sleep(wake + 0.01)

    def stream_ended(self, session: CallSession, stream_sid: str, duration_s: float) -> None:
        self._bill_stream(session, stream_sid, max(duration_s, 0.001))

    def _bill_stream(self, session: CallSession, stream_sid: str, duration_s: float) -> None:
        update = self.ledger.media_stream_progress(session.call_sid, stream_sid, duration_s)
        if update is not None and update.entry.cost_usd:
            self._priced(session, update, None, call_seconds=duration_s)

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
            view.unpriced = view.unpriced or not entry.priced
        call = self.ledger.call(sid) if sid else None
        self.metrics.cost(entry.kind, entry.cost_usd)
        # Phone and Media Streams minutes are both Twilio's (told apart by the model).
        kind: ev.UsageKind = "telephony" if entry.kind in _TWILIO_MINUTES \
            else entry.kind  # type: ignore[assignment]
        self.publish(ev.UsageCost(
            call_sid=sid, provider=entry.provider, kind=kind, model=entry.model,
            audio_seconds=usage.audio_seconds if usage else 0.0,
            input_tokens=usage.input_tokens if usage else 0,
            cached_input_tokens=usage.cached_input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            characters=usage.characters if usage else 0, call_seconds=call_seconds,
            estimated=usage.estimated if usage else False, unpriced=not entry.priced,
            cached=usage.cached if usage else False,
            cost_usd=entry.cost_usd,
            call_cost_usd=entry.total_usd,
            realtime_equivalent_usd=call.realtime_equivalent_usd if call else 0.0,
            day_cost_usd=self.ledger.today_usd,
            month_projection_usd=self.ledger.monthly_projection_usd))
        if self.history is not None:
            self._record_booking(sid or None, entry, usage, call_seconds)
        for alert in update.alerts:
            self._cap_alert(session, alert)

    def _record_booking(self, sid: str | None, entry: LedgerEntry, usage: Usage | None,
                        call_seconds: float) -> None:
        """The booking and its cost lines into the history. Writes are queued in the
        order they are made, so everything booked before the end precedes the end."""
        assert self.history is not None
        if usage is not None:
            self._bg(self.history.usage_recorded(sid, usage, list(entry.lines)))
        elif sid is not None and entry.minutes and entry.kind in _TWILIO_MINUTES:
            kind: TwilioMinutes = "phone" if entry.kind == "phone" else "media_stream"
            prices = self.config.prices
            rate = dec(prices.twilio_per_minute if kind == "phone"
                       else prices.twilio_media_streams_per_minute)
            self._bg(self.history.minutes_recorded(sid, kind, entry.model, entry.minutes,
                                                   rate, call_seconds))

    def _cap_alert(self, session: CallSession | None, alert: CapAlert) -> None:
        reached = alert.kind == "call_cap"
        message = (f"call cost {'cap reached' if reached else 'near its cap'}: "
                   f"${alert.spent_usd:.4f} of ${alert.limit_usd:g}")
        self.alert(session, _CAP_ALERT_KIND[alert.kind], "warning" if reached else "info",
                   message, {"spent_usd": alert.spent_usd, "limit_usd": alert.limit_usd})
        if reached and session is not None:
            session.cost_cap_reached()  # it acts at its next safe point

    # -- the daily and monthly budget ----------------------------------------------------

    def _budget_changed(self, change: BudgetChange) -> None:
        self.publish(ev.BudgetStateChanged(
            old=change.old, new=change.new, limit=change.limit, period=change.period,
            spent_usd=change.spent_usd, limit_usd=change.limit_usd, totals=change.totals))
        if change.worse:
            self.alert(None, _LIMIT_ALERT_KIND[change.limit],
                       "warning" if change.new == "warning" else "critical", change.summary,
                       {"state": change.new, "spent_usd": change.spent_usd,
                        "limit_usd": change.limit_usd, "totals": change.totals})

    def admission(self) -> Admission:
        """Whether a new call is taken, forwarded or refused: the budget's state now."""
        return _ADMISSION.get(self.budget.state(), "connect")

    def call_turned_away(self, call_sid: str, answer: Admission) -> None:
        """A new call answered with TwiML alone. A refused one still costs its first
        phone minute; a forwarded one is the human team's call from its start."""
        self.turned_away[answer] = self.turned_away.get(answer, 0) + 1
        if answer == "refuse":
            self._priced(None, self.ledger.turned_away(call_sid), None, call_seconds=60.0)

    def tool_called(self, session: CallSession, record: ToolCallRecord) -> None:
        """A tool call is over: an event (arguments redacted as configured), the call's
        view (snapshots show it), the history. Its LLM rounds are booked as usage."""
        names = redacted_names(self.config)
        event = tool_called_event(session.call_sid, record, names)
        self.views.put_tool_call(event)
        session.log.debug("ops.tool_called", tool=record.name, outcome=record.outcome,
                          latency_s=round(record.latency_s, 3), turn=record.turn)
        self.publish(event)
        if self.history is not None:
            self._bg(self.history.tool_called(session.call_sid,
                                              redacted_record(record, names)))

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
                llm_first_sentence_s=t.llm_first_sentence, speculated=record.speculated))
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
            # Queued after the last minutes `_priced` wrote above; a booking written after
            # this adds itself to the call's total.
            self._bg(self.history.call_ended(sid, reason, ledger.total_usd,
                                             escalated=escalated, ended_at=session.ended_at,
                                             duration_s=duration))

    def cost_of(self, call_sid: str) -> float:
        call = self.ledger.call(call_sid)
        return call.total_usd if call is not None else 0.0

    # -- SupervisorBackend ---------------------------------------------------------------

    def hello(self) -> Hello:
        return self.views.hello()

    def snapshot(self) -> Snapshot:
        return self.views.snapshot()
