"""The supervisor's view of calls: what a console's hello and snapshot show.

Kept in memory from what sessions report (the hub updates it), small and bounded: a few
recent latencies, transcript lines and tool calls per call, the last 50 ended calls. A
snapshot is built from it and the ledger's totals without touching any session.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.bus.events import CallState, ToolCalled
from engine.config import Config
from engine.money.ledger import SpendLedger
from engine.record.metrics import EngineMetrics
from engine.supervision.api_schema import (
    CallSnapshot,
    Hello,
    Snapshot,
    SpendTotals,
    ToolCallEntry,
    TranscriptEntry,
)

ENDED_CALLS_KEPT = 50
# Tool calls kept per call for the snapshot: apart from the transcript lines, so what the
# agent looked up early in a long call is still there when a supervisor takes over.
TOOL_CALLS_KEPT = 20


@dataclass
class CallView:
    """What the supervisor API shows of one call (kept small and bounded)."""

    call_sid: str
    from_number: str
    to_number: str
    started_at: float
    state: CallState = CallState.CONNECTED
    ended_at: float | None = None
    end_reason: str | None = None
    cost_usd: float = 0.0
    turns: int = 0
    v2v: deque[float] = field(default_factory=lambda: deque(maxlen=30))
    transcript: dict[str, TranscriptEntry] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    unpriced: bool = False  # some of its cost had no price (counted as $0)
    tool_calls: deque[ToolCallEntry] = field(
        default_factory=lambda: deque(maxlen=TOOL_CALLS_KEPT))
    engine_id: str = ""  # the engine that owns it ("" here: this engine)
    variant: str = ""  # "experiment/variant" of an A/B experiment (engine/experiments)
    cost_cap_usd: float | None = None  # as its engine reported it (None: this config's)


class CallViews:
    """Every live call and the most recently ended ones, by call sid."""

    def __init__(self, config: Config, ledger: SpendLedger, metrics: EngineMetrics,
                 engine_id: str) -> None:
        self._config = config
        self._ledger = ledger
        self._metrics = metrics
        self._engine_id = engine_id
        self._views: dict[str, CallView] = {}
        self._ended: deque[str] = deque()

    def open(self, call_sid: str, from_number: str, to_number: str,
             started_at: float) -> None:
        self._views[call_sid] = CallView(call_sid, from_number, to_number, started_at)

    def get(self, call_sid: str) -> CallView | None:
        return self._views.get(call_sid)

    def put_line(self, call_sid: str, entry: TranscriptEntry) -> None:
        """Add or replace (same line_id) a transcript line; only the newest are kept."""
        view = self._views.get(call_sid)
        if view is None:
            return
        view.transcript[entry.line_id] = entry
        limit = self._config.console_api.snapshot_transcript_lines
        while len(view.transcript) > limit:
            view.transcript.pop(next(iter(view.transcript)))

    def put_tool_call(self, event: ToolCalled) -> None:
        """Keep a tool call as it was published (arguments already redacted)."""
        view = self._views.get(event.call_sid)
        if view is not None:
            view.tool_calls.append(ToolCallEntry(
                call_id=event.call_id, turn=event.turn, name=event.name,
                arguments=dict(event.arguments), outcome=event.outcome,
                summary=event.summary, latency_s=event.latency_s,
                ts=event.ts or time.time()))

    def drop_line(self, call_sid: str, line_id: str) -> None:
        """Forget a line the session discarded (noise, not a turn after all)."""
        view = self._views.get(call_sid)
        if view is not None:
            view.transcript.pop(line_id, None)

    def close(self, call_sid: str, ended_at: float | None, reason: str) -> None:
        """Mark the call ended; the oldest ended calls beyond ENDED_CALLS_KEPT go."""
        view = self._views.get(call_sid)
        if view is None or view.end_reason is not None:
            return
        view.ended_at = ended_at
        view.end_reason = reason
        view.state = CallState.ENDED
        self._ended.append(call_sid)
        while len(self._ended) > ENDED_CALLS_KEPT:
            self._views.pop(self._ended.popleft(), None)

    def hello(self) -> Hello:
        cfg = self._config.transfer
        return Hello(engine_id=self._engine_id,
                     transfer_destinations=[(d.name, d.number) for d in cfg.destinations],
                     default_transfer_number=cfg.number)

    def __contains__(self, call_sid: str) -> bool:
        return call_sid in self._views

    def call_snapshots(self) -> list[CallSnapshot]:
        """Every call kept, as a snapshot shows it, each with its owning engine."""
        cost_cap_usd = self._config.policy.call_cost_cap_usd
        return [CallSnapshot(
            call_sid=view.call_sid, from_number=view.from_number, to_number=view.to_number,
            state=view.state, started_at=view.started_at, ended_at=view.ended_at,
            end_reason=view.end_reason, cost_usd=view.cost_usd,
            cost_cap_usd=cost_cap_usd if view.cost_cap_usd is None else view.cost_cap_usd,
            turns=view.turns, voice_to_voice_s=list(view.v2v),
            transcript=list(view.transcript.values()), alerts=list(view.alerts),
            unpriced=view.unpriced, tool_calls=list(view.tool_calls),
            engine_id=view.engine_id or self._engine_id, variant=view.variant)
            for view in self._views.values()]

    def snapshot(self) -> Snapshot:
        now = time.time()
        calls = self.call_snapshots()
        ledger = self._ledger
        budget = ledger.budget.reading()
        totals = SpendTotals(
            today_usd=float(budget.daily.spent_usd),
            daily_budget_usd=float(budget.daily.limit_usd),
            month_to_date_usd=float(budget.monthly.spent_usd),
            monthly_projection_usd=ledger.monthly_projection_usd,
            monthly_budget_usd=float(budget.monthly.limit_usd),
            p95_voice_to_voice_s=self._metrics.overall_p95("voice_to_voice"),
            budget_state=budget.state,
            budget_limit="" if budget.state == "ok" else budget.driver.limit,
            budget_totals=budget.totals)
        return Snapshot(server_time=now, calls=calls, totals=totals)
