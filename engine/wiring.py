"""Builds an Engine from configuration: which providers, which backends.

The embedded default (in-process bus, SQLite history, local providers) and the scaled
deployment (Redis bus and cache, cloud providers) are the same code with other parts
chosen here. The chains name providers; the registry (engine.providers.registry) says
how to build each. A provider that cannot run here (a cloud provider without its API
key) is skipped, loudly. With `budget.on_exhausted = "degrade"` the cheapest chains
(providers.degraded_*) are built too, sharing the instances the usual chains have.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.app import Engine
from engine.config import Config, ConfigError
from engine.experiments.runner import ExperimentRunner
from engine.hub import OpsHub
from engine.knowledge import load_knowledge
from engine.log import get_logger
from engine.money.model_checks import check_configured_models
from engine.providers.base import Agent, SpeechToText, TextToSpeech
from engine.providers.caching_tts import CachingTTS
from engine.providers.chain import FallbackEvent
from engine.providers.fallback import FallbackAgent, FallbackSTT
from engine.providers.fallback_tts import FallbackTTS
from engine.providers.faq.matcher import FaqMatcher
from engine.providers.registry import Kind, ProviderUnavailable, registry
from engine.providers.response_cache import ResponseCache, make_response_cache
from engine.record.data_dir import prepare_data_dir
from engine.record.history import CallHistory
from engine.session.call_session import CallSession
from engine.session.conversation import ConversationPipeline, PipelineDeps, TurnChains
from engine.tools.registry import ToolBox

log = get_logger(__name__)

_PROTOCOLS: dict[Kind, type] = {"stt": SpeechToText, "agent": Agent, "tts": TextToSpeech}


class NoProviderError(ValueError):
    """A provider chain in config.toml has nothing usable in it."""


@dataclass
class Providers:
    stt: list[SpeechToText] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    tts: list[TextToSpeech] = field(default_factory=list)

    def all(self) -> list[SpeechToText | Agent | TextToSpeech]:
        return [*self.stt, *self.agents, *self.tts]

    def by_kind(self) -> list[tuple[Kind, SpeechToText | Agent | TextToSpeech]]:
        """Every provider with the chain it serves in, in chain order."""
        return [*(("stt", p) for p in self.stt), *(("agent", p) for p in self.agents),
                *(("tts", p) for p in self.tts)]

    def chain(self, kind: Kind) -> list[Any]:
        chains: dict[Kind, list[Any]] = {"stt": self.stt, "agent": self.agents,
                                         "tts": self.tts}
        return chains[kind]


def build_providers(config: Config) -> Providers:
    """Instantiate every provider the chains name (without warming them up)."""
    registry.discover(config.providers.packages)
    chains = config.providers.chains()
    return Providers(*(_build_chain(config, kind, chains[kind], "providers.", None)[0]
                       for kind in ("stt", "agent", "tts")))


def degrades(config: Config) -> bool:
    """Whether an exhausted budget switches turns to the cheapest chains."""
    budget = config.budget
    return budget.on_exhausted == "degrade" and (budget.daily_usd > 0 or budget.monthly_usd > 0)


def build_cheapest(config: Config, usual: Providers) -> tuple[Providers, Providers]:
    """The providers of the cheapest chains (providers.degraded_*), and apart those of
    them built here: the usual chains' instances are shared, the others are new."""
    chains = config.providers.degraded_chains()
    cheapest, built = Providers(), Providers()
    for kind in ("stt", "agent", "tts"):
        chain, new = _build_chain(config, kind, chains[kind], "providers.degraded_", usual)
        cheapest.chain(kind).extend(chain)
        built.chain(kind).extend(new)
    return cheapest, built


def _build_chain(config: Config, kind: Kind, names: list[str], key: str,
                 shared: Providers | None) -> tuple[list[Any], list[Any]]:
    """The providers of one chain (config key `{key}{kind}`), in order, and those of them
    built here (the others come from `shared`); those that cannot run here are skipped."""
    protocol = _PROTOCOLS[kind]
    chain: list[Any] = []
    built: list[Any] = []
    for name in names:
        known = [p for p in shared.chain(kind) if p.name == name] if shared else []
        if known:
            chain.append(known[0])
            continue
        spec = registry.spec(kind, name)
        try:
            provider = spec.build(config.providers.settings(name, spec.settings), config)
        except ProviderUnavailable as exc:
            log.warning("wiring.provider_skipped", kind=kind, provider=name, reason=exc.reason)
            continue
        if not isinstance(provider, protocol):  # a plug-in's mistake, caught at start-up
            raise TypeError(f"{key}{kind}: {name!r} built a {type(provider).__name__}, "
                            f"which is not a {protocol.__name__}")
        chain.append(provider)
        built.append(provider)
    if not chain:
        raise NoProviderError(f"{key}{kind}: no usable provider (check the chain and the "
                              "API keys in the environment)")
    return chain, built


def build_deps(config: Config, providers: Providers, cache: ResponseCache,
               hub: OpsHub, cheapest: Providers | None = None) -> PipelineDeps:
    """The fallback chains every call shares; with `cheapest`, also the chains new turns
    use while the budget is degraded."""

    def on_fallback(event: FallbackEvent) -> None:
        hub.provider_switched(event.kind, event.from_provider, event.to_provider, event.error)

    usual = _chains(config, providers, cache, on_fallback)
    matcher = FaqMatcher(config.faq.entries, config.faq.match_threshold) \
        if config.faq.entries else None
    deps = PipelineDeps(config=config, stt=usual.stt, agent=usual.agent, tts=usual.tts,
                        cache=cache, matcher=matcher)
    if cheapest is not None:
        deps.cheapest = _chains(config, cheapest, cache, on_fallback)
        deps.degraded = lambda: hub.budget.state() == "degraded"
    return deps


def _chains(config: Config, providers: Providers, cache: ResponseCache,
            on_fallback: Callable[[FallbackEvent], None]) -> TurnChains:
    p = config.providers
    breaker = {"breaker_failures": p.breaker_failures, "breaker_reset_s": p.breaker_reset_s,
               "drain_timeout_s": p.drain_timeout_s, "on_event": on_fallback}
    stt = FallbackSTT(providers.stt, timeout_s=p.stt_timeout_s, **breaker)  # type: ignore[arg-type]
    agent = FallbackAgent(providers.agents, first_token_timeout_s=p.llm_first_token_timeout_s,
                          summarize_timeout_s=p.llm_summarize_timeout_s,
                          **breaker)  # type: ignore[arg-type]
    # Each voice is cached under the provider that produced it (not the chain).
    tts = FallbackTTS([CachingTTS(t, cache, config.turns.first_clause_words)
                       for t in providers.tts],
                      first_audio_timeout_s=p.tts_first_audio_timeout_s,
                      **breaker)  # type: ignore[arg-type]
    return TurnChains(stt, agent, tts)


async def _close(parts: list[Any]) -> None:
    for part in parts:
        try:
            await part.aclose()
        except Exception:
            log.exception("wiring.close_failed", part=type(part).__name__)


async def build_engine(config: Config, *, history: bool = True,
                       providers: Providers | None = None,
                       supervisor_api: bool = True) -> Engine:
    """The engine the configuration describes; models are loaded and warmed here.

    Providers passed in belong to the caller (e.g. shared by several engines in tests)
    and are not closed with this engine; the cheapest chains' providers it had to build
    are. The configured models are checked against the price catalog first
    (engine.money.model_checks): ConfigError names what to fix.
    """
    own_providers = providers is None
    providers = providers or build_providers(config)
    cheapest, built = build_cheapest(config, providers) if degrades(config) else (None, None)
    owned = (providers.all() if own_providers else []) + (built.all() if built else [])
    try:  # before anything else opens: a refused model stops the engine here
        check_configured_models(config, providers.by_kind() + (built.by_kind() if built
                                                               else []))
        knowledge = await load_knowledge(config)  # a missing knowledge file stops it here
        tools = ToolBox.from_config(config)  # so does a tool's missing secret
    except ConfigError:
        await _close(owned)
        raise
    prepare_data_dir(config.data_path())  # private: 0700, its files 0600
    store = await _open_history(config) if history else None
    hub = OpsHub.from_config(config, store)
    if store is not None:  # the budget starts from what the history and its journal spent
        since = (datetime.now(UTC) - timedelta(days=40)).date()
        hub.budget.totals.seed(await store.daily_costs(since))
    for provider in providers.all() + (built.all() if built else []):
        await provider.warm_up()  # load models before the first call, not during it
    cache = make_response_cache(config)
    deps = build_deps(config, providers, cache, hub, cheapest)
    deps.knowledge = knowledge
    deps.tools = tools
    experiment = await _start_experiment(config, providers, deps, hub)

    def pipeline(session: CallSession) -> ConversationPipeline:
        chosen = experiment.deps_for(session) if experiment is not None else deps
        conversation = ConversationPipeline(session, chosen,
                                            cost_so_far=lambda: hub.cost_of(session.call_sid))
        if experiment is not None:
            experiment.track(session, conversation)
        return conversation

    engine = Engine(config, tts=deps.tts, conversation_factory=pipeline, hub=hub)

    async def close_all() -> None:
        # The chains close their providers; those shared with the cheapest chains once.
        closers: list[Any] = [cache, hub.bus, *([knowledge] if knowledge else []),
                              *([tools] if tools else [])]
        if own_providers:
            closers += [deps.stt, deps.agent, deps.tts]
        if experiment is not None:
            await experiment.aclose()
            closers += experiment.built
        await _close(closers + (built.all() if built else []))
        if store is not None:
            await store.aclose()

    engine.on_stopping.append(close_all)
    engine.deps = deps
    if supervisor_api:
        from engine.supervision.server import SupervisorApi

        # reads or creates the console token now
        api = SupervisorApi(config, engine.supervisor_backend)
        engine.supervisor_api = api
        engine.on_started.append(api.start)
        engine.on_stopping.insert(0, api.stop)
    return engine


async def _start_experiment(config: Config, providers: Providers, deps: PipelineDeps,
                            hub: OpsHub) -> ExperimentRunner | None:
    """The enabled experiment's variants, their chains built and warmed (none: None)."""
    from engine.experiments.variants import build_variant_deps  # it builds with this module

    enabled = [e for e in config.experiments if e.enabled]
    if not enabled:
        return None

    def on_fallback(event: FallbackEvent) -> None:
        hub.provider_switched(event.kind, event.from_provider, event.to_provider, event.error)

    variant_deps, built = build_variant_deps(config, enabled[0], providers, deps, on_fallback)
    for provider in built:
        await provider.warm_up()
    runner = ExperimentRunner(enabled[0], variant_deps, deps, hub)
    runner.built = built
    hub.commands.experiments = runner  # supervisors pause and resume its variants
    if config.fleet.enabled and config.redis.url:
        from engine.experiments.shared_pauses import SharedPauses
        from engine.fleet.redis_link import FleetKeys, FleetRedis, fleet_client

        op_timeout_s = config.fleet.redis_op_timeout_s
        link = FleetRedis(fleet_client(config.redis.url, op_timeout_s, "switchboard-experiments"),
                          FleetKeys(f"{config.redis.key_prefix}:fleet"), op_timeout_s)
        await runner.share_pauses(SharedPauses(link, enabled[0].name))
    return runner


async def _open_history(config: Config) -> CallHistory:
    """The history in the data directory, its journal replayed (writes a full disk
    refused before) and the calls a dead engine left open closed."""
    data = config.data_path()
    # A stable id across restarts, so a restarted engine recovers its own calls (and
    # replays its own journal).
    stable_id = config.engine.engine_id or f"{socket.gethostname()}:{config.engine.port}"
    if config.history.backend == "postgres":  # the fleet's shared record
        store = CallHistory.postgres(config.history.dsn, data, engine_id=stable_id,
                                     pool_max=config.history.pool_max)
    else:
        store = CallHistory(config.sqlite_history_path(), engine_id=stable_id)
    await store.open()
    recovered = await store.recover_unfinished()
    if recovered:
        log.warning("wiring.recovered_unfinished_calls", calls=len(recovered))
    return store
