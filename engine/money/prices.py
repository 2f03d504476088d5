"""The price table: turns one provider call's `Usage` into dollars.

Money is kept as `Decimal` (built from the floats' shortest repr, so 0.15 is exactly
0.15): sums of thousands of sub-cent amounts stay exact. Amounts leave as floats (USD,
unrounded); round only for display.

A usage is priced by the units its provider declares (`engine.providers.registry`:
`ProviderSpec.billing`, tried in order; a provider that declares nothing is billed in
its kind's usual units). Every number comes from `PricesConfig`:
- audio minute: `stt_openai_per_minute[model]`; local audio minute: `stt_local_per_minute`;
- audio tokens: `stt_per_million[model]` (in, out per 1M), when the usage carries tokens;
- tokens: (input - cached) * in + cached * cached_in + output * out, per 1M
  (`llm_per_million[model]`);
- characters: characters / 1000 * `tts_per_thousand_chars[model]` (or [provider]);
- free: nothing; nor does audio replayed from the response cache ("<provider>:cache").
- Phone (Twilio): billed per started minute, so the duration is rounded *up* to whole
  minutes (a 61 s call costs two minutes).
A usage no declared unit has a price for is counted at $0, logged once as a warning and
listed in `PriceTable.unpriced_models`, so a missing price is visible and never crashes
a call.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from engine.config import PricesConfig
from engine.log import get_logger
from engine.providers.base import CACHE_SUFFIX, Usage
from engine.providers.registry import BillingUnit, registry

log = get_logger(__name__)

ZERO = Decimal(0)
MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
SIXTY = Decimal(60)

CostKind = Literal["stt", "llm", "tts", "phone"]


def dec(value: float | int) -> Decimal:
    """A float as the decimal it was written as (0.15 -> Decimal('0.15'))."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def utc_now() -> datetime:
    return datetime.now(UTC)


class PriceTable:
    """Turns a `Usage` into dollars using the configured list prices."""

    def __init__(self, prices: PricesConfig) -> None:
        registry.discover()  # the built-in providers' billing declarations
        self.config = prices
        self._stt_minute = {m: dec(p) for m, p in prices.stt_openai_per_minute.items()}
        self._stt_tokens = {m: [dec(p) for p in ps] for m, ps in prices.stt_per_million.items()}
        self._llm = {m: [dec(p) for p in ps] for m, ps in prices.llm_per_million.items()}
        self._tts = {m: dec(p) for m, p in prices.tts_per_thousand_chars.items()}
        self._stt_local = dec(prices.stt_local_per_minute)
        self._phone_minute = dec(prices.twilio_per_minute)
        self.unpriced_models: set[str] = set()

    def cost_decimal(self, usage: Usage) -> tuple[Decimal, bool]:
        """(cost, priced): priced is False when no price was found (cost counted as 0)."""
        if usage.provider.endswith(CACHE_SUFFIX):
            return ZERO, True  # replayed from the response cache: nothing synthesized
        for billing in registry.billing(usage.kind, usage.provider):
            if not billing.applies_to(usage.model):
                continue
            cost = self._price(billing.unit, usage)
            if cost is None:
                continue
            if cost < 0:  # negative quantities are a provider-adapter bug, not a refund
                log.warning("negative usage ignored", kind=usage.kind,
                            provider=usage.provider, model=usage.model)
                return ZERO, False
            return cost, True
        return self._unpriced(usage)

    def cost(self, usage: Usage) -> float:
        """USD for one provider call (0.0 for an unpriced model, see `unpriced_models`)."""
        return float(self.cost_decimal(usage)[0])

    def phone_minutes(self, duration_s: float) -> int:
        """Twilio bills every started minute: round the duration up."""
        if duration_s <= 0:
            return 0
        return math.ceil(duration_s / 60.0)

    def phone_cost_decimal(self, duration_s: float) -> Decimal:
        return self.phone_minutes(duration_s) * self._phone_minute

    def phone_cost(self, duration_s: float) -> float:
        """USD for a call leg of `duration_s` seconds, rounded up to whole minutes."""
        return float(self.phone_cost_decimal(duration_s))

    # --- per unit -------------------------------------------------------------------

    def _price(self, unit: BillingUnit, usage: Usage) -> Decimal | None:
        """The cost of `usage` in `unit`, or None when no price is configured for it."""
        minutes = dec(usage.audio_seconds) / SIXTY
        if unit is BillingUnit.AUDIO_MINUTE:
            rate = self._stt_minute.get(usage.model)
            return None if rate is None else minutes * rate
        if unit is BillingUnit.LOCAL_AUDIO_MINUTE:
            return minutes * self._stt_local
        if unit is BillingUnit.AUDIO_TOKENS:
            return self._audio_token_cost(usage)
        if unit is BillingUnit.TOKENS:
            return self._token_cost(usage)
        if unit is BillingUnit.CHARACTERS:
            rate = self._tts.get(usage.model, self._tts.get(usage.provider))
            return None if rate is None else usage.characters * rate / THOUSAND
        return ZERO  # BillingUnit.FREE

    def _audio_token_cost(self, usage: Usage) -> Decimal | None:
        rates = self._stt_tokens.get(usage.model)
        if rates is None or (usage.input_tokens <= 0 and usage.output_tokens <= 0):
            return None  # not token-billed: the next declared unit prices it
        price_in, price_out = rates[0], rates[-1]
        return (usage.input_tokens * price_in + usage.output_tokens * price_out) / MILLION

    def _token_cost(self, usage: Usage) -> Decimal | None:
        rates = self._llm.get(usage.model)
        if rates is None:
            return None
        # [in, cached, out]; a model without a cached price lists [in, out].
        if len(rates) >= 3:
            price_in, price_cached, price_out = rates[0], rates[1], rates[2]
        else:
            price_in, price_cached, price_out = rates[0], rates[0], rates[-1]
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        uncached = usage.input_tokens - cached
        return (uncached * price_in + cached * price_cached
                + usage.output_tokens * price_out) / MILLION

    def _unpriced(self, usage: Usage) -> tuple[Decimal, bool]:
        key = f"{usage.kind}:{usage.provider}:{usage.model}"
        if key not in self.unpriced_models:
            self.unpriced_models.add(key)
            # Once per model: a missing price must be visible without flooding the log.
            log.warning("no price for model; counted as $0", kind=usage.kind,
                        provider=usage.provider, model=usage.model)
        return ZERO, False
