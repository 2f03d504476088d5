"""The price catalog: each model's list price in its vendor's unit, and the date its vendor
announced it shuts down.

`[[prices.models]]` in config.toml holds one `ModelPrice` per (provider, model); without
that key the catalog is `DEFAULT_CATALOG`, which config.toml shows in full. Prices are list
prices in USD. [U] marks a price not checked against the vendor's own page (third-party
listings). Shutdown dates are the installed openai SDK's deprecation notes
(types/shared/chat_model.py, types/audio_model.py, types/audio/speech_model.py), read
2026-11-30.

Imported by `engine.config`, so nothing here imports the configuration.
"""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.providers.billing import BillingUnit

# The price keys each catalog unit needs, then those it may have.
UNIT_PRICES: dict[BillingUnit, tuple[tuple[str, ...], tuple[str, ...]]] = {
    BillingUnit.AUDIO_MINUTE: (("per_minute",), ()),
    # A model without a cached price bills cached input at the input price.
    BillingUnit.TOKENS: (("input_per_1m", "output_per_1m"), ("cached_input_per_1m",)),
    BillingUnit.AUDIO_TOKENS: (("input_per_1m", "output_per_1m"), ()),
    BillingUnit.CHARACTERS: (("per_1k_characters",), ()),
    BillingUnit.FREE: ((), ()),
}
PRICE_KEYS = ("per_minute", "input_per_1m", "cached_input_per_1m", "output_per_1m",
              "per_1k_characters")


class ModelPrice(BaseModel):
    """One `[[prices.models]]` entry: what one model of one provider costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1)  # as in the chains (Usage.provider)
    model: str = Field(min_length=1)  # as the provider reports it (its `model`)
    unit: BillingUnit
    per_minute: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    input_per_1m: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cached_input_per_1m: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output_per_1m: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    per_1k_characters: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    shutdown: date | None = None  # the vendor's announced shutdown date

    @field_validator("unit", mode="before")
    @classmethod
    def _catalog_unit(cls, value: object) -> object:
        if not isinstance(value, str) or value not in UNIT_PRICES:
            raise ValueError(f"unknown unit {value!r}; one of: {', '.join(UNIT_PRICES)}")
        return value

    @model_validator(mode="after")
    def _prices_fit_the_unit(self) -> ModelPrice:
        required, optional = UNIT_PRICES[self.unit]
        given = {key for key in PRICE_KEYS if getattr(self, key) is not None}
        missing = [key for key in required if key not in given]
        if missing:
            raise ValueError(f"{self.provider} {self.model!r}: unit {self.unit.value!r} "
                             f"needs {' and '.join(missing)}")
        stray = sorted(given.difference(required, optional))
        if stray:
            raise ValueError(f"{self.provider} {self.model!r}: unit {self.unit.value!r} "
                             f"takes no {', '.join(stray)}")
        return self


_T = BillingUnit.TOKENS
_A = BillingUnit.AUDIO_TOKENS
_C = BillingUnit.CHARACTERS
# OpenAI's announced shutdowns (none is listed for gpt-5.4-mini or gpt-transcribe).
_OPENAI_VOICES_END = date(2027, 1, 6)  # every OpenAI speech model; no successor listed
_GPT_4_END = date(2027, 1, 14)
_TRANSCRIBE_END = date(2027, 2, 26)

DEFAULT_CATALOG: tuple[ModelPrice, ...] = (
    # OpenAI chat (the agent), per 1M input / cached input / output tokens.
    # [U] gpt-5.4-mini, the default agent (a reasoning model: see llm_reasoning_effort).
    ModelPrice(provider="openai", model="gpt-5.4-mini", unit=_T, input_per_1m=0.75,
               cached_input_per_1m=0.075, output_per_1m=4.50),
    # [U] no cached price listed: cached input is billed here at the input price.
    ModelPrice(provider="openai", model="gpt-5.4-nano", unit=_T, input_per_1m=0.20,
               output_per_1m=1.25, shutdown=date(2027, 4, 1)),
    ModelPrice(provider="openai", model="gpt-5-mini", unit=_T, input_per_1m=0.25,  # [U]
               cached_input_per_1m=0.025, output_per_1m=2.00, shutdown=date(2026, 12, 11)),
    ModelPrice(provider="openai", model="gpt-4.1-mini", unit=_T, input_per_1m=0.40,  # [U]
               cached_input_per_1m=0.10, output_per_1m=1.60, shutdown=_GPT_4_END),
    ModelPrice(provider="openai", model="gpt-4o-mini", unit=_T, input_per_1m=0.15,  # [U]
               cached_input_per_1m=0.075, output_per_1m=0.60, shutdown=_GPT_4_END),
    # OpenAI speech-to-text. gpt-transcribe (the default) and whisper-1: per audio minute.
    ModelPrice(provider="openai", model="gpt-transcribe", unit=BillingUnit.AUDIO_MINUTE,
               per_minute=0.0045),
    ModelPrice(provider="openai", model="whisper-1", unit=BillingUnit.AUDIO_MINUTE,
               per_minute=0.006, shutdown=_TRANSCRIBE_END),
    # The gpt-4o transcribers report tokens: audio in, text out, per 1M. [U] third-party:
    # audio input $3.00 (mini) and $6.00; $1.25 and $2.50 are their text-prompt prices.
    ModelPrice(provider="openai", model="gpt-4o-mini-transcribe", unit=_A, input_per_1m=3.00,
               output_per_1m=5.00, shutdown=_TRANSCRIBE_END),
    ModelPrice(provider="openai", model="gpt-4o-transcribe", unit=_A, input_per_1m=6.00,
               output_per_1m=10.00, shutdown=_TRANSCRIBE_END),
    # Realtime (streaming) transcription, per minute of audio sent.
    ModelPrice(provider="openai_realtime", model="gpt-live-transcribe",
               unit=BillingUnit.AUDIO_MINUTE, per_minute=0.017),
    ModelPrice(provider="openai_realtime", model="gpt-realtime-whisper",
               unit=BillingUnit.AUDIO_MINUTE, per_minute=0.017),
    ModelPrice(provider="openai_realtime", model="gpt-transcribe",
               unit=BillingUnit.AUDIO_MINUTE, per_minute=0.0045),
    # OpenAI voices. gpt-4o-mini-tts: text in and audio out per 1M tokens (the provider
    # estimates both); tts-1 [U]: per 1K characters.
    ModelPrice(provider="openai", model="gpt-4o-mini-tts", unit=_A, input_per_1m=0.60,
               output_per_1m=12.00, shutdown=_OPENAI_VOICES_END),
    ModelPrice(provider="openai", model="tts-1", unit=_C, per_1k_characters=0.015,
               shutdown=_OPENAI_VOICES_END),
    # ElevenLabs, per 1K characters [U]: third-party pay-as-you-go figures.
    ModelPrice(provider="elevenlabs", model="eleven_flash_v2_5", unit=_C,
               per_1k_characters=0.05),
    ModelPrice(provider="elevenlabs", model="eleven_multilingual_v2", unit=_C,
               per_1k_characters=0.10),
    ModelPrice(provider="elevenlabs", model="eleven_v3", unit=_C, per_1k_characters=0.10),
    # Twilio's own <Say> (the last-resort voice) [U]: free with the basic voices; Twilio
    # bills Amazon Polly and Google voices per character: set your account's rate.
    ModelPrice(provider="twilio", model="say", unit=_C, per_1k_characters=0.0),
)
