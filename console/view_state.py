"""What the console shows, as plain data: one CallView per call (its lines, latencies,
alerts), the spend totals, and the Changes a flush redraws. No Textual, no event logic:
`console/model.py` fills these from the snapshot and the events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.bus.events import CallState, JsonScalar, Speaker
from engine.supervision.api_schema import CallSnapshot


@dataclass(slots=True, frozen=True)
class ToolLine:
    """A tool the agent called, shown as its own transcript line."""

    name: str
    arguments: dict[str, JsonScalar]
    outcome: str  # ok | error | timeout | rejected | discarded
    summary: str = ""
    latency_s: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


@dataclass(slots=True)
class LineView:
    line_id: str
    speaker: Speaker
    text: str
    final: bool = True
    interrupted: bool = False
    heard_text: str = ""
    low_confidence: bool = False
    ts: float = 0.0
    tool: ToolLine | None = None  # a tool call's line (speaker "system")


def tool_line_view(call_id: str, name: str, arguments: dict[str, JsonScalar], outcome: str,
                   summary: str, latency_s: float, ts: float) -> LineView:
    """A tool call's transcript line, keyed by the model's call id: the same call seen in
    a snapshot and again as an event is one line."""
    return LineView(line_id=f"tool:{call_id}", speaker="system", text=summary, ts=ts,
                    tool=ToolLine(name=name, arguments=dict(arguments), outcome=outcome,
                                  summary=summary, latency_s=latency_s))


@dataclass(slots=True)
class CallView:
    call_sid: str
    arrival: int  # tie-breaker that keeps the sort stable
    from_number: str = ""
    to_number: str = ""
    state: CallState = CallState.CONNECTED
    started_at: float = 0.0  # engine clock, unix seconds
    ended_at: float | None = None
    end_reason: str | None = None
    cost_usd: float = 0.0
    cost_cap_usd: float = 0.0
    turns: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=60))
    transcript: list[LineView] = field(default_factory=list)
    line_index: dict[str, int] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)  # kinds, in the order raised
    providers: dict[str, str] = field(default_factory=dict)  # stt/agent/tts -> name
    unpriced: bool = False  # some of its cost has no price (counted as $0)
    variant: str = ""  # "experiment/variant" of an A/B experiment ("" none)
    engine_id: str = ""  # the engine that owns it (a fleet console shows every engine's)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None or self.state == CallState.ENDED

    @property
    def last_latency_s(self) -> float | None:
        return self.latencies[-1] if self.latencies else None

    @property
    def is_human(self) -> bool:
        return self.state in (CallState.HUMAN_TAKEOVER, CallState.TRANSFERRING)

    def matches(self, needle: str) -> bool:
        """Case-insensitive substring filter over what the table shows."""
        if not needle:
            return True
        hay = " ".join((self.call_sid, self.from_number, self.to_number, self.state,
                        self.engine_id, " ".join(self.alerts))).lower()
        return needle.lower() in hay


@dataclass(slots=True)
class Totals:
    today_usd: float = 0.0
    daily_budget_usd: float = 0.0
    month_to_date_usd: float = 0.0
    monthly_projection_usd: float = 0.0
    monthly_budget_usd: float = 0.0
    p95_voice_to_voice_s: float | None = None
    budget_state: str = "ok"  # ok | warning | degraded | forwarding | refusing
    budget_limit: str = ""  # the limit that decides it: daily | monthly
    budget_totals: str = "local"  # local | shared (the fleet's) | offline (estimated)


@dataclass(slots=True, frozen=True)
class AlertNotice:
    """An alert (or other notable event) for the UI to show as a toast."""

    call_sid: str
    kind: str
    severity: str
    message: str


@dataclass(slots=True)
class Changes:
    """What changed since the last `take_changes()`."""

    rows: set[str] = field(default_factory=set)  # calls whose row content changed
    order: bool = False  # calls appeared/disappeared/re-sorted: rebuild the row order
    transcripts: dict[str, int] = field(default_factory=dict)  # sid -> new lines appended
    transcript_touched: set[str] = field(default_factory=set)  # any transcript change
    latencies: set[str] = field(default_factory=set)
    totals: bool = False
    notices: list[AlertNotice] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.rows or self.order or self.transcript_touched or self.latencies
                    or self.totals or self.notices)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The value at quantile `q` (0..1) of `values`, nearest rank; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def snapshot_lines(snap: CallSnapshot) -> list[LineView]:
    """A call's lines as a snapshot carries them, with what the agent looked up in its
    place among them (a stable sort keeps lines of one moment in the snapshot's order)."""
    lines = [LineView(line_id=entry.line_id, speaker=entry.speaker, text=entry.text,
                      final=entry.final, interrupted=entry.interrupted, ts=entry.ts)
             for entry in snap.transcript]
    lines += [tool_line_view(tool.call_id or f"{snap.call_sid}:{i}", tool.name,
                             tool.arguments, tool.outcome, tool.summary, tool.latency_s,
                             tool.ts)
              for i, tool in enumerate(snap.tool_calls)]
    return sorted(lines, key=lambda line: line.ts)
