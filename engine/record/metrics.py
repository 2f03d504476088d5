"""Latency per turn stage (rolling percentiles, the p95 alert) and Prometheus counters.

Percentiles use a sorted rolling window of the last `MetricsConfig.window_turns` samples
per stage (nearest-rank), overall and per call. Prometheus series live in a dedicated
`CollectorRegistry` per `EngineMetrics`, so several engines (or tests) in one process
never collide; `render()` gives the `/metrics` body and content type.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.bus.event_bus import BusHealth
from engine.config import MetricsConfig
from engine.log import get_logger
from engine.record.writer import HistoryStats
from engine.session.records import STAGES, Stage, TurnTimings

log = get_logger(__name__)

# Phone latency: a good voice-to-voice is under a second, over 2-3 s feels broken.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0,
                     4.0, 6.0, 10.0)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class RollingWindow:
    """The last `size` samples, kept sorted as well, so percentiles cost one index."""

    __slots__ = ("_order", "_sorted", "size")

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def add(self, value: float) -> None:
        if len(self._order) >= self.size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(value)
        bisect.insort(self._sorted, value)

    def __len__(self) -> int:
        return len(self._order)

    def percentile(self, q: float) -> float | None:
        return percentile(self._sorted, q)

    def mean(self) -> float | None:
        return sum(self._order) / len(self._order) if self._order else None


@dataclass(slots=True, frozen=True)
class StageStats:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None


@dataclass(slots=True, frozen=True)
class LatencyAlert:
    """Overall voice-to-voice p95 crossed the threshold (`firing`) or fell back below."""

    firing: bool
    p95_s: float
    threshold_s: float
    samples: int


def _stats(window: RollingWindow | None) -> StageStats:
    if window is None:
        return StageStats(0, None, None, None, None)
    return StageStats(len(window), window.percentile(50), window.percentile(95),
                      window.percentile(99), window.mean())


class LatencyTracker:
    """Rolling per-stage windows, overall and per call, and the voice-to-voice alert.

    The alert fires once when the overall p95 goes above the threshold and re-arms when
    it falls back to or below it. It waits for `alert_min_turns` samples so one slow
    first turn cannot page anyone.
    """

    def __init__(self, config: MetricsConfig, alert_min_turns: int = 20) -> None:
        self.config = config
        self.alert_min_turns = alert_min_turns
        self._overall = {stage: RollingWindow(config.window_turns) for stage in STAGES}
        self._calls: dict[str, dict[str, RollingWindow]] = {}
        self.alert_firing = False

    def record_turn(self, call_sid: str, timings: TurnTimings) -> LatencyAlert | None:
        per_call = self._calls.setdefault(call_sid, {})
        for stage, value in timings.items():
            if not (value >= 0 and math.isfinite(value)):  # NaN would corrupt the order
                log.warning("invalid stage latency ignored", call_sid=call_sid, stage=stage,
                            value=value)
                continue
            self._overall[stage].add(value)
            window = per_call.get(stage)
            if window is None:
                window = per_call[stage] = RollingWindow(self.config.window_turns)
            window.add(value)
        if timings.voice_to_voice is None:
            return None
        return self._check_alert()

    def _check_alert(self) -> LatencyAlert | None:
        window = self._overall["voice_to_voice"]
        p95 = window.percentile(95)
        if p95 is None or len(window) < self.alert_min_turns:
            return None
        threshold = self.config.voice_to_voice_p95_alert_s
        if not self.alert_firing and p95 > threshold:
            self.alert_firing = True
            log.warning("voice-to-voice p95 above threshold", p95_s=p95,
                        threshold_s=threshold, samples=len(window))
            return LatencyAlert(True, p95, threshold, len(window))
        if self.alert_firing and p95 <= threshold:
            self.alert_firing = False
            log.info("voice-to-voice p95 back under threshold", p95_s=p95,
                     threshold_s=threshold)
            return LatencyAlert(False, p95, threshold, len(window))
        return None

    def overall_p95(self, stage: Stage) -> float | None:
        return self._overall[stage].percentile(95)

    def overall(self, stage: Stage) -> StageStats:
        return _stats(self._overall[stage])

    def call_stats(self, call_sid: str, stage: Stage) -> StageStats:
        return _stats(self._calls.get(call_sid, {}).get(stage))

    def end_call(self, call_sid: str) -> dict[str, StageStats]:
        """Forget a call's windows; returns its final per-stage stats."""
        windows = self._calls.pop(call_sid, {})
        return {stage: _stats(w) for stage, w in windows.items()}


class EngineMetrics:
    """The Prometheus series of one engine plus its latency tracker.

    Record methods are one counter/histogram update each (a dict lookup and a lock), cheap
    enough for the media path; frame counters take a count so callers may batch.
    """

    def __init__(self, config: MetricsConfig, alert_min_turns: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = LatencyTracker(config, alert_min_turns)
        r = self.registry
        self._stage_seconds = Histogram(
            "switchboard_stage_latency_seconds", "Latency of one turn stage",
            ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self._stage_children = {s: self._stage_seconds.labels(stage=s) for s in STAGES}
        self._calls_total = Counter("switchboard_calls", "Calls started", registry=r)
        self._calls_active = Gauge("switchboard_calls_active", "Calls in progress", registry=r)
        self._frames_in = Counter("switchboard_frames_in", "Media frames received",
                                  registry=r)
        self._frames_out = Counter("switchboard_frames_out", "Media frames sent", registry=r)
        self._bad_messages = Counter("switchboard_bad_messages",
                                     "Rejected Media Streams messages", ["reason"], registry=r)
        self._provider_failures = Counter("switchboard_provider_failures",
                                          "Failed provider calls", ["provider"], registry=r)
        self._cache_hits = Counter("switchboard_cache_hits", "Turns answered from the cache",
                                   registry=r)
        self._cache_misses = Counter("switchboard_cache_misses", "Cache lookups that missed",
                                     registry=r)
        self._cost = Counter("switchboard_cost_usd", "Spend in USD", ["kind"], registry=r)
        self._escalations = Counter("switchboard_escalations",
                                    "Calls handed to a human", registry=r)
        self._turns = Counter("switchboard_turns", "Completed turns", registry=r)

    # --- latency ---

    def record_turn(self, call_sid: str, timings: TurnTimings) -> LatencyAlert | None:
        self._turns.inc()
        for stage, value in timings.items():
            if value >= 0 and math.isfinite(value):
                self._stage_children[stage].observe(value)
        return self.latency.record_turn(call_sid, timings)

    def overall_p95(self, stage: Stage) -> float | None:
        return self.latency.overall_p95(stage)

    # --- counters ---

    def call_started(self) -> None:
        self._calls_total.inc()
        self._calls_active.inc()

    def call_ended(self, call_sid: str | None = None) -> None:
        self._calls_active.dec()
        if call_sid is not None:
            self.latency.end_call(call_sid)

    def frames_in(self, count: int = 1) -> None:
        self._frames_in.inc(count)

    def frames_out(self, count: int = 1) -> None:
        self._frames_out.inc(count)

    def bad_message(self, reason: str) -> None:
        self._bad_messages.labels(reason=reason).inc()

    def provider_failure(self, provider: str) -> None:
        self._provider_failures.labels(provider=provider).inc()

    def cache_hit(self) -> None:
        self._cache_hits.inc()

    def cache_miss(self) -> None:
        self._cache_misses.inc()

    def cost(self, kind: str, usd: float) -> None:
        if usd > 0:  # a Counter refuses negative increments; zero adds nothing
            self._cost.labels(kind=kind).inc(usd)

    def escalation(self) -> None:
        self._escalations.inc()

    def watch_record(self, history: Callable[[], HistoryStats] | None,
                     bus: Callable[[], BusHealth]) -> None:
        """Series of the history's and the bus's own counts, read at each scrape."""
        self.registry.register(_RecordCollector(history, bus))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this engine's registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RecordCollector(Collector):
    """The history's failed, spooled and lost writes and its backlog; the bus's dropped
    and buffered events. Their owners count; this only reads at scrape time."""

    def __init__(self, history: Callable[[], HistoryStats] | None,
                 bus: Callable[[], BusHealth]) -> None:
        self._history = history
        self._bus = bus

    def collect(self) -> Iterator[Metric]:
        if self._history is not None:
            stats = self._history()
            yield CounterMetricFamily("switchboard_history_write_failures",
                                      "History writes the database refused", stats.failed)
            yield CounterMetricFamily("switchboard_history_writes_spooled",
                                      "History writes sent to the journal", stats.spooled)
            yield CounterMetricFamily("switchboard_history_writes_lost",
                                      "History writes dropped or rejected", stats.lost)
            yield GaugeMetricFamily("switchboard_history_journal_backlog",
                                    "History writes waiting to be replayed", stats.backlog)
        bus = self._bus()
        yield CounterMetricFamily("switchboard_bus_events_dropped",
                                  "Events dropped while the bus was unreachable", bus.dropped)
        yield GaugeMetricFamily("switchboard_bus_events_buffered",
                                "Events waiting for the bus", bus.buffered)
