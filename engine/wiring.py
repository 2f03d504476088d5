"""Builds an Engine from configuration: which providers, which backends.

The embedded default (in-process bus, SQLite history, local providers) and the scaled
deployment (Redis bus and cache, cloud providers) are the same code with other parts
chosen here. Cloud providers whose API key is not set are skipped, loudly.
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
from engine.providers.fallback import FallbackAgent, FallbackEvent, FallbackSTT, FallbackTTS
from engine.providers.faq.matcher import FaqMatcher
from engine.providers.response_cache import CachingTTS, ResponseCache, make_response_cache
from engine.record.history import CallHistory
from engine.session.call_session import CallSession
from engine.session.conversation import ConversationPipeline, PipelineDeps

log = get_logger(__name__)


class NoProviderError(ValueError):
    """A provider chain in config.toml has nothing usable in it."""


@dataclass
class Providers:
    stt: list[SpeechToText] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    tts: list[TextToSpeech] = field(default_factory=list)


def _skip(kind: str, name: str, why: str) -> None:
    log.warning("wiring.provider_skipped", kind=kind, provider=name, reason=why)


def build_providers(config: Config) -> Providers:
    """Instantiate every provider the chains name (without warming them up)."""
    p = config.providers
    oa, el = p.openai, p.elevenlabs
    oa_key = oa.api_key.get_secret_value()
    out = Providers()
    for name in p.stt:
        if name == "local_whisper":
            from engine.providers.builtin.stt_local_whisper import LocalWhisperSTT

            lw = p.local_whisper
            out.stt.append(LocalWhisperSTT(model=lw.model, device=lw.device,
                                           compute_type=lw.compute_type,
                                           cpu_threads=lw.cpu_threads, workers=lw.workers,
                                           beam_size=lw.beam_size))
        elif name == "openai":
            if not oa_key:
                _skip("stt", name, "OPENAI_API_KEY is not set")
                continue
            from engine.providers.builtin.stt_openai import OpenAITranscriber

            out.stt.append(OpenAITranscriber(oa_key, oa.stt_base_url or oa.base_url,
                                             model=oa.stt_model, timeout_s=p.stt_timeout_s,
                                             max_retries=oa.max_retries,
                                             language=oa.stt_language or None))
        else:
            raise NoProviderError(f"unknown speech-to-text provider {name!r}")
    for name in p.agent:
        if name == "faq":
            from engine.providers.builtin.agent_faq import FaqAgent

            prompt = config.faq.prompt_answer.replace("{business}", config.faq.business_name)
            out.agents.append(FaqAgent(config.faq, prompt_answer=prompt))
        elif name == "openai":
            if not oa_key:
                _skip("agent", name, "OPENAI_API_KEY is not set")
                continue
            from engine.providers.builtin.llm_openai import OpenAIChatAgent

            out.agents.append(OpenAIChatAgent(
                oa_key, oa.base_url, model=oa.llm_model, temperature=oa.llm_temperature,
                max_tokens=oa.llm_max_tokens, timeout_s=oa.timeout_s,
                first_token_timeout_s=p.llm_first_token_timeout_s, max_retries=oa.max_retries,
                summary_instruction=config.policy.summary_instruction))
        else:
            raise NoProviderError(f"unknown agent provider {name!r}")
    for name in p.tts:
        if name == "espeak":
            from engine.providers.builtin.tts_espeak import EspeakTTS

            out.tts.append(EspeakTTS(voice=p.espeak.voice, rate_wpm=p.espeak.rate_wpm))
        elif name == "elevenlabs":
            key = el.api_key.get_secret_value()
            if not key:
                _skip("tts", name, "ELEVENLABS_API_KEY is not set")
                continue
            from engine.providers.builtin.tts_elevenlabs import ElevenLabsTTS

            out.tts.append(ElevenLabsTTS(key, el.voice_id, base_url=el.base_url,
                                         model_id=el.model_id,
                                         optimize_streaming_latency=el.optimize_streaming_latency,
                                         timeout_s=el.timeout_s,
                                         first_audio_timeout_s=p.tts_first_audio_timeout_s))
        elif name == "openai":
            if not oa_key:
                _skip("tts", name, "OPENAI_API_KEY is not set")
                continue
            from engine.providers.builtin.tts_openai import OpenAITTS

            out.tts.append(OpenAITTS(oa_key, oa.tts_base_url or oa.base_url,
                                     model=oa.tts_model, voice=oa.tts_voice,
                                     timeout_s=oa.timeout_s,
                                     first_audio_timeout_s=p.tts_first_audio_timeout_s,
                                     max_retries=oa.max_retries,
                                     instructions=oa.tts_instructions or None))
        else:
            raise NoProviderError(f"unknown text-to-speech provider {name!r}")
    for kind, chain in (("stt", out.stt), ("agent", out.agents), ("tts", out.tts)):
        if not chain:
            raise NoProviderError(f"providers.{kind}: no usable provider (check the chain "
                                  "and the API keys in the environment)")
    return out


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
    for stt in providers.stt:
        load = getattr(stt, "load", None)
        if load is not None:
            await load()  # load speech models before the first call, not during it
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
