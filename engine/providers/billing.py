"""Billing units: how a provider's usage is billed.

A provider module declares the units it bills in (`ProviderSpec.billing`); the price
catalog (`[[prices.models]]`, engine.money.catalog) prices each model in one of them.
Here, apart from the registry, so the configuration can name a unit without importing
every provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BillingUnit(StrEnum):
    """A billable unit; the value is what a catalog entry's `unit` says."""

    AUDIO_MINUTE = "per_minute"  # per minute of input audio
    TOKENS = "tokens"  # per 1M input / cached input / output tokens
    AUDIO_TOKENS = "audio_tokens"  # per 1M input / output tokens of token-billed speech
    CHARACTERS = "per_1k_characters"  # per 1K characters of input text
    FREE = "free"  # no per-call cost
    # Our own CPU's minute: one configured rate (prices.stt_local_per_minute), no entry.
    LOCAL_AUDIO_MINUTE = "local_minute"


# What a provider can bill in without a catalog entry: nothing, or our own CPU.
UNCATALOGUED = frozenset({BillingUnit.FREE, BillingUnit.LOCAL_AUDIO_MINUTE})


@dataclass(frozen=True, slots=True)
class Billing:
    """One way a provider bills: the unit, for the models named (empty: every model)."""

    unit: BillingUnit
    models: tuple[str, ...] = ()

    def applies_to(self, model: str) -> bool:
        return not self.models or model in self.models
