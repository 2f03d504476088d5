"""Latency percentiles, the voice-to-voice p95 alert, and the Prometheus exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from engine.config import MetricsConfig
from engine.record.metrics import (
    EngineMetrics,
    LatencyTracker,
    RollingWindow,
    percentile,
)
from engine.session.records import TurnTimings


def test_percentiles_on_known_data() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 95) is None
    assert percentile([0.7], 95) == 0.7


def test_rolling_window_keeps_the_last_samples() -> None:
    window = RollingWindow(10)
    for v in [20, 3, 17, 1, 9, 14, 6, 11, 2, 19, 8, 5, 12, 16, 4, 7, 13, 10, 15, 18]:
        window.add(float(v))
    # the last ten are 8, 5, 12, 16, 4, 7, 13, 10, 15, 18 -> sorted 4,5,7,8,10,12,13,15,16,18
    assert len(window) == 10
    assert window.percentile(50) == 10.0
    assert window.percentile(95) == 18.0
    assert window.mean() == (8 + 5 + 12 + 16 + 4 + 7 + 13 + 10 + 15 + 18) / 10


def test_per_call_and_overall_stats() -> None:
    tracker = LatencyTracker(MetricsConfig(window_turns=50))
    for i in range(1, 11):
        tracker.record_turn("CA1", TurnTimings(stt=0.1 * i, voice_to_voice=1.0 * i))
    tracker.record_turn("CA2", TurnTimings(stt=5.0, voice_to_voice=0.5))
    assert tracker.call_stats("CA1", "voice_to_voice").p50 == 5.0
    assert tracker.call_stats("CA2", "voice_to_voice").count == 1
    assert tracker.overall("voice_to_voice").count == 11
    # overall stt: 0.1 .. 1.0 and 5.0; p95 is rank ceil(0.95 * 11) = 11 -> 5.0
    assert tracker.overall_p95("stt") == 5.0
    final = tracker.end_call("CA1")
    assert final["voice_to_voice"].p95 == 10.0
    assert tracker.call_stats("CA1", "voice_to_voice").count == 0
    assert tracker.overall_p95("llm_first_token") is None


def test_alert_fires_once_and_rearms() -> None:
    tracker = LatencyTracker(MetricsConfig(window_turns=10, voice_to_voice_p95_alert_s=1.0),
                             alert_min_turns=5)
    alerts = []
    for _ in range(5):
        alerts.append(tracker.record_turn("CA1", TurnTimings(voice_to_voice=0.5)))
    assert alerts == [None] * 5
    spikes = [tracker.record_turn("CA1", TurnTimings(voice_to_voice=3.0)) for _ in range(3)]
    assert spikes[0] is not None and spikes[0].firing and spikes[0].p95_s == 3.0
    assert spikes[1:] == [None, None]  # still above: no repeat
    recovery = [tracker.record_turn("CA1", TurnTimings(voice_to_voice=0.5)) for _ in range(10)]
    fired = [a for a in recovery if a is not None]
    assert len(fired) == 1 and fired[0].firing is False and fired[0].p95_s == 0.5
    # the three spikes leave the 10-turn window on the 10th calm turn
    assert recovery.index(fired[0]) == 9
    again = tracker.record_turn("CA2", TurnTimings(voice_to_voice=4.0))
    assert again is not None and again.firing


def test_alert_waits_for_enough_samples() -> None:
    tracker = LatencyTracker(MetricsConfig(voice_to_voice_p95_alert_s=1.0), alert_min_turns=3)
    assert tracker.record_turn("CA1", TurnTimings(voice_to_voice=9.0)) is None
    assert tracker.record_turn("CA1", TurnTimings(stt=9.0)) is None  # no v2v: not counted
    assert tracker.record_turn("CA1", TurnTimings(voice_to_voice=9.0)) is None
    alert = tracker.record_turn("CA1", TurnTimings(voice_to_voice=9.0))
    assert alert is not None and alert.samples == 3


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_exposition() -> None:
    metrics = EngineMetrics(MetricsConfig())
    other = EngineMetrics(MetricsConfig())  # a second engine in the same process
    metrics.call_started()
    metrics.call_started()
    metrics.call_ended("CA1")
    metrics.frames_in(50)
    metrics.frames_out(3)
    metrics.bad_message("bad_json")
    metrics.provider_failure("openai")
    metrics.cache_hit()
    metrics.cache_miss()
    metrics.cache_miss()
    metrics.cost("llm", 0.0125)
    metrics.cost("llm", 0.0)
    metrics.escalation()
    metrics.record_turn("CA2", TurnTimings(stt=0.25, voice_to_voice=0.9))
    metrics.record_turn("CA2", TurnTimings(voice_to_voice=2.2))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert "# TYPE switchboard_stage_latency_seconds histogram" in text
    s = _samples(text)
    v2v = (("stage", "voice_to_voice"),)
    assert s[("switchboard_stage_latency_seconds_count", v2v)] == 2
    assert s[("switchboard_stage_latency_seconds_sum", v2v)] == 3.1
    assert s[("switchboard_stage_latency_seconds_bucket", (("le", "1.0"), *v2v))] == 1
    assert s[("switchboard_stage_latency_seconds_bucket", (("le", "2.5"), *v2v))] == 2
    assert s[("switchboard_stage_latency_seconds_count", (("stage", "stt"),))] == 1
    assert s[("switchboard_calls_total", ())] == 2
    assert s[("switchboard_calls_active", ())] == 1
    assert s[("switchboard_frames_in_total", ())] == 50
    assert s[("switchboard_frames_out_total", ())] == 3
    assert s[("switchboard_bad_messages_total", (("reason", "bad_json"),))] == 1
    assert s[("switchboard_provider_failures_total", (("provider", "openai"),))] == 1
    assert s[("switchboard_cache_hits_total", ())] == 1
    assert s[("switchboard_cache_misses_total", ())] == 2
    assert s[("switchboard_cost_usd_total", (("kind", "llm"),))] == 0.0125
    assert s[("switchboard_escalations_total", ())] == 1
    assert metrics.overall_p95("voice_to_voice") == 2.2
    # the other engine's registry saw none of it
    assert _samples(other.render()[0].decode())[("switchboard_calls_total", ())] == 0


def test_invalid_timings_are_ignored() -> None:
    metrics = EngineMetrics(MetricsConfig())
    metrics.record_turn("CA1", TurnTimings(stt=float("nan"), voice_to_voice=-1.0,
                                           endpointing=0.4))
    metrics.record_turn("CA1", TurnTimings(stt=0.3, voice_to_voice=float("inf")))
    assert metrics.latency.overall("stt").count == 1
    assert metrics.latency.overall("voice_to_voice").count == 0
    assert metrics.overall_p95("endpointing") == 0.4
