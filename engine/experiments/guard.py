"""Guard rails: which variants are worse than the control by more than the margin.

A variant is flagged when the whole 95 % interval of its difference from the control
lies beyond the configured margin: its escalation rate (Wald interval of the difference
of two proportions) or its voice-to-voice p95 (bootstrap interval of the difference).
Neither side is judged before it has `min_calls` ended calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.experiments import GuardRails
from engine.experiments import stats
from engine.experiments.outcomes import VariantOutcomes


@dataclass(slots=True, frozen=True)
class Breach:
    variant: str
    metric: str  # "escalation_rate" | "v2v_p95_s"
    diff_low: float  # the interval's low end: worse by at least this, with 95 % confidence
    margin: float
    reason: str


def breaches(control: VariantOutcomes, others: list[VariantOutcomes],
             rails: GuardRails) -> list[Breach]:
    """The breaches of each variant that has enough calls (CPU: run off the loop)."""
    found: list[Breach] = []
    if len(control.calls) < rails.min_calls:
        return found
    for other in others:
        if len(other.calls) < rails.min_calls:
            continue
        test = stats.two_proportion_z(sum(c.escalated for c in control.calls),
                                      len(control.calls),
                                      sum(c.escalated for c in other.calls), len(other.calls))
        if test is not None and test.diff_interval.low > rails.escalation_margin:
            found.append(Breach(
                other.variant, "escalation_rate", test.diff_interval.low,
                rails.escalation_margin,
                f"escalation rate {test.diff:+.0%} vs control (95 % CI low "
                f"{test.diff_interval.low:+.0%} > margin {rails.escalation_margin:.0%})"))
        diff = stats.bootstrap_diff(control.v2v_s, other.v2v_s, stats.percentile_stat(95))
        if diff is not None and diff.low > rails.v2v_p95_margin_s:
            found.append(Breach(
                other.variant, "v2v_p95_s", diff.low, rails.v2v_p95_margin_s,
                f"voice-to-voice p95 {diff.estimate:+.2f} s vs control (95 % CI low "
                f"{diff.low:+.2f} s > margin {rails.v2v_p95_margin_s:.2f} s)"))
    return found
