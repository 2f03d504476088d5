"""Which variant a call gets: deterministic per caller number, weighted, paused arms skipped.

The caller's number and the experiment's name are hashed to a point in [0, 1) that falls
in one variant's share of the weights, so a caller hears the same variant on every call
(and the buckets of one experiment say nothing of another's). When that variant is
paused, a second hash picks among the others by their weights: callers of the variants
still running keep theirs. A call without a number gets a random variant.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config.experiments import ExperimentConfig, VariantConfig


@dataclass(slots=True, frozen=True)
class Assignment:
    experiment: str
    variant: str
    hashed: bool  # from the caller's number (False: random, the number was unknown)

    @property
    def label(self) -> str:
        """"experiment/variant", as the console shows it."""
        return f"{self.experiment}/{self.variant}"


def _point(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _pick(variants: Sequence[VariantConfig], point: float) -> VariantConfig | None:
    total = sum(v.weight for v in variants)
    if total <= 0:
        return None
    edge = 0.0
    for variant in variants:
        edge += variant.weight / total
        if point < edge:
            return variant
    return next((v for v in reversed(variants) if v.weight > 0), None)


class Assigner:
    """Assigns calls to the variants of one experiment; knows which are paused."""

    def __init__(self, experiment: ExperimentConfig,
                 rng: random.Random | None = None) -> None:
        self.experiment = experiment
        self.paused: dict[str, str] = {}  # variant -> why
        self._rng = rng or random.Random()

    def active(self) -> list[VariantConfig]:
        return [v for v in self.experiment.variants if v.name not in self.paused]

    def assign(self, caller_number: str) -> Assignment | None:
        """The caller's variant; None when every variant with weight is paused."""
        name = self.experiment.name
        number = caller_number.strip()
        point = _point(name, number) if number else self._rng.random()
        chosen = _pick(self.experiment.variants, point)
        if chosen is None or chosen.name in self.paused:
            second = _point(name, number, "paused") if number else self._rng.random()
            chosen = _pick(self.active(), second)
        if chosen is None:
            return None
        return Assignment(name, chosen.name, hashed=bool(number))

    def pause(self, variant: str, why: str) -> bool:
        """Pause a variant (True when it was running). The control may be paused too:
        an operator may stop an experiment's baseline by hand."""
        if self.experiment.variant(variant) is None or variant in self.paused:
            return False
        self.paused[variant] = why
        return True

    def resume(self, variant: str) -> bool:
        return self.paused.pop(variant, None) is not None
