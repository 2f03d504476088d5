"""Builds an Engine from configuration: which providers, which backends.

The embedded default (in-process bus, SQLite history, local providers) and the scaled
deployment (Redis bus and cache, cloud providers) are the same code with other parts
chosen here. The chains name providers; the registry (engine.providers.registry) says
how to build each. A provider that cannot run here (a cloud provider without its API
key) is skipped, loudly.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from engine.app import Engine
from engine.config import Config
from engine.hub import OpsHub
from engine.log import get_logger
from engine.providers.base import Agent, SpeechToText, TextToSpeech
from engine.providers.caching_tts import CachingTTS
from engine.providers.chain import FallbackEvent
from engine.providers.fallback import FallbackAgent, FallbackSTT, FallbackTTS
from engine.providers.faq.matcher import FaqMatcher
from engine.providers.registry import Kind, ProviderUnavailable, registry
from engine.providers.response_cache import ResponseCache, make_response_cache
from engine.record.history import CallHistory
from engine.session.call_session import CallSession
from engine.session.conversation import ConversationPipeline, PipelineDeps

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


def build_providers(config: Config) -> Providers:
    """Instantiate every provider the chains name (without warming them up)."""
    registry.discover(config.providers.packages)
    out = Providers(stt=_build_chain(config, "stt"), agents=_build_chain(config, "agent"),
                    tts=_build_chain(config, "tts"))
    for kind, chain in (("stt", out.stt), ("agent", out.agents), ("tts", out.tts)):
        if not chain:
            raise NoProviderError(f"providers.{kind}: no usable provider (check the chain "
                                  "and the API keys in the environment)")
    return out


def _build_chain(config: Config, kind: Kind) -> list[Any]:
    """The providers of one chain, in order; those that cannot run here are skipped."""
    protocol = _PROTOCOLS[kind]
    chain: list[Any] = []
    for name in config.providers.chains()[kind]:
        spec = registry.spec(kind, name)
        try:
            provider = spec.build(config.providers.settings(name, spec.settings), config)
        except ProviderUnavailable as exc:
            log.warning("wiring.provider_skipped", kind=kind, provider=name, reason=exc.reason)
            continue
        if not isinstance(provider, protocol):  # a plug-in's mistake, caught at start-up
            raise TypeError(f"providers.{kind}: {name!r} built a {type(provider).__name__}, "
                            f"which is not a {protocol.__name__}")
        chain.append(provider)
    return chain


def build_deps(config: Config, providers: Providers, cache: ResponseCache,
               hub: OpsHub) -> PipelineDeps:
    p = config.providers

    def on_fallback(event: FallbackEvent) -> None:
        hub.provider_switched(event.kind, event.from_provider, event.to_provider, event.error)

    breaker = {"breaker_failures": p.breaker_failures, "breaker_reset_s": p.breaker_reset_s,
               "on_event": on_fallback}
    stt = FallbackSTT(providers.stt, timeout_s=p.stt_timeout_s, **breaker)  # type: ignore[arg-type]
    agent = FallbackAgent(providers.agents, first_token_timeout_s=p.llm_first_token_timeout_s,
                          summarize_timeout_s=p.llm_summarize_timeout_s,
                          **breaker)  # type: ignore[arg-type]
    # Each voice is cached under the provider that produced it (not the chain).
    tts = FallbackTTS([CachingTTS(t, cache) for t in providers.tts],
                      first_audio_timeout_s=p.tts_first_audio_timeout_s,
                      **breaker)  # type: ignore[arg-type]
    matcher = FaqMatcher(config.faq.entries, config.faq.match_threshold) \
        if config.faq.entries else None
    return PipelineDeps(config=config, stt=stt, agent=agent, tts=tts, cache=cache,
                        matcher=matcher)


async def build_engine(config: Config, *, history: bool = True,
                       providers: Providers | None = None,
                       supervisor_api: bool = True) -> Engine:
    """The engine the configuration describes; models are loaded and warmed here.

    Providers passed in belong to the caller (e.g. shared by several engines in tests)
    and are not closed with this engine.
    """
    own_providers = providers is None
    store: CallHistory | None = None
    if history:
        data = config.data_path()
        data.mkdir(parents=True, exist_ok=True)
        # A stable id across restarts, so a restarted engine recovers its own calls.
        stable_id = f"{socket.gethostname()}:{config.engine.port}"
        store = CallHistory(data / "history.sqlite3", engine_id=stable_id)
        await store.open()
        recovered = await store.recover_unfinished()
        if recovered:
            log.warning("wiring.recovered_unfinished_calls", calls=len(recovered))
    hub = OpsHub.from_config(config, store)
    if store is not None:
        from datetime import UTC, datetime, timedelta

        since = (datetime.now(UTC) - timedelta(days=40)).date()
        hub.ledger.restore_day_totals(await store.daily_costs(since))
    providers = providers or build_providers(config)
    for provider in providers.all():
        await provider.warm_up()  # load models before the first call, not during it
    cache = make_response_cache(config)
    deps = build_deps(config, providers, cache, hub)

    def pipeline(session: CallSession) -> ConversationPipeline:
        return ConversationPipeline(session, deps,
                                    cost_so_far=lambda: hub.cost_of(session.call_sid))

    engine = Engine(config, tts=deps.tts, conversation_factory=pipeline, hub=hub)

    async def close_all() -> None:
        closers: list[Any] = [cache, hub.bus]
        if own_providers:
            closers += [deps.stt, deps.agent, deps.tts]
        for item in closers:
            try:
                await item.aclose()
            except Exception:
                log.exception("wiring.close_failed", part=type(item).__name__)
        if store is not None:
            await store.aclose()

    engine.on_stopping.append(close_all)
    engine.deps = deps
    if supervisor_api:
        from engine.supervision.server import SupervisorApi

        api = SupervisorApi(config, hub)  # reads or creates the console token now
        engine.supervisor_api = api
        engine.on_started.append(api.start)
        engine.on_stopping.insert(0, api.stop)
    return engine
