"""The price table: turns one provider call's `Usage` into dollars.

Money is kept as `Decimal` (built from the floats' shortest repr, so 0.15 is exactly
0.15): sums of thousands of sub-cent amounts stay exact. Amounts leave as floats (USD,
unrounded); round only for display.

Pricing rules (every number comes from `PricesConfig`):
- STT: per audio minute for the model (`stt_openai_per_minute`); local providers use
  `stt_local_per_minute`. A model may instead be token-billed: when the usage carries
  tokens and the model is in `stt_per_million` (in, out per 1M tokens) the tokens are
  priced.
- LLM: (input - cached) * in + cached * cached_in + output * out, per 1M tokens.
- TTS: characters / 1000 * the model's per-1K-characters price.
- Phone (Twilio): billed per started minute, so the duration is rounded *up* to whole
  minutes (a 61 s call costs two minutes).
A model without a price is counted at $0, logged once as a warning and listed in
`PriceTable.unpriced_models`, so a missing price is visible and never crashes a call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from engine.config import PricesConfig
from engine.log import get_logger
from engine.providers.base import Usage

log = get_logger(__name__)

ZERO = Decimal(0)
MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
SIXTY = Decimal(60)

# Providers that run on our own machine: no per-call bill beyond `stt_local_per_minute`.
LOCAL_PROVIDERS = frozenset({"local_whisper", "espeak", "faq", "cache", "local"})

CostKind = Literal["stt", "llm", "tts", "phone"]


def dec(value: float | int) -> Decimal:
    """A float as the decimal it was written as (0.15 -> Decimal('0.15'))."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def utc_now() -> datetime:
    return datetime.now(UTC)


class PriceTable:
    """Turns a `Usage` into dollars using the configured list prices."""

    def __init__(self, prices: PricesConfig) -> None:
        self.config = prices
        self._stt_minute = {m: dec(p) for m, p in prices.stt_openai_per_minute.items()}
        stt_tokens: Mapping[str, list[float]] = getattr(prices, "stt_per_million", {}) or {}
        self._stt_tokens = {m: [dec(p) for p in ps] for m, ps in stt_tokens.items()}
        self._llm = {m: [dec(p) for p in ps] for m, ps in prices.llm_per_million.items()}
        self._tts = {m: dec(p) for m, p in prices.tts_per_thousand_chars.items()}
        self._stt_local = dec(prices.stt_local_per_minute)
        self._phone_minute = dec(prices.twilio_per_minute)
        self.unpriced_models: set[str] = set()

    def cost_decimal(self, usage: Usage) -> tuple[Decimal, bool]:
        """(cost, priced): priced is False when no price was found (cost counted as 0)."""
        if usage.kind == "stt":
            cost, priced = self._stt_cost(usage)
        elif usage.kind == "llm":
            cost, priced = self._llm_cost(usage)
        elif usage.kind == "tts":
            cost, priced = self._tts_cost(usage)
        else:
            return self._unpriced(usage)
        if cost < 0:  # negative quantities are a provider-adapter bug, not a refund
            log.warning("negative usage ignored", kind=usage.kind, provider=usage.provider,
                        model=usage.model)
            return ZERO, False
        return cost, priced

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

    # --- per kind -------------------------------------------------------------------

    def _stt_cost(self, usage: Usage) -> tuple[Decimal, bool]:
        has_tokens = usage.input_tokens > 0 or usage.output_tokens > 0
        if has_tokens and usage.model in self._stt_tokens:
            rates = self._stt_tokens[usage.model]
            price_in, price_out = rates[0], rates[-1]
            cost = (usage.input_tokens * price_in + usage.output_tokens * price_out) / MILLION
            return cost, True
        minutes = dec(usage.audio_seconds) / SIXTY
        if usage.model in self._stt_minute:
            return minutes * self._stt_minute[usage.model], True
        if usage.provider in LOCAL_PROVIDERS:
            return minutes * self._stt_local, True
        return self._unpriced(usage)

    def _llm_cost(self, usage: Usage) -> tuple[Decimal, bool]:
        rates = self._llm.get(usage.model)
        if rates is None:
            if usage.provider in LOCAL_PROVIDERS:
                return ZERO, True
            return self._unpriced(usage)
        # [in, cached, out]; a model without a cached price lists [in, out].
        if len(rates) >= 3:
            price_in, price_cached, price_out = rates[0], rates[1], rates[2]
        else:
            price_in, price_cached, price_out = rates[0], rates[0], rates[-1]
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        uncached = usage.input_tokens - cached
        cost = (uncached * price_in + cached * price_cached
                + usage.output_tokens * price_out) / MILLION
        return cost, True

    def _tts_cost(self, usage: Usage) -> tuple[Decimal, bool]:
        if usage.provider.endswith(":cache"):
            return ZERO, True  # replayed from the response cache: nothing synthesized
        rate = self._tts.get(usage.model)
        if rate is None:
            rate = self._tts.get(usage.provider)
        if rate is None:
            if usage.provider in LOCAL_PROVIDERS:
                return ZERO, True
            return self._unpriced(usage)
        return usage.characters * rate / THOUSAND, True

    def _unpriced(self, usage: Usage) -> tuple[Decimal, bool]:
        key = f"{usage.kind}:{usage.provider}:{usage.model}"
        if key not in self.unpriced_models:
            self.unpriced_models.add(key)
            # Once per model: a missing price must be visible without flooding the log.
            log.warning("no price for model; counted as $0", kind=usage.kind,
                        provider=usage.provider, model=usage.model)
        return ZERO, False
