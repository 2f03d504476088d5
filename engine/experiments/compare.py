"""Each variant's figures with their intervals, and a verdict per metric against the control.

Rates get Wilson intervals and the two-proportion z-test; continuous figures a bootstrap
interval and the bootstrap interval of the difference (variant minus control). A verdict
says "better" or "worse" only when the test says so at 95 %; otherwise "no difference
yet", with the calls per variant that the observed difference would need (80 % power).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from engine.experiments import stats
from engine.experiments.outcomes import VariantOutcomes

Better = Literal["lower", "higher", "neither"]
MetricKind = Literal["count", "rate", "continuous"]


@dataclass(slots=True, frozen=True)
class Metric:
    key: str
    label: str
    kind: MetricKind
    better: Better = "neither"
    unit: str = ""  # "s", "usd", "min", "" (rates are fractions)


METRICS: tuple[Metric, ...] = (
    Metric("calls", "calls", "count"),
    Metric("minutes", "minutes", "count", unit="min"),
    Metric("v2v_p50_s", "voice-to-voice p50", "continuous", "lower", "s"),
    Metric("v2v_p95_s", "voice-to-voice p95", "continuous", "lower", "s"),
    Metric("cost_per_minute_usd", "cost per call-minute", "continuous", "lower", "usd"),
    Metric("escalation_rate", "escalated to a person", "rate", "lower"),
    Metric("barge_in_rate", "barge-ins per agent turn", "rate", "lower"),
    Metric("misunderstood_rate", "misunderstood turns", "rate", "lower"),
    Metric("goodbye_rate", "ended with a goodbye", "rate", "higher"),
    Metric("hung_up_rate", "caller hung up", "rate", "lower"),
    Metric("avg_call_s", "average call length", "continuous", "neither", "s"),
)
METRIC_KEYS = {m.key: m for m in METRICS}


@dataclass(slots=True, frozen=True)
class Figure:
    value: float | None
    interval: stats.Interval | None = None
    n: int = 0  # the trials of a rate, the samples of a continuous figure


@dataclass(slots=True, frozen=True)
class Verdict:
    text: str  # "no difference yet (need ~N more calls)", "B worse at 95 %", ...
    test: str  # "two-proportion z-test" | "bootstrap CI of the difference"
    significant: bool
    direction: Literal["better", "worse", "higher", "lower", "none"]
    diff: float | None = None
    diff_interval: stats.Interval | None = None
    p_value: float | None = None
    more_calls: int | None = None  # per variant, beyond those it has


def _rate_counts(o: VariantOutcomes, key: str) -> tuple[int, int]:
    calls = o.calls
    counts: dict[str, Callable[[], tuple[int, int]]] = {
        "escalation_rate": lambda: (sum(c.escalated for c in calls), len(calls)),
        "barge_in_rate": lambda: (o.interrupted_turns, o.agent_turns),
        "misunderstood_rate": lambda: (o.misunderstood_turns, o.caller_turns),
        "goodbye_rate": lambda: (sum(c.goodbye for c in calls), len(calls)),
        "hung_up_rate": lambda: (sum(c.hung_up for c in calls), len(calls)),
    }
    return counts[key]()


def _continuous(o: VariantOutcomes, key: str
                ) -> tuple[Sequence[float] | Sequence[complex], stats.Statistic]:
    if key == "v2v_p50_s":
        return o.v2v_s, stats.percentile_stat(50)
    if key == "v2v_p95_s":
        return o.v2v_s, stats.percentile_stat(95)
    if key == "cost_per_minute_usd":  # sum of cost over sum of minutes, calls resampled
        return (stats.pairs([c.cost_usd for c in o.calls],
                            [c.duration_s / 60 for c in o.calls]), stats.ratio_stat)
    return [c.duration_s for c in o.calls], stats.mean_stat


def figure(o: VariantOutcomes, metric: Metric) -> Figure:
    if metric.key == "calls":
        return Figure(float(len(o.calls)), n=len(o.calls))
    if metric.key == "minutes":
        return Figure(sum(c.duration_s for c in o.calls) / 60, n=len(o.calls))
    if metric.kind == "rate":
        x, n = _rate_counts(o, metric.key)
        interval = stats.wilson(x, n)
        return Figure(interval.estimate if interval else None, interval, n)
    values, stat = _continuous(o, metric.key)
    interval = stats.bootstrap(values, stat)
    return Figure(interval.estimate if interval else None, interval, len(values))


def verdict(control: VariantOutcomes, other: VariantOutcomes, metric: Metric,
            min_calls: int = 2) -> Verdict | None:
    """`other` against the control on one metric; None for counts."""
    if metric.kind == "count":
        return None
    calls = min(len(control.calls), len(other.calls))
    if metric.kind == "rate":
        test_name = "two-proportion z-test"
        xa, na = _rate_counts(control, metric.key)
        xb, nb = _rate_counts(other, metric.key)
        test = stats.two_proportion_z(xa, na, xb, nb)
        if test is None or calls < min_calls:
            return _too_few(test_name)
        significant = test.p_value < 0.05
        diff, diff_interval, z, p_value = test.diff, test.diff_interval, test.z, test.p_value
    else:
        test_name = "bootstrap CI of the difference"
        values_a, stat = _continuous(control, metric.key)
        values_b, _ = _continuous(other, metric.key)
        found = stats.bootstrap_diff(values_a, values_b, stat)
        if found is None or calls < min_calls:
            return _too_few(test_name)
        significant = found.excludes(0.0)
        diff, diff_interval, z, p_value = found.estimate, found, \
            stats.z_from_interval(found), None
    if not significant:
        more = stats.calls_needed(calls, z)
        need = (f"need ~{max(1, more - calls)} more calls per variant" if more is not None
                else "no difference observed")
        return Verdict(f"no difference yet ({need})", test_name, False, "none", diff,
                       diff_interval, p_value, None if more is None else max(1, more - calls))
    direction = _direction(metric, diff)
    return Verdict(f"{other.variant} {direction} at 95 %", test_name, True, direction, diff,
                   diff_interval, p_value)


def _direction(metric: Metric, diff: float) -> Literal["better", "worse", "higher", "lower"]:
    if metric.better == "neither":
        return "higher" if diff > 0 else "lower"
    lower_is_better = metric.better == "lower"
    return "better" if (diff < 0) == lower_is_better else "worse"


def _too_few(test_name: str) -> Verdict:
    return Verdict("no difference yet (too few calls)", test_name, False, "none")


@dataclass(slots=True)
class Comparison:
    """One experiment side by side: figures per variant, verdicts per other variant."""

    experiment: str
    control: str
    variants: list[str]  # the control first
    figures: dict[str, dict[str, Figure]]  # variant -> metric key -> figure
    verdicts: dict[str, dict[str, Verdict]]  # other variant -> metric key -> verdict


def compare(experiment: str, control: str, outcomes: dict[str, VariantOutcomes],
            order: Sequence[str] = (), min_calls: int = 2) -> Comparison:
    """Every variant found (those of `order` first, in its order) against `control`."""
    names = [n for n in order if n in outcomes] + sorted(set(outcomes) - set(order))
    if control in names:
        names.remove(control)
    names.insert(0, control)
    base = outcomes.get(control, VariantOutcomes(control))
    figures = {name: {m.key: figure(outcomes.get(name, VariantOutcomes(name)), m)
                      for m in METRICS} for name in names}
    verdicts: dict[str, dict[str, Verdict]] = {}
    for name in names[1:]:
        found = {m.key: verdict(base, outcomes[name], m, min_calls) for m in METRICS}
        verdicts[name] = {key: v for key, v in found.items() if v is not None}
    return Comparison(experiment, control, names, figures, verdicts)
