"""The console's data model: a projection of a Snapshot plus live events into per-call view
state (`console/view_state.py`). Pure Python (no Textual), so it is fast and testable on its own.

The stream worker calls `apply_snapshot` / `apply_event`; the UI's periodic flush calls
`tick(now)` and `take_changes()` and redraws only what changed. All durations come from an
injectable clock so tests (and snapshot images) can freeze time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from console.view_state import (
    AlertNotice,
    CallView,
    Changes,
    LineView,
    Totals,
    percentile,
    snapshot_lines,
    tool_line_view,
)
from engine.bus.events import (
    Alert,
    BudgetStateChanged,
    BusGap,
    CallEnded,
    CallStarted,
    CallState,
    CallUpdated,
    CommandAudit,
    Event,
    EventBase,
    ProviderHealthChanged,
    StateChanged,
    ToolCalled,
    TranscriptLine,
    TurnLatency,
    UsageCost,
)
from engine.supervision.api_schema import CallSnapshot, Snapshot, SpendTotals

Clock = Callable[[], float]


class ConsoleModel:
    """Per-call view state built from a Snapshot and the events after it."""

    def __init__(self, clock: Clock = time.time, *, ended_ttl_s: float = 60.0,
                 max_lines_per_call: int = 400, latency_window: int = 200,
                 p95_sample_s: float = 5.0, p95_history: int = 60) -> None:
        self.clock = clock
        self.ended_ttl_s = ended_ttl_s
        self.max_lines_per_call = max_lines_per_call
        self.calls: dict[str, CallView] = {}
        self.totals = Totals()
        self.cursor = ""  # id of the last event applied (resume point)
        self.engine_offset_s = 0.0  # engine clock minus our clock (from Snapshot.server_time)
        self.last_lag_s: float | None = None
        self.engine_alerts = 0
        self.events_applied = 0
        self.duplicates_dropped = 0
        self.gaps = 0
        self.unhealthy_providers: dict[str, str] = {}  # "kind:name" -> detail
        self.default_cost_cap_usd = 0.0
        self.recent_latencies: deque[float] = deque(maxlen=latency_window)
        self.p95_history: deque[float] = deque(maxlen=p95_history)
        self._p95_sample_s = p95_sample_s
        self._last_p95_sample = float("-inf")
        self._arrivals = 0
        self._last_seq: dict[str, int] = {}  # engine_id -> last seq applied (dedup)
        self._changes = Changes(order=True, totals=True)

    # -- time ------------------------------------------------------------------------------

    def engine_now(self) -> float:
        """Our clock mapped onto the engine's, so durations survive clock skew."""
        return self.clock() + self.engine_offset_s

    def duration_s(self, call: CallView) -> float:
        end = call.ended_at if call.ended_at is not None else self.engine_now()
        return max(0.0, end - call.started_at) if call.started_at else 0.0

    # -- input -----------------------------------------------------------------------------

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace everything with the snapshot (a fresh start after connect or a gap)."""
        if snapshot.server_time:
            self.engine_offset_s = snapshot.server_time - self.clock()
        old = self.calls
        self.calls = {}
        for snap in snapshot.calls:
            self.calls[snap.call_sid] = self._call_from_snapshot(snap, old.get(snap.call_sid))
        self._apply_totals(snapshot.totals)
        self.recent_latencies.clear()
        for call in self.calls.values():
            self.recent_latencies.extend(call.latencies)
        self.cursor = snapshot.cursor
        # Seq numbering restarts from the snapshot's point of view.
        self._last_seq.clear()
        self._changes.order = True
        self._changes.totals = True
        self._changes.rows.update(self.calls)
        for sid in self.calls:
            self._changes.transcript_touched.add(sid)
            self._changes.latencies.add(sid)

    def _call_from_snapshot(self, snap: CallSnapshot, previous: CallView | None) -> CallView:
        call = CallView(call_sid=snap.call_sid,
                        arrival=previous.arrival if previous else self._next_arrival(),
                        from_number=snap.from_number, to_number=snap.to_number,
                        state=snap.state, started_at=snap.started_at, ended_at=snap.ended_at,
                        end_reason=snap.end_reason, cost_usd=snap.cost_usd,
                        cost_cap_usd=snap.cost_cap_usd, turns=snap.turns,
                        alerts=list(dict.fromkeys(snap.alerts)), unpriced=snap.unpriced,
                        engine_id=snap.engine_id, variant=snap.variant)
        if snap.state == CallState.ENDED and call.ended_at is None:
            call.ended_at = snap.started_at
        if snap.cost_cap_usd > 0:
            self.default_cost_cap_usd = snap.cost_cap_usd
        call.latencies.extend(snap.voice_to_voice_s)
        for line in snapshot_lines(snap):
            self._put_line(call, line)
        return call

    def _apply_totals(self, totals: SpendTotals) -> None:
        self.totals = Totals(today_usd=totals.today_usd,
                             daily_budget_usd=totals.daily_budget_usd,
                             month_to_date_usd=totals.month_to_date_usd,
                             monthly_projection_usd=totals.monthly_projection_usd,
                             monthly_budget_usd=totals.monthly_budget_usd,
                             p95_voice_to_voice_s=totals.p95_voice_to_voice_s,
                             budget_state=totals.budget_state,
                             budget_limit=totals.budget_limit,
                             budget_totals=totals.budget_totals)
        if totals.p95_voice_to_voice_s is not None:
            self.p95_history.append(totals.p95_voice_to_voice_s)

    def apply_event(self, event: Event | EventBase, event_id: str = "") -> bool:
        """Apply one event. Returns False when it was a duplicate (already applied)."""
        if event.seq > 0 and event.engine_id:
            last = self._last_seq.get(event.engine_id, 0)
            if event.seq <= last:
                self.duplicates_dropped += 1
                return False
            self._last_seq[event.engine_id] = event.seq
        if event_id:
            self.cursor = event_id
        self.events_applied += 1
        if event.ts:
            self.last_lag_s = max(0.0, self.engine_now() - event.ts)
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
        return True

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    def _call(self, event: EventBase) -> CallView | None:
        """The event's call, created on first sight (we may have joined mid-call)."""
        if not event.call_sid:
            return None
        call = self.calls.get(event.call_sid)
        if call is None:
            call = CallView(call_sid=event.call_sid, arrival=self._next_arrival(),
                            started_at=event.ts or self.engine_now(),
                            cost_cap_usd=self.default_cost_cap_usd)
            self.calls[event.call_sid] = call
            self._changes.order = True
        self._changes.rows.add(call.call_sid)
        return call

    def _on_call_started(self, event: CallStarted) -> None:
        call = self._call(event)
        if call is None:
            return
        call.from_number = event.from_number
        call.to_number = event.to_number
        call.engine_id = event.engine_id  # the engine that started it owns it
        if event.cost_cap_usd is not None:
            call.cost_cap_usd = event.cost_cap_usd
        if event.ts:
            call.started_at = event.ts

    def _on_call_updated(self, event: CallUpdated) -> None:
        call = self._call(event)
        if call is None:
            return
        if event.turns is not None:
            call.turns = event.turns
        if event.variant is not None:
            call.variant = event.variant
        for kind, name in (("stt", event.stt_provider), ("agent", event.agent_provider),
                           ("tts", event.tts_provider)):
            if name is not None:
                call.providers[kind] = name

    def _on_call_ended(self, event: CallEnded) -> None:
        call = self._call(event)
        if call is None:
            return
        call.state = CallState.ENDED
        call.end_reason = event.reason
        call.ended_at = event.ts or self.engine_now()
        if event.duration_s and call.started_at == 0.0:
            call.started_at = call.ended_at - event.duration_s
        if event.cost_usd:
            call.cost_usd = event.cost_usd
        if event.reason == "lost":  # its engine died (engine/fleet): ended, and said so
            self._changes.notices.append(AlertNotice(
                call_sid=call.call_sid, kind="call_lost", severity="warning",
                message="call lost: the engine that carried it stopped (no heartbeat)"))

    def _on_state_changed(self, event: StateChanged) -> None:
        call = self._call(event)
        if call is None:
            return
        call.state = event.new
        if event.new == CallState.ENDED and call.ended_at is None:
            call.ended_at = event.ts or self.engine_now()

    def _on_transcript(self, event: TranscriptLine) -> None:
        call = self._call(event)
        if call is None:
            return
        appended = self._put_line(call, LineView(
            line_id=event.line_id, speaker=event.speaker, text=event.text, final=event.final,
            interrupted=event.interrupted, heard_text=event.heard_text,
            low_confidence=event.low_confidence, ts=event.ts))
        self._touch_transcript(call.call_sid, appended)

    def _on_tool_called(self, event: ToolCalled) -> None:
        call = self._call(event)
        if call is None:
            return
        appended = self._put_line(call, tool_line_view(
            event.call_id or f"{event.engine_id}:{event.seq}", event.name, event.arguments,
            event.outcome, event.summary, event.latency_s, event.ts))
        self._touch_transcript(call.call_sid, appended)

    def _touch_transcript(self, sid: str, appended: bool) -> None:
        self._changes.transcript_touched.add(sid)
        if appended:
            self._changes.transcripts[sid] = self._changes.transcripts.get(sid, 0) + 1

    def _put_line(self, call: CallView, line: LineView) -> bool:
        """Insert or replace (by line_id). True when a new line was appended."""
        index = call.line_index.get(line.line_id)
        if index is not None:
            call.transcript[index] = line
            return False
        call.line_index[line.line_id] = len(call.transcript)
        call.transcript.append(line)
        # Trim in chunks so the index is rebuilt rarely, not on every line.
        if len(call.transcript) > self.max_lines_per_call + 50:
            del call.transcript[:len(call.transcript) - self.max_lines_per_call]
            call.line_index = {ln.line_id: i for i, ln in enumerate(call.transcript)}
        return True

    def _on_latency(self, event: TurnLatency) -> None:
        call = self._call(event)
        if call is not None:
            call.latencies.append(event.voice_to_voice_s)
            call.turns = max(call.turns, event.turn)
            self._changes.latencies.add(call.call_sid)
        self.recent_latencies.append(event.voice_to_voice_s)
        self.totals.p95_voice_to_voice_s = percentile(self.recent_latencies, 0.95)
        self._changes.totals = True

    def _on_usage(self, event: UsageCost) -> None:
        call = self._call(event)
        if call is not None:
            call.cost_usd = event.call_cost_usd
            call.unpriced = call.unpriced or event.unpriced
        if event.day_cost_usd is not None:
            self.totals.today_usd = event.day_cost_usd
        if event.month_projection_usd is not None:
            self.totals.monthly_projection_usd = event.month_projection_usd
        self._changes.totals = True

    def _on_alert(self, event: Alert) -> None:
        call = self._call(event)
        if call is None:
            self.engine_alerts += 1
        elif event.kind not in call.alerts:
            call.alerts.append(event.kind)
        self._changes.notices.append(AlertNotice(call_sid=event.call_sid, kind=event.kind,
                                                 severity=event.severity,
                                                 message=event.message))

    def _on_budget(self, event: BudgetStateChanged) -> None:
        totals = self.totals
        totals.budget_state = event.new
        totals.budget_limit = "" if event.new == "ok" else event.limit
        totals.budget_totals = event.totals
        self._changes.totals = True
        if event.new == "ok":  # getting worse comes with an alert of its own
            self._changes.notices.append(AlertNotice(
                call_sid="", kind="budget", severity="information",
                message=f"budget ok again: the {event.limit} limit lifted ({event.period})"))

    def _on_provider_health(self, event: ProviderHealthChanged) -> None:
        key = f"{event.kind}:{event.provider}"
        if event.healthy:
            self.unhealthy_providers.pop(key, None)
        else:
            self.unhealthy_providers[key] = event.detail
        self._changes.totals = True
        self._changes.notices.append(AlertNotice(
            call_sid="", kind="provider_health", severity="information" if event.healthy
            else "warning",
            message=f"{event.kind} provider {event.provider} "
                    f"{'recovered' if event.healthy else 'down'}"
                    f"{': ' + event.detail if event.detail else ''}"))

    def _on_audit(self, event: CommandAudit) -> None:
        call = self._call(event)
        if call is None:
            return
        outcome = "ok" if event.ok else f"failed: {event.error}"
        detail = " ".join(f"{k}={v}" for k, v in event.args.items())
        text = f"{event.actor} {event.command}{' ' + detail if detail else ''} ({outcome})"
        appended = self._put_line(call, LineView(
            line_id=f"audit:{event.engine_id}:{event.seq}:{len(call.transcript)}",
            speaker="system", text=text, ts=event.ts))
        self._touch_transcript(call.call_sid, appended)

    def _on_gap(self, event: BusGap) -> None:
        self.gaps += 1
        count = f"{event.count} " if event.count is not None else ""
        self._changes.notices.append(AlertNotice(
            call_sid="", kind="bus_gap", severity="warning",
            message=f"{count}events lost ({event.reason}); the view may be stale"))

    # -- output ----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[str]:
        """Drop ended calls older than the TTL and sample the overall p95. Returns the
        dropped call ids. `now` is our clock (defaults to the injected one)."""
        local_now = self.clock() if now is None else now
        engine_now = local_now + self.engine_offset_s
        dropped = [sid for sid, call in self.calls.items()
                   if call.ended_at is not None
                   and engine_now - call.ended_at >= self.ended_ttl_s]
        for sid in dropped:
            del self.calls[sid]
            self._changes.rows.discard(sid)
        if dropped:
            self._changes.order = True
        if (self.totals.p95_voice_to_voice_s is not None
                and local_now - self._last_p95_sample >= self._p95_sample_s):
            self._last_p95_sample = local_now
            self.p95_history.append(self.totals.p95_voice_to_voice_s)
            self._changes.totals = True
        return dropped

    def take_changes(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        return changes

    def sorted_calls(self, needle: str = "") -> list[CallView]:
        """Oldest call first; ties keep arrival order, so rows never swap on their own.
        An ended call keeps its place (dimmed) until it expires: rows do not jump under
        the supervisor's cursor, and the table only ever appends and removes rows."""
        return sorted((c for c in self.calls.values() if c.matches(needle)),
                      key=lambda c: (c.started_at, c.arrival))

    @property
    def live_count(self) -> int:
        return sum(1 for c in self.calls.values() if not c.ended)

    @property
    def alert_count(self) -> int:
        """Live calls carrying an alert marker, plus engine-wide alerts seen."""
        return sum(1 for c in self.calls.values() if c.alerts and not c.ended) + \
            self.engine_alerts


_HANDLERS: dict[type, Callable[[ConsoleModel, object], None]] = {
    CallStarted: ConsoleModel._on_call_started,  # type: ignore[dict-item]
    CallUpdated: ConsoleModel._on_call_updated,  # type: ignore[dict-item]
    CallEnded: ConsoleModel._on_call_ended,  # type: ignore[dict-item]
    StateChanged: ConsoleModel._on_state_changed,  # type: ignore[dict-item]
    TranscriptLine: ConsoleModel._on_transcript,  # type: ignore[dict-item]
    TurnLatency: ConsoleModel._on_latency,  # type: ignore[dict-item]
    UsageCost: ConsoleModel._on_usage,  # type: ignore[dict-item]
    Alert: ConsoleModel._on_alert,  # type: ignore[dict-item]
    BudgetStateChanged: ConsoleModel._on_budget,  # type: ignore[dict-item]
    ProviderHealthChanged: ConsoleModel._on_provider_health,  # type: ignore[dict-item]
    CommandAudit: ConsoleModel._on_audit,  # type: ignore[dict-item]
    BusGap: ConsoleModel._on_gap,  # type: ignore[dict-item]
    ToolCalled: ConsoleModel._on_tool_called,  # type: ignore[dict-item]
}
