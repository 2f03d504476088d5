"""The event schema: round trips, clear decode errors, stamping, and its import boundary."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.bus import events as events_module
from engine.bus.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    Alert,
    BudgetStateChanged,
    BusGap,
    CallEnded,
    CallStarted,
    CallUpdated,
    CommandAudit,
    EventBase,
    EventDecodeError,
    EventStamper,
    ProviderHealthChanged,
    StateChanged,
    ToolCalled,
    TranscriptLine,
    TurnLatency,
    UsageCost,
    decode_event,
    encode_event,
    new_engine_id,
)

SAMPLES: list[EventBase] = [
    CallStarted(call_sid="CA1", from_number="+15550001111", to_number="+15550002222",
                stream_sid="MZ1", direction="outbound"),
    CallUpdated(call_sid="CA1", twilio_status="in-progress", duration_s=12.5, turns=3,
                agent_provider="openai", extra={"note": "x", "n": 2, "ok": True, "f": None}),
    CallEnded(call_sid="CA1", reason="caller_hangup", duration_s=61.2, cost_usd=0.0123),
    StateChanged(call_sid="CA1", old="ai", new="human_takeover", reason="supervisor"),
    TranscriptLine(call_sid="CA1", speaker="agent", text="We open at nine.", line_id="t7",
                   final=True, interrupted=True, heard_text="We open", low_confidence=True),
    TurnLatency(call_sid="CA1", turn=4, endpointing_s=0.5, stt_s=0.31,
                llm_first_token_s=None, tts_first_audio_s=0.12, engine_overhead_s=0.004,
                voice_to_voice_s=0.934),
    UsageCost(call_sid="CA1", provider="openai", kind="llm", model="gpt-4o-mini",
              input_tokens=812, cached_input_tokens=512, output_tokens=40, estimated=True,
              cost_usd=0.0000849, call_cost_usd=0.0021, realtime_equivalent_usd=0.19),
    Alert(kind="provider_down", severity="critical", message="elevenlabs down",
          data={"provider": "elevenlabs", "failures": 3, "p95_s": 2.4}),
    ProviderHealthChanged(provider="elevenlabs", kind="tts", healthy=False,
                          detail="HTTP 503"),
    CommandAudit(call_sid="CA1", actor="alice", command="say", args={"text": "hi"},
                 ok=False, error="call ended"),
    BusGap(missed_after="5", missed_until="9", count=3, reason="overrun"),
    BudgetStateChanged(old="warning", new="refusing", limit="daily", period="2026-11-24",
                       spent_usd=20.0, limit_usd=20.0, totals="shared"),
    ToolCalled(call_sid="CA1", turn=2, call_id="call_1", name="order_status",
               arguments={"order_id": "4471", "pin": "***"}, outcome="timeout",
               summary="no answer in 3 s", latency_s=3.0, round=1),
]


def test_samples_cover_every_event_type() -> None:
    assert {type(ev) for ev in SAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda ev: type(ev).__name__)
def test_round_trip(event: EventBase) -> None:
    stamped = EventStamper("eng-1", clock=lambda: 1_700_000_000.25).stamp(event)
    data = encode_event(stamped)
    assert isinstance(data, bytes)
    decoded = decode_event(data)
    assert type(decoded) is type(event)
    assert decoded == stamped
    assert decode_event(data.decode()) == stamped  # str input too
    wire = json.loads(data)
    assert wire["type"] == stamped.type
    assert wire["schema_version"] == SCHEMA_VERSION
    assert (wire["engine_id"], wire["seq"], wire["ts"]) == ("eng-1", 1, 1_700_000_000.25)


def test_stamper_numbers_events_and_leaves_the_original_alone() -> None:
    clock_values = iter([10.0, 11.0, 12.0])
    stamper = EventStamper("eng-7", clock=lambda: next(clock_values))
    original = CallStarted(call_sid="CA9")
    stamped = [stamper.stamp(original) for _ in range(3)]
    assert [ev.seq for ev in stamped] == [1, 2, 3]
    assert [ev.ts for ev in stamped] == [10.0, 11.0, 12.0]
    assert {ev.engine_id for ev in stamped} == {"eng-7"}
    assert stamper.last_seq == 3
    assert (original.seq, original.ts, original.engine_id) == (0, 0.0, "")
    assert all(ev.call_sid == "CA9" for ev in stamped)


def test_engine_ids_are_unique_per_call() -> None:
    assert new_engine_id() != new_engine_id()


def test_events_are_immutable() -> None:
    event = CallEnded(call_sid="CA1", reason="x")
    with pytest.raises(ValidationError):
        event.reason = "y"


def _wire(event: EventBase, **changes: object) -> bytes:
    raw = json.loads(encode_event(event))
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(("data", "fragment"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"call_sid": "CA1"}', "no 'type'"),
    (b'{"type": "call_exploded", "call_sid": "CA1"}', "unknown event type 'call_exploded'"),
    (b'{"type": "transcript_line", "speaker": "robot", "text": "x", "line_id": "1"}',
     "invalid transcript_line event: speaker"),
    (b'{"type": "turn_latency", "turn": 1}', "voice_to_voice_s"),
    (b'{"type": "call_started", "schema_version": 0}', "schema_version"),
])
def test_bad_input_is_a_clear_decode_error(data: bytes, fragment: str) -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_event(data)
    assert fragment in str(info.value)


def test_unknown_type_error_names_the_type() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_event(b'{"type": "call_exploded"}')
    assert info.value.event_type == "call_exploded"


def test_newer_schema_version_is_refused_even_when_the_shape_fits() -> None:
    data = _wire(CallStarted(call_sid="CA1"), schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(EventDecodeError) as info:
        decode_event(data)
    assert info.value.schema_version == SCHEMA_VERSION + 1
    assert "newer" in str(info.value)


def test_newer_schema_version_with_a_new_shape_says_so() -> None:
    data = json.dumps({"type": "transcript_line", "schema_version": SCHEMA_VERSION + 1,
                       "utterance": {"who": "caller"}}).encode()
    with pytest.raises(EventDecodeError, match="newer"):
        decode_event(data)


def test_unknown_extra_fields_are_ignored() -> None:
    # Additive fields do not bump the schema version: old readers must accept them.
    event = CallEnded(call_sid="CA1", reason="caller_hangup", duration_s=3.0)
    decoded = decode_event(_wire(event, future_field={"a": 1}))
    assert decoded == event


def test_schema_module_imports_only_stdlib_and_pydantic() -> None:
    # The console depends on this module: it must not pull in engine internals.
    tree = ast.parse(Path(events_module.__file__).read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    third_party = {r for r in roots if r not in sys.stdlib_module_names}
    assert third_party == {"pydantic"}


def test_importing_the_schema_loads_no_other_engine_module() -> None:
    code = ("import sys, engine.bus.events; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'engine'))")
    root = Path(events_module.__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "['engine', 'engine.bus', 'engine.bus.events']"


def test_encode_decode_cost_stays_in_microseconds() -> None:
    # A regression guard (e.g. a TypeAdapter rebuilt per call costs milliseconds), with
    # a wide margin for a loaded CI machine; the measured figure is ~6 µs.
    event = EventStamper("e").stamp(SAMPLES[4])
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        decode_event(encode_event(event))
    per_event_us = (time.perf_counter() - start) / n * 1e6
    assert per_event_us < 100, per_event_us
