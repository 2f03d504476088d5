"""The price table: turns one provider call's `Usage` into cost lines and dollars.

Money is kept as `Decimal` (built from the floats' shortest repr, so 0.15 is exactly
0.15): sums of thousands of sub-cent amounts stay exact. Amounts leave as floats (USD,
unrounded) from `cost`; round only for display.

A usage is looked up in the catalog (`prices.models`, engine.money.catalog) by (provider,
model), and the entry's unit says how it is priced, one `CostLine` per quantity:
- per_minute: audio minutes (audio_seconds / 60) at `per_minute`;
- tokens: uncached input, cached input and output tokens, each per 1M at its price;
- audio_tokens: input and output tokens per 1M (token-billed speech);
- per_1k_characters: characters per 1K;
- free: nothing.
A usage without an entry is priced as its provider bills without one (`registry.
uncatalogued_unit`): free, or our own CPU's minute at `stt_local_per_minute`. Anything
else is unpriced, and so is a usage that carries none of its model's unit (an estimate in
characters of a per-token voice): counted at $0, its lines flagged `unpriced`, logged
once as a warning and listed in `unpriced_models` (the engine refuses to start with a
configured model unpriced unless `engine.allow_unpriced_models`: engine.money.
model_checks). A cache hit
(`Usage.cached`, or the older provider name "<provider>:cache") costs nothing and its one
line says so.
Phone (Twilio): billed per started minute, so the duration is rounded *up* to whole
minutes (a 61 s call costs two minutes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Literal

from engine.config import PricesConfig
from engine.log import get_logger
from engine.money.catalog import PRICE_KEYS, ModelPrice
from engine.providers.base import CACHE_SUFFIX, ProviderKind, Usage
from engine.providers.billing import UNCATALOGUED, BillingUnit
from engine.providers.registry import DEFAULT_BILLING, registry

log = get_logger(__name__)

ZERO = Decimal(0)
ONE = Decimal(1)
MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
SIXTY = Decimal(60)

Item = Literal["stt", "agent", "voice"]  # what a line of the bill is for
ITEMS: Mapping[ProviderKind, Item] = MappingProxyType(
    {"stt": "stt", "llm": "agent", "tts": "voice"})

_LOCAL_RATE = "stt_local_per_minute"  # the rate key of our own CPU's minute
# Token-billed speech: what goes in and out, by the kind of provider.
_AUDIO_TOKEN_UNITS: Mapping[ProviderKind, tuple[str, str]] = MappingProxyType({
    "stt": ("1M audio input tokens", "1M text output tokens"),
    "tts": ("1M text input tokens", "1M audio output tokens"),
    "llm": ("1M input tokens", "1M output tokens"),
})


def dec(value: float | int) -> Decimal:
    """A float as the decimal it was written as (0.15 -> Decimal('0.15'))."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CostLine:
    """One priced quantity of one provider call: `quantity` `unit`s at `unit_price` USD.

    An LLM call gives up to three lines (input, cached input, output tokens); every other
    usage one. Decimal throughout, so lines add up to the ledger's total exactly.
    """

    item: Item
    provider: str
    model: str
    quantity: Decimal  # in `unit`s: 0.001234 "1M input tokens", 0.75 "audio minute"
    unit: str  # readable: "audio minute", "1M cached input tokens", "1K characters", ...
    unit_price: Decimal  # USD per unit
    amount: Decimal  # quantity * unit_price, USD
    estimated: bool = False  # the provider did not report the quantity: we estimated it
    unpriced: bool = False  # no price for this model: counted at $0


def total_of(lines: Iterable[CostLine]) -> tuple[Decimal, bool]:
    """(the lines' amount, whether every line had a price)."""
    total, priced = ZERO, True
    for line in lines:
        total += line.amount
        priced = priced and not line.unpriced
    return total, priced


class PriceTable:
    """Turns a `Usage` into cost lines and dollars using the configured catalog."""

    def __init__(self, prices: PricesConfig) -> None:
        registry.discover()  # the built-in providers' billing declarations
        self.config = prices
        self._entries: dict[tuple[str, str], ModelPrice] = {
            (entry.provider, entry.model): entry for entry in prices.models}
        self._rates: dict[tuple[str, str], dict[str, Decimal]] = {
            key: _rates(entry) for key, entry in self._entries.items()}
        self._local = {_LOCAL_RATE: dec(prices.stt_local_per_minute)}
        self._cpu_second = dec(prices.cpu_second)
        self._phone_minute = dec(prices.twilio_per_minute)
        self.unpriced_models: set[str] = set()

    def entry(self, provider: str, model: str) -> ModelPrice | None:
        """The catalog's entry for `model` of `provider`, if it has one."""
        return self._entries.get((provider, model))

    def cost_lines(self, usage: Usage) -> list[CostLine]:
        """The bill's lines for one provider call; quantities of zero give no line. A
        local model's CPU time adds a line when `prices.cpu_second` is set."""
        lines = self._billed_lines(usage)
        if usage.cpu_seconds > 0 and self._cpu_second > 0 and not usage.cached:
            seconds = dec(usage.cpu_seconds)
            lines.append(CostLine(ITEMS[usage.kind], usage.provider, usage.model, seconds,
                                  "CPU second", self._cpu_second, seconds * self._cpu_second,
                                  usage.estimated))
        return lines

    def _billed_lines(self, usage: Usage) -> list[CostLine]:
        item = ITEMS[usage.kind]
        if usage.cached or usage.provider.endswith(CACHE_SUFFIX):  # nothing was consumed
            return [CostLine(item, usage.provider, usage.model, ONE, "cache hit (not billed)",
                             ZERO, ZERO, usage.estimated)]
        key = (usage.provider, usage.model)
        entry = self._entries.get(key)
        unit = entry.unit if entry is not None else registry.uncatalogued_unit(
            usage.kind, usage.provider, usage.model)
        rates = self._rates[key] if entry is not None else self._local
        if unit is None:
            return self._unpriced(usage, item, "no price for model; counted as $0")
        if unit is BillingUnit.FREE:
            return [CostLine(item, usage.provider, usage.model, ONE, "request (free)", ZERO,
                             ZERO, usage.estimated)]
        lines = [CostLine(item, usage.provider, usage.model, quantity, label, rates[rate],
                          quantity * rates[rate], usage.estimated)
                 for label, rate, quantity in _quantities(unit, usage)]
        if any(line.quantity < 0 for line in lines):
            # A negative quantity is a provider-adapter bug, not a refund.
            log.warning("negative usage ignored", kind=usage.kind, provider=usage.provider,
                        model=usage.model)
            return [_at_zero(line) for line in lines]
        if not lines and any((usage.audio_seconds, usage.input_tokens, usage.output_tokens,
                              usage.characters)):
            # E.g. an estimate in characters of a request to a model billed per token.
            return self._unpriced(usage, item, "usage not in its model's unit; counted as $0")
        return lines

    def cost_decimal(self, usage: Usage) -> tuple[Decimal, bool]:
        """(cost, priced): priced is False when no price was found (cost counted as 0)."""
        return total_of(self.cost_lines(usage))

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

    def _unpriced(self, usage: Usage, item: Item, why: str) -> list[CostLine]:
        """Lines at $0, flagged, in the first unit the provider declares that measures
        the usage (so the bill still shows what was used); warned once per model."""
        key = f"{usage.kind}:{usage.provider}:{usage.model}"
        if key not in self.unpriced_models:
            self.unpriced_models.add(key)
            # Once per model: a missing price must be visible without flooding the log.
            log.warning(why, kind=usage.kind, provider=usage.provider, model=usage.model)
        units = [b.unit for b in registry.billing(usage.kind, usage.provider)
                 if b.unit not in UNCATALOGUED] + [DEFAULT_BILLING[usage.kind][0].unit]
        measured = next((found for unit in units if (found := _quantities(unit, usage))), [])
        return [CostLine(item, usage.provider, usage.model, quantity, label, ZERO, ZERO,
                         usage.estimated, unpriced=True) for label, _, quantity in measured]


def _rates(entry: ModelPrice) -> dict[str, Decimal]:
    """The entry's prices by key, as decimals; cached input defaults to the input price."""
    rates = {key: dec(value) for key in PRICE_KEYS
             if (value := getattr(entry, key)) is not None}
    if "input_per_1m" in rates:
        rates.setdefault("cached_input_per_1m", rates["input_per_1m"])
    return rates


def _quantities(unit: BillingUnit, usage: Usage) -> list[tuple[str, str, Decimal]]:
    """(readable unit, rate key, quantity) of each non-zero quantity `unit` bills (any
    unit but free)."""
    if unit in (BillingUnit.AUDIO_MINUTE, BillingUnit.LOCAL_AUDIO_MINUTE):
        local = unit is BillingUnit.LOCAL_AUDIO_MINUTE
        measured = [("local audio minute" if local else "audio minute",
                     _LOCAL_RATE if local else "per_minute", dec(usage.audio_seconds) / SIXTY)]
    elif unit is BillingUnit.TOKENS:
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        measured = [("1M input tokens", "input_per_1m", (usage.input_tokens - cached) / MILLION),
                    ("1M cached input tokens", "cached_input_per_1m", cached / MILLION),
                    ("1M output tokens", "output_per_1m", usage.output_tokens / MILLION)]
    elif unit is BillingUnit.AUDIO_TOKENS:
        into, out = _AUDIO_TOKEN_UNITS[usage.kind]
        measured = [(into, "input_per_1m", usage.input_tokens / MILLION),
                    (out, "output_per_1m", usage.output_tokens / MILLION)]
    else:  # BillingUnit.CHARACTERS
        measured = [("1K characters", "per_1k_characters", usage.characters / THOUSAND)]
    return [(label, rate, Decimal(q)) for label, rate, q in measured if q != 0]


def _at_zero(line: CostLine) -> CostLine:
    return CostLine(line.item, line.provider, line.model, line.quantity, line.unit, ZERO,
                    ZERO, line.estimated, unpriced=True)
