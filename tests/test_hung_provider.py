"""A provider that accepts the connection and never answers (the stand-ins' "timeout" mode)
through the real SDKs and the engine's own wiring of the chains, at the default deadlines:
each early turn falls back within the deadline, the hung provider's breaker opens as a
refusing one's does, the chain then skips it without asking it, and the half-open trial
after `breaker_reset_s` brings it back once it answers again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.app import Engine
from engine.config import Config
from engine.hub import OpsHub
from engine.providers.base import (
    AgentDone,
    AgentEvent,
    AudioChunk,
    ChatMessage,
    ProviderHealth,
    SynthesisDone,
    SynthesisEvent,
    TextDelta,
    Timing,
    Transcript,
    TranscriptConfidence,
    Usage,
)
from engine.providers.registry import Kind, registry
from engine.providers.response_cache import make_response_cache
from engine.session.conversation import PipelineDeps
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.server import StandinServer
from engine.wiring import Providers, build_deps, build_engine
from tests.cloud_fixtures import ELEVENLABS_KEY, OPENAI_KEY, speech_pcm16
from tests.harness import base_sections, running_engine

BREAKER_RESET_S = 2.0
# What the fallback, the SDK and a loaded test machine may add to a deadline.
MARGIN_S = 0.5
# A skipped provider costs nothing: the fallback answers at once.
SKIP_S = 0.3
RATE = 16000
PCM = speech_pcm16(1.0, RATE)
MESSAGES = [ChatMessage("user", "When do you open on Saturday?")]
NO_TIMING = Timing(first_byte_s=0.0, total_s=0.0)


# --- fallbacks that answer at once -------------------------------------------------------


class _Instant:
    name = "instant"
    model = "instant-1"
    voice = "instant-voice"
    runs_locally = True

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class InstantSTT(_Instant):
    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        return Transcript("hello", TranscriptConfidence(),
                          Usage(self.name, "stt", self.model), NO_TIMING)


class InstantAgent(_Instant):
    async def respond(self, messages: list[ChatMessage]) -> AsyncGenerator[AgentEvent, None]:
        yield TextDelta("We open at nine.")
        yield AgentDone(Usage(self.name, "llm", self.model), NO_TIMING)

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        return "summary", Usage(self.name, "llm", self.model)


class InstantVoice(_Instant):
    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        yield AudioChunk(b"\xff" * 160)
        yield SynthesisDone(Usage(self.name, "tts", self.model), NO_TIMING)

    def estimate_usage(self, text: str) -> Usage:
        return Usage(self.name, "tts", self.model, characters=len(text), estimated=True)


# --- one turn through a chain --------------------------------------------------------------


@dataclass
class Hung:
    """A chain whose first provider is a cloud one behind `server`."""

    kind: Kind
    deps: PipelineDeps
    server: StandinServer
    cloud: str  # the cloud provider's name

    @property
    def _chain(self) -> Any:
        return {"stt": self.deps.stt, "agent": self.deps.agent, "tts": self.deps.tts}[self.kind]

    def health(self) -> ProviderHealth:
        """The cloud provider's breaker."""
        health: ProviderHealth = self._chain.health()[0]
        return health

    def active(self) -> str | None:
        """The provider that served last."""
        active: str | None = self._chain.active_provider
        return active

    def abandoned(self) -> int:
        """Requests the chain gave up on, still read on in the background."""
        abandoned: int = self._chain.abandoned
        return abandoned

    def requests(self) -> int:
        """Requests that reached the cloud provider's stand-in."""
        return len(self.server.requests)

    async def turn(self) -> float:
        """Seconds to the first output the caller would get (then reads the rest)."""
        started = time.monotonic()
        if self.kind == "stt":
            await self.deps.stt.transcribe(PCM, RATE)
            return time.monotonic() - started
        first: float | None = None
        stream: AsyncGenerator[Any, None] = (
            self.deps.agent.respond(MESSAGES) if self.kind == "agent"
            else self.deps.tts.synthesize("We open at nine."))
        async with aclosing(stream) as events:
            async for event in events:
                if first is None and isinstance(event, TextDelta | AudioChunk):
                    first = time.monotonic() - started
        assert first is not None
        return first


@asynccontextmanager
async def hung(kind: Kind) -> AsyncIterator[Hung]:
    """The engine's chains (engine.wiring.build_deps) at the default deadlines, the `kind`
    chain led by its cloud provider through its SDK against a stand-in that hangs."""
    server: StandinServer = ElevenLabsStandin() if kind == "tts" else OpenAIStandin()
    base_url = await server.start()
    cloud = "elevenlabs" if kind == "tts" else "openai"
    config = Config.model_validate({
        "providers": {"breaker_reset_s": BREAKER_RESET_S, "drain_timeout_s": 2.0,
                      "openai": {"api_key": OPENAI_KEY, "base_url": base_url},
                      "elevenlabs": {"api_key": ELEVENLABS_KEY, "base_url": base_url}},
        "cache": {"backend": "off"}})
    spec = registry.spec(kind, cloud)
    provider = spec.build(config.providers.settings(cloud, spec.settings), config)
    providers = Providers(stt=[InstantSTT()], agents=[InstantAgent()], tts=[InstantVoice()])
    providers.chain(kind).insert(0, provider)
    hub = OpsHub.from_config(config)
    deps = build_deps(config, providers, make_response_cache(config), hub)
    server.mode = "timeout"
    try:
        yield Hung(kind, deps, server, cloud)
    finally:
        await server.stop()  # the hung requests end, refused, and the drains let go
        for chain in (deps.stt, deps.agent, deps.tts):
            await chain.aclose()
        await hub.bus.aclose()


# --- the tests ---------------------------------------------------------------------------


def test_the_default_deadlines_sit_well_below_a_callers_patience() -> None:
    providers = Config().providers
    assert providers.llm_first_token_timeout_s == 1.5
    assert providers.tts_first_audio_timeout_s == 1.0
    assert providers.stt_timeout_s == 3.0
    assert providers.breaker_failures == 3
    # A provider's own deadline outlasts the chain's by the drain: the chain gives up
    # first, and the request it abandoned is read on for its usage.
    assert providers.request_deadline_s("tts") == 1.0 + providers.drain_timeout_s
    with pytest.raises(ValueError, match="greater than 0"):
        Config.model_validate({"providers": {"tts_first_audio_timeout_s": 0}})


@pytest.mark.parametrize(("kind", "deadline_s"),
                         [("tts", 1.0), ("agent", 1.5), ("stt", 3.0)])
async def test_a_hung_provider_is_cut_off_then_skipped_until_it_recovers(
        kind: Kind, deadline_s: float) -> None:
    async with hung(kind) as chain:
        failures = Config().providers.breaker_failures
        # Until its breaker opens, each turn waits one deadline, then the fallback serves.
        for turn in range(1, failures + 1):
            waited = await chain.turn()
            assert deadline_s - 0.05 <= waited < deadline_s + MARGIN_S, (turn, waited)
            assert chain.active() == "instant" and chain.requests() == turn
        # Counted as failures although the requests were not closed: the last one is still
        # read on for its usage.
        assert chain.abandoned() >= 1
        health = chain.health()
        assert not health.healthy and health.extra["state"] == "open"
        assert health.consecutive_failures == failures
        assert health.last_error == f"no output within {deadline_s:g}s"

        # Open: skipped at once, the hung provider is not even asked.
        for _ in range(3):
            assert await chain.turn() < SKIP_S
        assert chain.requests() == failures

        # Recovered: the half-open trial after breaker_reset_s reaches it, it serves, and
        # its breaker closes.
        chain.server.mode = "ok"
        await asyncio.sleep(BREAKER_RESET_S)
        assert await chain.turn() < deadline_s
        assert chain.active() == chain.cloud and chain.requests() == failures + 1
        assert chain.health().healthy
        assert await chain.turn() < deadline_s and chain.requests() == failures + 2


async def test_a_trial_that_hangs_again_reopens_the_breaker_at_the_deadline() -> None:
    async with hung("tts") as chain:
        for _ in range(Config().providers.breaker_failures):
            await chain.turn()
        await asyncio.sleep(BREAKER_RESET_S)
        # Half-open: one trial reaches the provider, which still hangs.
        waited = await chain.turn()
        assert 1.0 - 0.05 <= waited < 1.0 + MARGIN_S
        assert chain.requests() == 4 and chain.health().extra["state"] == "open"
        assert await chain.turn() < SKIP_S and chain.requests() == 4


# --- a call whose voice hangs ------------------------------------------------------------

QUESTION = "What are your opening hours?"


@pytest.mark.slow
async def test_a_caller_hears_the_fallback_voice_within_the_deadline_then_without_a_wait(
        tmp_path: Path) -> None:
    # The greeting and the first two answers (each one input stream: the answer's text
    # goes to the voice as it is written) wait out the first-audio deadline and are
    # spoken by espeak; then the breaker is open and the later answers come without that
    # wait, ElevenLabs never asked again.
    openai, eleven = OpenAIStandin(), ElevenLabsStandin()
    oa_url, el_url = await openai.start(), await eleven.start()
    openai.transcript = QUESTION
    eleven.mode = "timeout"
    sections = base_sections()
    sections["providers"] = {
        "stt": ["openai"], "agent": ["faq"], "tts": ["elevenlabs", "espeak"],
        "drain_timeout_s": 2.0,
        "openai": {"api_key": OPENAI_KEY, "base_url": oa_url},
        "elevenlabs": {"api_key": ELEVENLABS_KEY, "base_url": el_url}}
    sections["cache"] = {"backend": "off"}
    try:
        async with running_engine(tmp_path, make_engine=_engine, **sections) as run:
            deadline_s = run.config.providers.tts_first_audio_timeout_s
            endpointing_s = run.config.turns.endpoint_silence_ms / 1000
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario(
                name="hung voice", steps=[Step(say=QUESTION) for _ in range(4)])), 120)
            asked = len(eleven.requests)
    finally:
        await eleven.stop()
        await openai.stop()
    assert result.error is None and len(result.lines) == 4
    greeting_s = result.arrivals[0] - result.started_at
    assert greeting_s < deadline_s + 1.5, greeting_s
    latencies = [line.reply_latency_s for line in result.lines]
    assert None not in latencies
    waited = [s for s in latencies[:2] if s is not None]
    later = [s for s in latencies[2:] if s is not None]
    # The first answers waited out the deadline (the caller's own trailing silence counts
    # towards the endpointing, so the latencies are compared, not bounded from below).
    assert min(waited) > max(later) + deadline_s / 2, latencies
    # The later ones did not: less than the endpointing plus one deadline.
    assert all(s < endpointing_s + deadline_s for s in later), latencies
    assert asked == Config().providers.breaker_failures


async def _engine(config: Config) -> Engine:
    return await build_engine(config, history=False, supervisor_api=False)
