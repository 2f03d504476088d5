"""ElevenLabsTTS and OpenAITTS through the real SDKs against the local stand-ins."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal

import numpy as np
import pytest
from structlog.testing import capture_logs

from engine.audio.codec import ulaw_to_int16
from engine.audio.resample import resample
from engine.config import Config, PricesConfig
from engine.money.prices import PriceTable
from engine.providers.base import AudioChunk, ProviderError, SynthesisDone, TextToSpeech
from engine.providers.builtin.tts_elevenlabs import STREAM_CHUNK_BYTES, ElevenLabsTTS
from engine.providers.builtin.tts_openai import OpenAITTS, Pcm24kToUlaw
from engine.providers.registry import registry
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.server import StandinServer
from tests.cloud_fixtures import (
    ELEVENLABS_KEY,
    OPENAI_KEY,
    Stopwatch,
    closed_port_url,
    collect,
    correlation,
)

TEXT = "Your order has shipped and should arrive on Thursday."
VOICE = "voice-123"


def make_elevenlabs(base_url: str, timeout_s: float = 5.0,
                    first_audio_timeout_s: float = 3.0) -> ElevenLabsTTS:
    return ElevenLabsTTS(api_key=ELEVENLABS_KEY, voice_id=VOICE, base_url=base_url,
                         model_id="eleven_flash_v2_5", optimize_streaming_latency=3,
                         timeout_s=timeout_s, first_audio_timeout_s=first_audio_timeout_s)


def make_openai(base_url: str, timeout_s: float = 5.0,
                first_audio_timeout_s: float = 3.0) -> OpenAITTS:
    return OpenAITTS(api_key=OPENAI_KEY, base_url=base_url, model="gpt-4o-mini-tts",
                     voice="alloy", timeout_s=timeout_s,
                     first_audio_timeout_s=first_audio_timeout_s)


def audio_of(events: list[AudioChunk | SynthesisDone]) -> bytes:
    return b"".join(e.ulaw for e in events if isinstance(e, AudioChunk))


# --- ElevenLabs -----------------------------------------------------------------------


async def test_elevenlabs_request_and_audio_pass_through() -> None:
    async with ElevenLabsStandin() as server:
        server.latency_s = 0.1
        server.token_interval_s = 0.005
        tts = make_elevenlabs(server.base_url)
        assert isinstance(tts, TextToSpeech) and tts.voice == VOICE
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == f"/v1/text-to-speech/{VOICE}/stream"
    assert request.query["output_format"] == "ulaw_8000"
    assert request.query["optimize_streaming_latency"] == "3"
    assert request.headers["xi-api-key"] == ELEVENLABS_KEY
    assert request.json["text"] == TEXT and request.json["model_id"] == "eleven_flash_v2_5"

    assert len(server.last_audio_sent) > 0
    assert audio_of(events) == server.last_audio_sent  # mu-law passes through untouched
    done = events[-1]
    assert isinstance(done, SynthesisDone)
    assert done.usage.characters == len(TEXT)
    assert (done.usage.provider, done.usage.kind, done.usage.model) == \
        ("elevenlabs", "tts", "eleven_flash_v2_5")
    assert done.timing.first_byte_s is not None
    assert 0.1 <= done.timing.first_byte_s <= done.timing.total_s


@pytest.mark.parametrize(("mode", "status", "retryable"),
                         [("401", 401, False), ("422", 422, False), ("429", 429, True),
                          ("500", 500, True)])
async def test_elevenlabs_http_errors(mode: str, status: int, retryable: bool) -> None:
    async with ElevenLabsStandin() as server:
        server.mode = mode  # type: ignore[assignment]
        tts = make_elevenlabs(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize(TEXT))
        await tts.aclose()
    assert info.value.status == status and info.value.retryable is retryable
    assert info.value.provider == "elevenlabs"
    assert len(server.requests) == 1


async def test_elevenlabs_wrong_key_message_comes_from_the_body() -> None:
    async with ElevenLabsStandin(api_key="xi-other") as server:
        tts = make_elevenlabs(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize(TEXT))
        await tts.aclose()
    assert info.value.status == 401 and "Invalid API key" in str(info.value)


async def test_elevenlabs_cut_stream_keeps_audio_received() -> None:
    async with ElevenLabsStandin() as server:
        server.mode = "cut"
        tts = make_elevenlabs(server.base_url)
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()
    received = audio_of(events)
    sent = server.last_audio_sent
    # What arrived is what was sent, less at most the SDK's last partial chunk.
    assert len(received) > 0 and sent.startswith(received)
    assert len(sent) - len(received) < STREAM_CHUNK_BYTES
    assert len(received) < len(TEXT) * server.seconds_per_char * 8000  # it was cut
    assert isinstance(events[-1], SynthesisDone)


async def test_elevenlabs_early_close_stops_the_server_stream() -> None:
    async with ElevenLabsStandin() as server:
        server.token_interval_s = 0.1
        tts = make_elevenlabs(server.base_url)
        stream = tts.synthesize(TEXT * 3)
        first = await anext(stream)
        await stream.aclose()  # barge-in
        assert await server.wait_disconnect(within_s=2.0)
        await tts.aclose()
    assert isinstance(first, AudioChunk)
    assert server.requests[0].disconnected


async def test_elevenlabs_connection_refused() -> None:
    tts = make_elevenlabs(closed_port_url())
    with pytest.raises(ProviderError) as info:
        await collect(tts.synthesize(TEXT))
    await tts.aclose()
    assert info.value.retryable and info.value.status is None


async def test_empty_text_is_rejected_without_a_request() -> None:
    async with ElevenLabsStandin() as el_server, OpenAIStandin() as oa_server:
        for tts in (make_elevenlabs(el_server.base_url), make_openai(oa_server.base_url)):
            with pytest.raises(ProviderError) as info:
                await collect(tts.synthesize("  "))
            assert not info.value.retryable
            await tts.aclose()
    assert el_server.requests == [] and oa_server.requests == []


# --- both voices: one first-audio deadline -----------------------------------------------

VOICES = [pytest.param(ElevenLabsStandin, make_elevenlabs, id="elevenlabs"),
          pytest.param(OpenAIStandin, make_openai, id="openai")]


@pytest.mark.parametrize(("standin", "make"), VOICES)
async def test_a_voice_request_timeout_is_bounded(
        standin: type[StandinServer], make: Callable[..., TextToSpeech]) -> None:
    async with standin() as server:
        server.mode = "timeout"
        tts = make(server.base_url, timeout_s=0.5, first_audio_timeout_s=10.0)
        watch = Stopwatch()
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize(TEXT))
        elapsed = watch.elapsed
        await tts.aclose()
    assert elapsed < 2 * 0.5
    assert info.value.retryable and "timed out" in str(info.value)


@pytest.mark.parametrize(("standin", "make"), VOICES)
async def test_a_voice_first_audio_timeout_is_bounded_and_reported_alike(
        standin: type[StandinServer], make: Callable[..., TextToSpeech]) -> None:
    async with standin() as server:
        server.latency_s = 3.0
        tts = make(server.base_url, timeout_s=10.0, first_audio_timeout_s=0.3)
        watch = Stopwatch()
        with capture_logs() as logs, pytest.raises(ProviderError) as info:
            await collect(tts.synthesize(TEXT))
        elapsed = watch.elapsed
        await tts.aclose()
    assert elapsed < 2 * 0.3
    assert info.value.retryable and "no audio" in str(info.value)
    assert str(info.value) == f"{tts.name}: timed out: no audio within 0.30s"
    # One log line, the same for every voice (engine.providers.first_byte).
    assert [entry for entry in logs if entry["event"] == "provider.first_byte_timeout"] == [
        {"event": "provider.first_byte_timeout", "log_level": "warning",
         "provider": tts.name, "kind": "tts", "model": tts.model, "timeout_s": 0.3}]


# --- OpenAI TTS ---------------------------------------------------------------------


async def test_openai_tts_request_and_ulaw_duration() -> None:
    async with OpenAIStandin() as server:
        server.audio_chunk_bytes = 4801  # odd: samples straddle network chunks
        server.latency_s = 0.05
        tts = make_openai(server.base_url)
        assert isinstance(tts, TextToSpeech) and tts.voice == "alloy"
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()

    [request] = server.requests
    assert request.path == "/v1/audio/speech"
    assert request.json == {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": TEXT,
                            "response_format": "pcm"}
    source = np.frombuffer(server.last_audio_sent, dtype="<i2")
    ulaw = audio_of(events)
    assert len(ulaw) == pytest.approx(source.size / 3, abs=8)  # 24 kHz -> 8 kHz
    # The content survives: it matches a whole-buffer resample of what the server sent.
    reference = resample(source.astype(np.int16), 24000, 8000)
    assert correlation(ulaw_to_int16(ulaw), reference) > 0.95
    done = events[-1]
    assert isinstance(done, SynthesisDone)
    assert done.usage.characters == len(TEXT) and done.usage.model == "gpt-4o-mini-tts"
    assert done.usage.provider == "openai" and done.usage.kind == "tts"
    assert done.timing.first_byte_s is not None and done.timing.first_byte_s >= 0.05


def test_converter_is_independent_of_chunk_boundaries() -> None:
    pcm = (np.sin(np.arange(24000) * 2 * np.pi * 300 / 24000) * 8000).astype("<i2").tobytes()
    whole = Pcm24kToUlaw()
    expected = whole.feed(pcm) + whole.flush()
    split = Pcm24kToUlaw()
    pieces = [split.feed(pcm[i:i + 777]) for i in range(0, len(pcm), 777)]
    assert b"".join(pieces) + split.flush() == expected


@pytest.mark.parametrize(("mode", "status", "retryable"),
                         [("401", 401, False), ("429", 429, True), ("500", 500, True)])
async def test_openai_tts_http_errors(mode: str, status: int, retryable: bool) -> None:
    async with OpenAIStandin() as server:
        server.mode = mode  # type: ignore[assignment]
        tts = make_openai(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize(TEXT))
        await tts.aclose()
    assert info.value.status == status and info.value.retryable is retryable


async def test_openai_tts_early_close_stops_the_server_stream() -> None:
    async with OpenAIStandin() as server:
        server.token_interval_s = 0.1
        tts = make_openai(server.base_url)
        stream = tts.synthesize(TEXT * 3)
        first = await anext(stream)
        await stream.aclose()
        assert await server.wait_disconnect(within_s=2.0)
        await tts.aclose()
    assert isinstance(first, AudioChunk)
    assert server.requests[0].disconnected


async def test_openai_tts_cut_stream_keeps_audio_received() -> None:
    async with OpenAIStandin() as server:
        server.mode = "cut"
        tts = make_openai(server.base_url)
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()
    sent_samples = len(server.last_audio_sent) // 2
    assert sent_samples > 0
    assert len(audio_of(events)) == pytest.approx(sent_samples / 3, abs=8)
    assert isinstance(events[-1], SynthesisDone)


# --- what the OpenAI voice is billed for --------------------------------------------


def expected_tokens(text: str, pcm_bytes: int, per_minute: float) -> tuple[int, int]:
    """Text tokens at four characters each; audio tokens for 24 kHz PCM16 at the rate."""
    return math.ceil(len(text) / 4), math.ceil(pcm_bytes / (24000 * 2 * 60) * per_minute)


async def test_openai_tts_reports_estimated_tokens_priced_per_token() -> None:
    async with OpenAIStandin() as server:
        tts = make_openai(server.base_url)
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()
    done = events[-1]
    assert isinstance(done, SynthesisDone)
    text_tokens, audio_tokens = expected_tokens(TEXT, len(server.last_audio_sent), 1250.0)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (text_tokens, audio_tokens)
    assert done.usage.estimated and done.usage.characters == len(TEXT)
    assert audio_tokens > 0 and text_tokens == 14
    # gpt-4o-mini-tts in the shipped catalog: $0.60 per 1M text in, $12 per 1M audio out.
    table = PriceTable(PricesConfig())
    expected = (Decimal(text_tokens) * Decimal("0.60")
                + Decimal(audio_tokens) * Decimal("12.00")) / 1_000_000
    assert table.cost_decimal(done.usage) == (expected, True)
    assert [(line.unit, line.estimated) for line in table.cost_lines(done.usage)] == [
        ("1M text input tokens", True), ("1M audio output tokens", True)]


async def test_openai_tts_token_rate_is_configured_and_a_cut_stream_counts_what_came() -> None:
    config = Config.model_validate({"providers": {"openai": {
        "api_key": OPENAI_KEY, "tts_audio_tokens_per_minute": 600}}})
    spec = registry.spec("tts", "openai")
    async with OpenAIStandin() as server:
        server.mode = "cut"
        settings = config.providers.settings("openai", spec.settings)
        tts = spec.build(settings.model_copy(update={"base_url": server.base_url}), config)
        assert isinstance(tts, OpenAITTS)
        events = await collect(tts.synthesize(TEXT))
        await tts.aclose()
    done = events[-1]
    assert isinstance(done, SynthesisDone)
    sent = len(server.last_audio_sent)
    assert 0 < sent < len(TEXT) * server.speech_seconds_per_char * 48000  # cut halfway
    assert done.usage.output_tokens == expected_tokens(TEXT, sent, 600.0)[1]


async def test_a_voice_billed_per_token_estimates_tokens_for_a_request_that_never_reported(
) -> None:
    # A cut or abandoned sentence: the chain books the provider's own estimate, which must
    # be in the model's unit (tokens), or the catalog could not price it.
    async with OpenAIStandin() as server:
        tts = make_openai(server.base_url)
        usage = tts.estimate_usage(TEXT)
        await tts.aclose()
    assert usage.estimated and usage.input_tokens == math.ceil(len(TEXT) / 4)
    seconds = len(TEXT) / 15.0
    assert usage.output_tokens == math.ceil(seconds / 60 * 1250.0)
    cost, priced = PriceTable(PricesConfig()).cost_decimal(usage)
    assert priced and cost > 0
