"""Each variant's pipeline, built once at start: its config and its chains.

A variant's config is the engine's with its overrides merged in (chains, provider
tables, system prompt, turn settings). Its chains reuse the engine's provider instances
by name, unless the variant changes that provider's table (another voice id or model):
then, like a provider no chain of the engine names, it is built here, warmed up, and
closed with the engine. A variant that overrides nothing shares the engine's deps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.config import Config, ConfigError, TurnConfig
from engine.config.experiments import ExperimentConfig, VariantConfig
from engine.money.model_checks import check_configured_models
from engine.providers.chain import FallbackEvent
from engine.providers.registry import Kind
from engine.session.conversation import PipelineDeps
from engine.wiring import Providers, _build_chain, _chains

_CHAIN_FIELDS: tuple[tuple[Kind, str], ...] = (("stt", "stt"), ("agent", "agent"),
                                               ("tts", "voice"))


def variant_config(base: Config, variant: VariantConfig) -> Config:
    """The engine's config with the variant's overrides merged in."""
    update: dict[str, Any] = {}
    providers: dict[str, Any] = {}
    for kind, name in _CHAIN_FIELDS:
        chain = getattr(variant, name)
        if chain is not None:
            providers[kind] = list(chain)
    tables = base.providers.model_extra or {}
    for table, values in variant.providers.items():
        current = tables[table]
        providers[table] = type(current).model_validate({**current.model_dump(), **values})
    if providers:
        update["providers"] = base.providers.model_copy(update=providers)
    if variant.system_prompt is not None:
        update["policy"] = base.policy.model_copy(
            update={"system_prompt": variant.system_prompt})
    if variant.turns:
        update["turns"] = TurnConfig.model_validate({**base.turns.model_dump(),
                                                     **variant.turns})
    return base.model_copy(update=update)


def build_variant_deps(config: Config, experiment: ExperimentConfig, shared: Providers,
                       base: PipelineDeps, on_fallback: Callable[[FallbackEvent], None]
                       ) -> tuple[dict[str, PipelineDeps], list[Any]]:
    """Each variant's deps, and the providers built for them (the caller warms them up
    and closes them). ConfigError names what a variant got wrong."""
    deps: dict[str, PipelineDeps] = {}
    built: list[Any] = []
    for variant in experiment.variants:
        where = f"experiments.{experiment.name}.{variant.name}"
        if not variant.overrides():
            deps[variant.name] = base
            continue
        cfg = variant_config(config, variant)
        # Providers whose table the variant changes are its own; the rest are shared.
        reusable = Providers(*([p for p in shared.chain(kind) if p.name not in variant.providers]
                               for kind in ("stt", "agent", "tts")))
        mine = Providers()
        for kind in ("stt", "agent", "tts"):
            try:
                chain, new = _build_chain(cfg, kind, cfg.providers.chains()[kind],
                                          f"{where}.", reusable)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            mine.chain(kind).extend(chain)
            built += new
            check_configured_models(cfg, [(kind, p) for p in new])
        chains = _chains(cfg, mine, base.cache, on_fallback)
        deps[variant.name] = PipelineDeps(
            config=cfg, stt=chains.stt, agent=chains.agent, tts=chains.tts, cache=base.cache,
            matcher=base.matcher, tools=base.tools, knowledge=base.knowledge,
            cheapest=base.cheapest, degraded=base.degraded)
    return deps, built
