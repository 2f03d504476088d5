"""`[providers]`: the fallback chains, their limits, and one table per provider."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config.base import Section

S = TypeVar("S", bound=BaseModel)


class ProvidersConfig(Section):
    """The fallback chains, their limits, and one table per provider (`[providers.NAME]`).

    The tables are not fields here: each provider module declares its own settings model
    (engine.providers.registry), and every table is validated against it, so adding a
    provider changes nothing in this file. Read a table with `settings(name, Model)`.
    """

    # Tables arrive as extra keys and are validated (and typos refused) below.
    model_config = ConfigDict(extra="allow")

    # Fallback chains, tried in order. Cloud providers without a key are skipped.
    stt: list[str] = Field(default_factory=lambda: ["local_whisper"])
    agent: list[str] = Field(default_factory=lambda: ["faq"])
    tts: list[str] = Field(default_factory=lambda: ["piper", "espeak"])
    # The cheapest chains: new turns use them while the budget is exhausted with
    # budget.on_exhausted = "degrade" (voices keep replaying cached audio).
    degraded_stt: list[str] = Field(default_factory=lambda: ["local_whisper"], min_length=1)
    degraded_agent: list[str] = Field(default_factory=lambda: ["faq"], min_length=1)
    degraded_tts: list[str] = Field(default_factory=lambda: ["piper", "espeak"],
                                    min_length=1)
    # Importable packages or modules holding more providers (each registers itself).
    packages: list[str] = Field(default_factory=list)
    # A provider that fails this many times in a row is skipped for `breaker_reset_s`.
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    # How long the chain waits for a provider's first output before it moves on (the
    # margins over the measured first-byte times: config.toml).
    stt_timeout_s: float = Field(default=3.0, gt=0, allow_inf_nan=False)
    llm_first_token_timeout_s: float = Field(default=1.5, gt=0, allow_inf_nan=False)
    tts_first_audio_timeout_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    llm_summarize_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # A request the call stopped waiting for (a barge-in, a timeout that fell back) is
    # read on in the background this long, so what its vendor bills gets booked.
    drain_timeout_s: float = Field(default=15.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _validate_providers(self) -> ProvidersConfig:
        # Imported here: provider modules import this one.
        from engine.providers.registry import registry

        registry.discover(self.packages)
        known = registry.tables()
        tables = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name, value in tables.items():
            model = known.get(name)
            if not isinstance(value, dict | BaseModel):
                raise ValueError(f"providers.{name}: unknown setting")
            if model is None:
                raise ValueError(f"providers.{name}: unknown provider table; known: "
                                 f"{', '.join(sorted(known))}")
            try:
                tables[name] = model.model_validate(value)
            except ValidationError as exc:
                raise ValueError("; ".join(
                    f"providers.{name}.{'.'.join(map(str, error['loc']))}: {error['msg']}"
                    for error in exc.errors())) from exc
        for name, model in known.items():
            tables.setdefault(name, model())
        for key, chains in (("", self.chains()), ("degraded_", self.degraded_chains())):
            for kind, names in chains.items():
                kind_names = registry.names(kind)
                for name in (n for n in names if n not in kind_names):
                    raise ValueError(f"providers.{key}{kind}: unknown provider {name!r}; "
                                     f"known: {', '.join(kind_names) or 'none'}")
        return self

    def chains(self) -> dict[Literal["stt", "agent", "tts"], list[str]]:
        return {"stt": self.stt, "agent": self.agent, "tts": self.tts}

    def first_output_timeout_s(self, kind: Literal["stt", "agent", "tts"]) -> float:
        """How long the `kind` chain waits for a provider's first output."""
        timeouts = {"stt": self.stt_timeout_s, "agent": self.llm_first_token_timeout_s,
                    "tts": self.tts_first_audio_timeout_s}
        return timeouts[kind]

    def request_deadline_s(self, kind: Literal["stt", "agent", "tts"]) -> float:
        """How long a cloud provider's own request may wait for its first output: the
        chain gives up first, then reads the request on for its usage."""
        return self.first_output_timeout_s(kind) + self.drain_timeout_s

    def degraded_chains(self) -> dict[Literal["stt", "agent", "tts"], list[str]]:
        return {"stt": self.degraded_stt, "agent": self.degraded_agent,
                "tts": self.degraded_tts}

    def settings(self, name: str, model: type[S]) -> S:
        """The validated `[providers.NAME]` table (its defaults when config.toml has none)."""
        table = (self.model_extra or {}).get(name)
        if table is None:  # the provider registered after this config was validated
            table = model()
        if not isinstance(table, model):
            raise TypeError(f"providers.{name} is a {type(table).__name__}, "
                            f"not a {model.__name__}")
        return table
