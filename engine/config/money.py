"""`[prices]` and `[budget]`: the price catalog and flat rates, the spend limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import Section
from engine.money.catalog import DEFAULT_CATALOG, ModelPrice
from engine.providers.billing import BillingUnit

_MOVED_PRICE_KEYS = ("stt_openai_per_minute", "stt_per_million", "llm_per_million",
                     "tts_per_thousand_chars")


class PricesConfig(Section):
    """List prices in USD: the model catalog and the flat rates. Verify against the
    vendors' pages before quoting."""

    # One entry per (provider, model) a configured provider can use, in its vendor's unit
    # (engine.money.catalog; config.toml lists the defaults).
    models: list[ModelPrice] = Field(default_factory=lambda: list(DEFAULT_CATALOG))
    stt_local_per_minute: float = 0.0  # our own CPU's minute of speech-to-text
    # What a CPU second of a local model costs you (e.g. the local voice), if you want it
    # on the bill: a usage that reports its CPU time gets a line at this rate.
    cpu_second: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    twilio_per_minute: float = 0.0085
    # Twilio Media Streams, on top of the voice minute, per started minute of the stream.
    twilio_media_streams_per_minute: float = 0.004
    # OpenAI Realtime API, for the "what we saved" comparison (per 1M tokens).
    realtime_audio_in: float = 10.0
    realtime_audio_cached_in: float = 0.30
    realtime_audio_out: float = 20.0
    realtime_text_in: float = 0.60
    realtime_text_out: float = 2.40
    realtime_caller_tokens_per_minute: float = 600.0
    realtime_agent_tokens_per_minute: float = 1200.0

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_keys(cls, data: object) -> object:
        moved = [key for key in _MOVED_PRICE_KEYS if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError(f"prices.{', prices.'.join(moved)}: model prices moved to the "
                             "[[prices.models]] catalog, one entry per provider and model "
                             "with its unit (see config.toml)")
        return data

    @model_validator(mode="after")
    def _check_catalog(self) -> PricesConfig:
        # Imported here: provider modules import this one.
        from engine.providers.registry import registry

        registry.discover()  # the built-in providers' units (packages: ProvidersConfig)
        first: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.models):
            where = f"prices.models[{i}] ({entry.provider} {entry.model!r})"
            seen = first.setdefault((entry.provider, entry.model), i)
            if seen != i:
                raise ValueError(f"{where}: a second entry (the first is prices.models[{seen}])")
            units = registry.declared_units(entry.provider, entry.model)
            if units is not None and entry.unit not in units | {BillingUnit.FREE}:
                raise ValueError(f"{where}: unit {entry.unit.value!r} is not one "
                                 f"{entry.provider} bills in ({', '.join(sorted(units))})")
        return self


class BudgetConfig(Section):
    """Spend limits per UTC day and month, and what happens when one is reached
    (engine.money.budget); the totals are the fleet's when shared through Redis."""

    daily_usd: float = Field(default=20.0, ge=0, allow_inf_nan=False)  # 0 = no daily limit
    monthly_usd: float = Field(default=500.0, ge=0, allow_inf_nan=False)  # 0 = no limit
    # At this share of either limit the budget state is "warning".
    warning_share: float = Field(default=0.8, gt=0, le=1)
    # The state once a limit is reached: degraded (new turns use the cheapest chains,
    # providers.degraded_*), forwarding (new calls are dialled to transfer.number; without
    # one, refused) or refusing (new calls hear `refuse_message`, then a hang-up).
    on_exhausted: Literal["degrade", "forward", "refuse"] = "degrade"
    refuse_message: str = Field(
        default="Sorry, we cannot take your call right now. Please try again later. Goodbye.",
        min_length=1)
    # With redis.url set, the day and month totals are the whole fleet's (kept in Redis);
    # false gives each engine its own budget. Without redis.url the totals are local.
    shared: bool = True
    # While Redis is unreachable an engine counts its own spend since the last fleet total
    # as this share of the fleet's: 1 / (number of engines) or less keeps the fleet within
    # its limits during an outage.
    offline_share: float = Field(default=0.5, gt=0, le=1)
    # An idle engine reads the fleet totals this often; a dead Redis is retried this often.
    refresh_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    redis_op_timeout_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
