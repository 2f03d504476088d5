"""The statistics of an experiment, pure functions: intervals, tests, sample sizes.

- Rates (escalations per call, barge-ins per agent turn, ...): Wilson score intervals
  for each variant, and the two-proportion z-test (pooled) for a difference.
- Continuous figures (voice-to-voice p50/p95, cost per call-minute, call length): a
  percentile bootstrap for each variant, and the bootstrap interval of the difference
  (B minus control), resampling each side on its own. Seeded: the same history gives
  the same output.
- "Need ~N more calls": the calls per variant at which the observed difference would
  reach significance with 80 % power, scaling the test statistic by sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 %
Z_POWER_80 = 0.8416212335729143
BOOTSTRAP_RESAMPLES = 2000
SEED = 20_261_130
MAX_NEEDED = 1_000_000

Statistic = Callable[[np.ndarray], np.ndarray]  # one value per row of a 2-D array


@dataclass(slots=True, frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


def wilson(successes: int, n: int, z: float = Z_95) -> Interval | None:
    """The Wilson score interval of a proportion; None without trials."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not within 0..{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(slots=True, frozen=True)
class ProportionTest:
    """Two-proportion z-test of p_b - p_a (pooled standard error), and the unpooled
    (Wald) 95 % interval of the difference, which the guard rails compare to a margin."""

    diff: float
    z: float
    p_value: float
    diff_interval: Interval


def two_proportion_z(x_a: int, n_a: int, x_b: int, n_b: int) -> ProportionTest | None:
    if n_a <= 0 or n_b <= 0:
        return None
    p_a, p_b = x_a / n_a, x_b / n_b
    diff = p_b - p_a
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        z, p_value = 0.0, 1.0
    else:
        z = diff / se
        p_value = math.erfc(abs(z) / math.sqrt(2))
    se_wald = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    return ProportionTest(diff, z, p_value,
                          Interval(diff, diff - Z_95 * se_wald, diff + Z_95 * se_wald))


def percentile_stat(q: float) -> Statistic:
    def stat(samples: np.ndarray) -> np.ndarray:
        return np.asarray(np.percentile(samples, q, axis=-1))
    return stat


def mean_stat(samples: np.ndarray) -> np.ndarray:
    return np.asarray(samples.mean(axis=-1))


def _array(values: Sequence[float] | Sequence[complex]) -> np.ndarray:
    return np.asarray(values, dtype=complex if any(isinstance(v, complex) for v in values)
                      else float)


def _resample(data: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return data[rng.integers(0, len(data), size=(resamples, len(data)))]


def bootstrap(values: Sequence[float] | Sequence[complex], stat: Statistic, seed: int = SEED,
              resamples: int = BOOTSTRAP_RESAMPLES) -> Interval | None:
    """Percentile bootstrap 95 % interval of `stat`; None without values."""
    if len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    data = _array(values)
    boots = stat(_resample(data, rng, resamples))
    low, high = np.nanpercentile(boots, [2.5, 97.5])
    return Interval(float(stat(data)), float(low), float(high))


def bootstrap_diff(a: Sequence[float] | Sequence[complex],
                   b: Sequence[float] | Sequence[complex], stat: Statistic,
                   seed: int = SEED, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval | None:
    """Bootstrap 95 % interval of stat(b) - stat(a), each side resampled on its own."""
    if len(a) == 0 or len(b) == 0:
        return None
    rng = np.random.default_rng(seed)
    da, db = _array(a), _array(b)
    diffs = stat(_resample(db, rng, resamples)) - stat(_resample(da, rng, resamples))
    low, high = np.nanpercentile(diffs, [2.5, 97.5])
    return Interval(float(stat(db) - stat(da)), float(low), float(high))


def ratio_stat(samples: np.ndarray) -> np.ndarray:
    """Sum of numerators over sum of denominators, for (num, den) pairs packed as complex
    numbers (`pairs`), so each resample keeps one call's cost with its minutes."""
    den = samples.imag.sum(axis=-1)
    safe = np.where(den > 0, den, 1.0)
    return np.asarray(np.where(den > 0, samples.real.sum(axis=-1) / safe, np.nan))


def pairs(numerators: Sequence[float], denominators: Sequence[float]) -> list[complex]:
    """Per-call (numerator, denominator) pairs for `ratio_stat` (e.g. cost, minutes)."""
    return [complex(n, d) for n, d in zip(numerators, denominators, strict=True)]


def calls_needed(n_per_arm: int, z_observed: float) -> int | None:
    """Calls per arm at which an effect of the observed size would be significant at
    95 % with 80 % power (the test statistic grows with sqrt(n)); None when no
    difference was observed at all (no sample size makes 0 significant)."""
    if n_per_arm <= 0 or not math.isfinite(z_observed) or abs(z_observed) < 1e-9:
        return None
    needed = n_per_arm * ((Z_95 + Z_POWER_80) / abs(z_observed)) ** 2
    return min(MAX_NEEDED, math.ceil(needed))


def z_from_interval(diff: Interval) -> float:
    """The z a bootstrap interval of a difference implies (its half-width is 1.96 se)."""
    half = (diff.high - diff.low) / 2
    if half <= 0:
        return math.inf if diff.estimate else 0.0
    return diff.estimate / (half / Z_95)
