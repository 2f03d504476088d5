"""`[[experiments]]`: A/B tests on live calls (engine/experiments/).

Each experiment names its variants, their traffic weights and what each one changes of
the call's pipeline: the provider chains (voice, agent, speech-to-text), any provider's
table (a voice id, a voice or LLM model), the system prompt and turn-taking settings.
One variant is the control the others are compared with; the guard rails pause a
variant that is worse than the control by more than a margin, with 95 % confidence.

Everything is checked at start: unknown keys, provider names and provider settings, the
control's name, weights. One experiment may be enabled at a time (a call's pipeline is
built from one variant's overrides).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, model_validator

from engine.config.base import Section
from engine.config.sections import TurnConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class GuardRails(Section):
    """When a variant is paused automatically (compared with the control)."""

    enabled: bool = True
    # Paused when its escalation rate is above the control's by more than this many
    # points (0.10 = ten percentage points), with 95 % confidence.
    escalation_margin: float = Field(default=0.10, ge=0.0, le=1.0)
    # Paused when its voice-to-voice p95 is above the control's by more than this, with
    # 95 % confidence (bootstrap interval of the difference).
    v2v_p95_margin_s: float = Field(default=0.5, ge=0.0)
    min_calls: int = Field(default=20, ge=2)  # per variant, before any verdict
    check_every_calls: int = Field(default=10, ge=1)  # ended calls between checks
    check_every_s: float = Field(default=300.0, gt=0)  # and at least this often
    window_days: float = Field(default=30.0, gt=0)  # history the check reads


class VariantConfig(Section):
    """One arm of an experiment and what it overrides (nothing: the engine's config)."""

    name: str
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    # Provider chains (names as in [providers]).
    voice: list[str] | None = Field(default=None, min_length=1)  # providers.tts
    agent: list[str] | None = Field(default=None, min_length=1)  # providers.agent
    stt: list[str] | None = Field(default=None, min_length=1)  # providers.stt
    # Provider tables, merged over [providers.NAME]: {piper = {voice = "..."}}.
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    system_prompt: str | None = None  # policy.system_prompt ({business} is filled in)
    turns: dict[str, Any] = Field(default_factory=dict)  # merged over [turns]

    @model_validator(mode="after")
    def _check(self) -> VariantConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"variant name {self.name!r}: 1-32 letters, digits, _ . -")
        unknown = sorted(set(self.turns) - set(TurnConfig.model_fields))
        if unknown:
            raise ValueError(f"variant {self.name}: unknown turns setting(s) "
                             f"{', '.join(unknown)}")
        from engine.providers.registry import registry  # provider modules import config

        for kind, names in (("tts", self.voice), ("agent", self.agent), ("stt", self.stt)):
            for name in names or []:
                if name not in registry.names(kind):  # type: ignore[arg-type]
                    raise ValueError(f"variant {self.name}: unknown {kind} provider "
                                     f"{name!r}; known: {', '.join(registry.names(kind))}")  # type: ignore[arg-type]
        tables = registry.tables()
        for table, values in self.providers.items():
            model = tables.get(table)
            if model is None:
                raise ValueError(f"variant {self.name}: unknown provider table {table!r}")
            try:
                model.model_validate(values)
            except ValidationError as exc:
                raise ValueError(f"variant {self.name}: providers.{table}: " + "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                ) from None
        return self

    def overrides(self) -> dict[str, Any]:
        """What this variant changes, for display and logs (set keys only)."""
        return self.model_dump(exclude={"name", "weight"}, exclude_defaults=True)


class ExperimentConfig(Section):
    name: str
    enabled: bool = True
    control: str = ""  # the variant the others are compared with (default: the first)
    variants: list[VariantConfig] = Field(min_length=2)
    guard_rails: GuardRails = Field(default_factory=GuardRails)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"experiment name {self.name!r}: 1-32 letters, digits, _ . -")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: variant names repeat")
        if not self.control:
            self.control = names[0]
        elif self.control not in names:
            raise ValueError(f"experiment {self.name}: control {self.control!r} is not "
                             f"one of its variants ({', '.join(names)})")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"experiment {self.name}: the weights add up to 0")
        return self

    def variant(self, name: str) -> VariantConfig | None:
        return next((v for v in self.variants if v.name == name), None)


def _one_enabled(experiments: list[ExperimentConfig]) -> list[ExperimentConfig]:
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError("experiments: names repeat")
    enabled = [e.name for e in experiments if e.enabled]
    if len(enabled) > 1:
        raise ValueError(f"experiments: only one may be enabled at a time "
                         f"(enabled: {', '.join(enabled)})")
    return experiments


Experiments = Annotated[list[ExperimentConfig], AfterValidator(_one_enabled)]
