"""The console's data model: snapshot + events -> per-call view state (no Textual)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from console.model import ConsoleModel, percentile
from engine.bus.events import (
    Alert,
    BudgetStateChanged,
    BusGap,
    CallEnded,
    CallStarted,
    CallUpdated,
    CommandAudit,
    EventBase,
    ProviderHealthChanged,
    StateChanged,
    TranscriptLine,
    TurnLatency,
    UsageCost,
)
from engine.supervision.api_schema import CallSnapshot, Snapshot, SpendTotals, TranscriptEntry

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Stamper:
    def __init__(self, clock: FakeClock, engine_id: str = "eng-1") -> None:
        self.clock = clock
        self.engine_id = engine_id
        self.seq = 0

    def __call__(self, event: EventBase) -> EventBase:
        self.seq += 1
        return event.model_copy(update={"engine_id": self.engine_id, "seq": self.seq,
                                        "ts": self.clock()})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stamp(clock: FakeClock) -> Stamper:
    return Stamper(clock)


def snapshot(server_time: float = T0) -> Snapshot:
    return Snapshot(cursor="41", server_time=server_time, calls=[
        CallSnapshot(call_sid="CA1", from_number="+15550001", state="ai",
                     started_at=server_time - 65, cost_usd=0.12, cost_cap_usd=1.0, turns=3,
                     voice_to_voice_s=[0.9, 1.1, 1.3],
                     transcript=[TranscriptEntry(line_id="l1", speaker="caller", text="hi"),
                                 TranscriptEntry(line_id="l2", speaker="agent",
                                                 text="Hello, how can I help?")],
                     alerts=["handoff_requested"]),
        CallSnapshot(call_sid="CA2", from_number="+15550002", state="human_takeover",
                     started_at=server_time - 10, cost_cap_usd=1.0),
    ], totals=SpendTotals(today_usd=3.5, daily_budget_usd=20, monthly_projection_usd=120,
                          monthly_budget_usd=500, p95_voice_to_voice_s=1.4))


def test_snapshot_projection(clock: FakeClock) -> None:
    model = ConsoleModel(clock)
    model.apply_snapshot(snapshot())
    assert set(model.calls) == {"CA1", "CA2"}
    ca1 = model.calls["CA1"]
    assert ca1.from_number == "+15550001" and ca1.state == "ai" and ca1.turns == 3
    assert list(ca1.latencies) == [0.9, 1.1, 1.3] and ca1.last_latency_s == 1.3
    assert [line.text for line in ca1.transcript] == ["hi", "Hello, how can I help?"]
    assert ca1.alerts == ["handoff_requested"]
    assert model.duration_s(ca1) == pytest.approx(65)
    assert model.calls["CA2"].is_human
    assert model.totals.today_usd == 3.5 and model.totals.monthly_budget_usd == 500
    assert model.cursor == "41"
    assert model.live_count == 2 and model.alert_count == 1
    changes = model.take_changes()
    assert changes.order and changes.totals and changes.rows == {"CA1", "CA2"}
    assert not model.take_changes().any()


def test_durations_follow_the_engine_clock_despite_skew(clock: FakeClock) -> None:
    model = ConsoleModel(clock)
    # The engine's clock runs 30 s ahead of ours.
    model.apply_snapshot(snapshot(server_time=T0 + 30))
    assert model.duration_s(model.calls["CA1"]) == pytest.approx(65)
    clock.now += 5
    assert model.duration_s(model.calls["CA1"]) == pytest.approx(70)


def test_every_event_type(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock)
    model.apply_event(stamp(CallStarted(call_sid="CA9", from_number="+1555", to_number="+1666",
                                        cost_cap_usd=0.07)))
    call = model.calls["CA9"]
    assert call.from_number == "+1555" and call.started_at == T0 and call.state == "connected"
    assert call.cost_cap_usd == 0.07  # the call's own cap, not a snapshot's default
    model.apply_event(stamp(StateChanged(call_sid="CA9", old="connected", new="ai")))
    assert call.state == "ai"
    model.apply_event(stamp(CallUpdated(call_sid="CA9", turns=2, stt_provider="whisper")))
    assert call.turns == 2 and call.providers["stt"] == "whisper"
    model.apply_event(stamp(TranscriptLine(call_sid="CA9", speaker="caller", text="hi",
                                           line_id="a")))
    model.apply_event(stamp(TurnLatency(call_sid="CA9", turn=3, voice_to_voice_s=1.25)))
    assert call.last_latency_s == 1.25 and call.turns == 3
    assert model.totals.p95_voice_to_voice_s == 1.25
    model.apply_event(stamp(UsageCost(call_sid="CA9", provider="openai", kind="llm",
                                      cost_usd=0.01, call_cost_usd=0.07, day_cost_usd=4.0,
                                      month_projection_usd=99.0)))
    assert call.cost_usd == 0.07 and model.totals.today_usd == 4.0
    assert model.totals.monthly_projection_usd == 99.0
    model.apply_event(stamp(Alert(call_sid="CA9", kind="call_cost_cap", severity="critical",
                                  message="cap reached")))
    model.apply_event(stamp(Alert(call_sid="CA9", kind="call_cost_cap", severity="critical",
                                  message="cap reached again")))
    assert call.alerts == ["call_cost_cap"]  # a marker once, however often raised
    model.apply_event(stamp(Alert(kind="daily_budget", severity="warning", message="80%")))
    assert model.engine_alerts == 1 and model.alert_count == 2
    model.apply_event(stamp(ProviderHealthChanged(provider="elevenlabs", kind="tts",
                                                  healthy=False, detail="503")))
    assert model.unhealthy_providers == {"tts:elevenlabs": "503"}
    model.apply_event(stamp(CommandAudit(call_sid="CA9", actor="alice", command="say",
                                         args={"text": "one moment"}, ok=True)))
    assert call.transcript[-1].speaker == "system"
    assert "alice say" in call.transcript[-1].text
    model.apply_event(stamp(BusGap(missed_after="5", count=3)))
    assert model.gaps == 1
    clock.now += 42
    model.apply_event(stamp(CallEnded(call_sid="CA9", reason="caller_hangup", duration_s=42,
                                      cost_usd=0.09)))
    assert call.ended and call.end_reason == "caller_hangup" and call.cost_usd == 0.09
    assert model.duration_s(call) == pytest.approx(42)
    clock.now += 100
    assert model.duration_s(call) == pytest.approx(42)  # frozen once ended
    notices = model.take_changes().notices
    kinds = [n.kind for n in notices]
    assert kinds == ["call_cost_cap", "call_cost_cap", "daily_budget", "provider_health",
                     "bus_gap"]
    model.apply_event(stamp(ProviderHealthChanged(provider="elevenlabs", kind="tts",
                                                  healthy=True)))
    assert model.unhealthy_providers == {}
    assert model.events_applied == 14


def test_budget_state_and_unpriced_costs(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock)
    model.apply_snapshot(Snapshot(server_time=T0, calls=[
        CallSnapshot(call_sid="CA1", state="ai", started_at=T0, unpriced=True),
        CallSnapshot(call_sid="CA2", state="ai", started_at=T0)],
        totals=SpendTotals(budget_state="warning", budget_limit="monthly",
                           budget_totals="offline")))
    totals = model.totals
    assert (totals.budget_state, totals.budget_limit, totals.budget_totals) == (
        "warning", "monthly", "offline")
    assert model.calls["CA1"].unpriced and not model.calls["CA2"].unpriced
    model.take_changes()
    model.apply_event(stamp(UsageCost(call_sid="CA2", provider="openai", kind="llm",
                                      unpriced=True, cost_usd=0.0, call_cost_usd=0.01)))
    model.apply_event(stamp(UsageCost(call_sid="CA2", provider="openai", kind="llm",
                                      cost_usd=0.01, call_cost_usd=0.02)))
    assert model.calls["CA2"].unpriced  # once unpriced, the call's figure stays low
    model.apply_event(stamp(BudgetStateChanged(old="warning", new="degraded",
                                               limit="monthly", totals="shared")))
    assert (model.totals.budget_state, model.totals.budget_totals) == ("degraded", "shared")
    assert model.take_changes().notices == []  # the alert that comes with it says it
    model.apply_event(stamp(BudgetStateChanged(old="degraded", new="ok", limit="monthly",
                                               period="2026-12")))
    changes = model.take_changes()
    assert changes.totals and model.totals.budget_state == "ok"
    assert model.totals.budget_limit == ""
    assert [n.message for n in changes.notices] == [
        "budget ok again: the monthly limit lifted (2026-12)"]


def test_partial_lines_are_replaced_by_line_id(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock)
    for text in ("I'd", "I'd like", "I'd like to"):
        model.apply_event(stamp(TranscriptLine(call_sid="CA1", speaker="caller", text=text,
                                               line_id="c1", final=False)))
    model.apply_event(stamp(TranscriptLine(call_sid="CA1", speaker="caller",
                                           text="I'd like to pay", line_id="c1")))
    model.apply_event(stamp(TranscriptLine(
        call_sid="CA1", speaker="agent", text="Sure, your balance is twelve dollars",
        heard_text="Sure, your", interrupted=True, line_id="a1")))
    lines = model.calls["CA1"].transcript
    assert [(ln.line_id, ln.text, ln.final) for ln in lines] == [
        ("c1", "I'd like to pay", True), ("a1", "Sure, your balance is twelve dollars", True)]
    assert lines[1].interrupted and lines[1].heard_text == "Sure, your"
    changes = model.take_changes()
    # Five events, two lines: only appends count as "new lines" for the tail indicator.
    assert changes.transcripts == {"CA1": 2}
    assert "CA1" in changes.transcript_touched


def test_transcript_is_bounded_and_index_stays_right(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock, max_lines_per_call=100)
    for i in range(500):
        model.apply_event(stamp(TranscriptLine(call_sid="CA1", speaker="caller",
                                               text=f"line {i}", line_id=f"l{i}")))
    call = model.calls["CA1"]
    assert 100 <= len(call.transcript) <= 150
    assert call.transcript[-1].text == "line 499"
    # Replacing a retained line after trimming must hit the right line.
    model.apply_event(stamp(TranscriptLine(call_sid="CA1", speaker="caller", text="edited",
                                           line_id="l480")))
    assert call.transcript[call.line_index["l480"]].text == "edited"
    assert len({ln.line_id for ln in call.transcript}) == len(call.transcript)


def test_duplicate_events_are_dropped_by_engine_seq(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock)
    event = stamp(TranscriptLine(call_sid="CA1", speaker="caller", text="hi", line_id="x"))
    assert model.apply_event(event, "1")
    assert not model.apply_event(event, "1")
    assert model.duplicates_dropped == 1 and model.events_applied == 1
    # Another engine's seq is independent.
    other = Stamper(clock, engine_id="eng-2")
    assert model.apply_event(other(CallStarted(call_sid="CB1")), "2")
    assert model.cursor == "2"


def test_ended_calls_dim_then_expire(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock, ended_ttl_s=60)
    model.apply_event(stamp(CallStarted(call_sid="CA1")))
    model.apply_event(stamp(CallStarted(call_sid="CA2")))
    clock.now += 10
    model.apply_event(stamp(CallEnded(call_sid="CA1", reason="caller_hangup")))
    model.take_changes()
    assert model.tick() == []
    # An ended call keeps its row (dimmed by the UI) until it expires.
    assert [c.call_sid for c in model.sorted_calls()] == ["CA1", "CA2"]
    assert model.calls["CA1"].ended and not model.calls["CA2"].ended
    assert model.live_count == 1
    clock.now += 59
    assert model.tick() == [] and "CA1" in model.calls
    clock.now += 1.5
    assert model.tick() == ["CA1"]
    assert "CA1" not in model.calls and model.take_changes().order


def test_sort_is_stable_and_filter_matches(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock)
    # Same start time: arrival order decides, and keeps deciding on every sort.
    for sid, number in (("CA3", "+1333"), ("CA1", "+1111"), ("CA2", "+1222")):
        model.apply_event(stamp(CallStarted(call_sid=sid, from_number=number)))
    first = [c.call_sid for c in model.sorted_calls()]
    assert first == ["CA3", "CA1", "CA2"]
    for _ in range(5):
        model.apply_event(stamp(UsageCost(call_sid="CA2", provider="p", kind="llm",
                                          cost_usd=0.1, call_cost_usd=0.5)))
        assert [c.call_sid for c in model.sorted_calls()] == first
    # A call that started earlier (joined late) sorts before the others.
    model.apply_snapshot(Snapshot(calls=[
        CallSnapshot(call_sid=c.call_sid, from_number=c.from_number, started_at=T0)
        for c in model.sorted_calls()] + [CallSnapshot(call_sid="CA0", started_at=T0 - 5)]))
    assert [c.call_sid for c in model.sorted_calls()] == ["CA0", "CA3", "CA1", "CA2"]
    model.apply_event(stamp(Alert(call_sid="CA1", kind="latency_p95", severity="warning",
                                  message="slow")))
    assert [c.call_sid for c in model.sorted_calls("1222")] == ["CA2"]
    assert [c.call_sid for c in model.sorted_calls("LATENCY")] == ["CA1"]
    assert [c.call_sid for c in model.sorted_calls("ca3")] == ["CA3"]
    assert model.sorted_calls("nothing-matches") == []


def test_p95_history_is_sampled_on_tick(clock: FakeClock, stamp: Stamper) -> None:
    model = ConsoleModel(clock, p95_sample_s=5)
    for i in range(20):
        model.apply_event(stamp(TurnLatency(call_sid="CA1", turn=i + 1,
                                            voice_to_voice_s=0.5 + i * 0.1)))
    assert model.totals.p95_voice_to_voice_s == pytest.approx(2.3)
    model.tick()
    model.tick()  # within the sample period: no second sample
    assert list(model.p95_history) == [pytest.approx(2.3)]
    clock.now += 5
    model.tick()
    assert len(model.p95_history) == 2


def test_percentile() -> None:
    assert percentile([], 0.95) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(range(1, 101), 0.95) == 95


def test_console_imports_only_the_event_schema_and_api_schema() -> None:
    """The console may depend on engine.bus.events and engine.supervision.api_schema only."""
    allowed = {"engine.bus.events", "engine.supervision.api_schema"}
    seen: set[str] = set()
    for path in Path("console").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "engine" or name.startswith("engine."):
                    seen.add(name)
                    assert name in allowed, f"{path} imports {name}"
    assert seen == allowed
