"""OpenAIRealtimeTranscriber through the real `openai` SDK (its realtime WebSocket client)
against the OpenAI stand-in's realtime transcription endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from engine.audio.codec import pcm16_to_ulaw
from engine.config import Config, load_config
from engine.money.prices import PriceTable
from engine.providers.base import ProviderError, SpeechStream, StreamingSpeechToText
from engine.providers.builtin.stt_openai_realtime import OpenAIRealtimeTranscriber
from engine.providers.registry import registry
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_realtime import RealtimeConnection
from tests.cloud_fixtures import OPENAI_KEY, Stopwatch, speech_pcm16

ROOT = Path(__file__).resolve().parent.parent
RATE = 8000
FRAME = RATE * 2 // 50  # 20 ms of PCM16
AUDIO_S = 1.2
AUDIO = speech_pcm16(AUDIO_S, RATE)
LATENCY_S = 0.15
MARGIN_S = 0.1  # what the client and the loop may add to the stand-in's latency


def make_stt(base_url: str, **options: object) -> OpenAIRealtimeTranscriber:
    return OpenAIRealtimeTranscriber(OPENAI_KEY, base_url, **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def standin(latency_s: float = LATENCY_S) -> AsyncIterator[OpenAIStandin]:
    async with OpenAIStandin() as server:
        server.latency_s = latency_s
        yield server


async def speak(stream: SpeechStream, pcm: bytes = AUDIO, realtime: bool = False) -> None:
    """Push `pcm` in 20 ms frames (paced like a caller when `realtime`)."""
    for offset in range(0, len(pcm), FRAME):
        stream.push(pcm[offset:offset + FRAME])
        await asyncio.sleep(0.02 if realtime else 0)


def used(server: OpenAIStandin) -> RealtimeConnection:
    """The one connection that carried turns."""
    [connection] = [c for c in server.realtime.connections if c.commits]
    return connection


def own_tasks() -> list[str]:
    """Tasks still running code of the realtime provider."""
    names = ("RealtimeStream", "RealtimeConnection", "SessionPool")
    return [repr(t) for t in asyncio.all_tasks()
            if any(n in repr(t.get_coro()) for n in names)]


async def test_a_streamed_utterance_is_transcribed_within_the_latency() -> None:
    async with standin() as server:
        stt = make_stt(server.base_url)
        assert isinstance(stt, StreamingSpeechToText)
        await stt.warm_up()
        assert stt.idle_sessions == 2
        stream = stt.open_stream(RATE)
        await speak(stream, realtime=True)
        clock = Stopwatch()
        transcript = await stream.finish()
        waited = clock.elapsed
        await stream.aclose()
        await stt.aclose()

    assert transcript.text == "I would like to check my order."
    assert LATENCY_S <= waited <= LATENCY_S + MARGIN_S
    assert transcript.timing.first_byte_s is not None
    assert LATENCY_S <= transcript.timing.first_byte_s <= waited
    assert transcript.confidence.token_logprob_mean is None  # no logprobs for this model
    upgrade = server.requests[0]
    assert (upgrade.path, upgrade.query) == ("/v1/realtime", {"intent": "transcription"})
    assert upgrade.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    connection = used(server)
    update = connection.events[0]
    assert update["type"] == "session.update"
    assert update["session"] == {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-live-transcribe"},
        "turn_detection": None}}}
    # Sent while spoken, in ~100 ms appends; the commit holds the caller's audio as is.
    appends = [e for e in connection.events if e["type"] == "input_audio_buffer.append"]
    assert len(appends) >= AUDIO_S / 0.1 - 1
    assert connection.commits == [pcm16_to_ulaw(AUDIO)]


async def test_pcm24_resamples_to_24_khz() -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url, audio_format="pcm24", language="en")
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    update = used(server).events[0]["session"]["audio"]["input"]
    assert update["format"] == {"type": "audio/pcm", "rate": 24000}
    assert update["transcription"]["language"] == "en"
    [audio] = used(server).commits
    assert abs(len(audio) / 2 - 3 * len(AUDIO) / 2) <= 48  # 3x the samples, give or take
    tone = np.frombuffer(audio, dtype="<i2").astype(np.float64)
    assert np.sqrt(np.mean(tone ** 2)) > 1000  # speech, not silence
    assert transcript.usage.audio_seconds == pytest.approx(AUDIO_S, abs=0.01)


async def test_one_session_serves_many_utterances() -> None:
    async with standin(0.02) as server:
        server.transcript = lambda seconds: f"{seconds:.1f} seconds of speech"
        stt = make_stt(server.base_url, pool_size=1)
        await stt.warm_up()
        texts = []
        for n in range(1, 6):
            stream = stt.open_stream(RATE)
            await speak(stream, speech_pcm16(0.2 * n, RATE))
            texts.append((await stream.finish()).text)
            await stream.aclose()
        await stt.aclose()
    assert texts == [f"{0.2 * n:.1f} seconds of speech" for n in range(1, 6)]
    [connection] = server.realtime.connections  # reused, never replaced
    assert len(connection.commits) == 5
    assert [len(c) for c in connection.commits] == [  # one mu-law byte per sample
        len(speech_pcm16(0.2 * n, RATE)) // 2 for n in range(1, 6)]


async def test_usage_is_the_vendors_and_priced_from_the_catalog() -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url)
        stream = stt.open_stream(RATE)
        await speak(stream)
        transcript = await stream.finish()
        await stt.aclose()
    usage = transcript.usage
    assert (usage.provider, usage.kind, usage.model) == ("openai_realtime", "stt",
                                                         "gpt-live-transcribe")
    assert not usage.estimated
    assert server.realtime.bill() == [usage]  # what the vendor bills, exactly
    table = PriceTable(load_config(ROOT / "config.toml", env={}).prices)
    cost, priced = table.cost_decimal(usage)
    assert priced and cost == Decimal(repr(AUDIO_S)) / 60 * Decimal("0.017")


async def test_token_billed_models_ask_for_and_report_logprobs() -> None:
    async with standin(0.0) as server:
        server.token_logprob = -0.4
        stt = make_stt(server.base_url, model="gpt-4o-mini-transcribe")
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    include = used(server).events[0]["session"]["include"]
    assert include == ["item.input_audio_transcription.logprobs"]
    assert transcript.confidence.token_logprob_mean == pytest.approx(-0.4)
    [billed] = server.realtime.bill()
    assert (transcript.usage.input_tokens, transcript.usage.output_tokens) == \
        (billed.input_tokens, billed.output_tokens) == (12, 8)


@pytest.mark.parametrize("key, mode", [(OPENAI_KEY, "401"), ("sk-wrong", "ok")])
async def test_a_refused_key_is_a_final_error(key: str, mode: str) -> None:
    async with standin() as server:
        server.mode = mode  # type: ignore[assignment]
        stt = OpenAIRealtimeTranscriber(key, server.base_url)
        await stt.warm_up()  # logged, never raised: the engine still starts
        assert stt.idle_sessions == 0
        stream = stt.open_stream(RATE)
        await speak(stream)
        clock = Stopwatch()
        with pytest.raises(ProviderError) as caught:
            await stream.finish()
        assert clock.elapsed < 0.1  # known before the turn ended: no wait at all
        await stt.aclose()
    assert caught.value.status == 401 and not caught.value.retryable
    assert "Incorrect API key" in str(caught.value)


@pytest.mark.parametrize("mode, retryable", [("500", True), ("422", True)])
async def test_an_error_event_fails_the_stream_and_retires_its_session(
        mode: str, retryable: bool) -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url, pool_size=1)
        await stt.warm_up()
        server.mode = mode  # type: ignore[assignment]
        stream = stt.open_stream(RATE)
        await speak(stream)
        with pytest.raises(ProviderError) as caught:
            await stream.finish()
        server.mode = "ok"
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    assert caught.value.retryable is retryable
    assert transcript.text == "I would like to check my order."
    assert len(server.realtime.connections) >= 2  # the failed session was not reused
    assert server.realtime.connections[0].closed


async def test_a_socket_dropped_mid_utterance_fails_at_once() -> None:
    async with standin() as server:
        stt = make_stt(server.base_url, finish_timeout_s=5.0)
        await stt.warm_up()
        server.mode = "cut"
        stream = stt.open_stream(RATE)
        await speak(stream, realtime=True)  # the socket drops after 0.5 s of audio
        clock = Stopwatch()
        with pytest.raises(ProviderError) as caught:
            await stream.finish()
        assert clock.elapsed < 0.1
        await stt.aclose()
    assert caught.value.retryable and "connection" in str(caught.value)


async def test_a_hung_server_misses_the_first_byte_deadline() -> None:
    async with standin() as server:
        server.mode = "timeout"
        stt = make_stt(server.base_url, finish_timeout_s=0.3)
        stream = stt.open_stream(RATE)
        await speak(stream)
        clock = Stopwatch()
        with pytest.raises(ProviderError, match="timed out") as caught:
            await stream.finish()
        assert 0.3 <= clock.elapsed < 0.5
        await stream.aclose()
        await asyncio.sleep(0.05)
        assert server.realtime.connections[0].closed  # a commit not waited out: closed
        await stt.aclose()
    assert caught.value.retryable


async def test_too_little_audio_is_refused_and_none_is_never_sent() -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url)
        stream = stt.open_stream(RATE)
        with pytest.raises(ProviderError, match="bad audio") as empty:
            await stream.finish()
        stream = stt.open_stream(RATE)
        stream.push(AUDIO[:FRAME * 2])  # 40 ms: the API wants 100 ms
        with pytest.raises(ProviderError, match="buffer too small") as short:
            await stream.finish()
        await stt.aclose()
    assert not empty.value.retryable and not short.value.retryable


async def test_aclose_before_the_end_clears_the_buffer_and_keeps_the_session() -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url, pool_size=1)
        await stt.warm_up()
        stream = stt.open_stream(RATE)
        await speak(stream, realtime=True)  # a false start the caller's session drops
        await stream.aclose()
        await stream.aclose()  # idempotent
        assert stt.idle_sessions == 1
        stream = stt.open_stream(RATE)
        await speak(stream, AUDIO[:RATE])
        transcript = await stream.finish()
        await stt.aclose()
    [connection] = server.realtime.connections
    kinds = [e["type"] for e in connection.events if e["type"] != "input_audio_buffer.append"]
    assert kinds == ["session.update", "input_audio_buffer.clear", "input_audio_buffer.commit"]
    assert connection.commits == [pcm16_to_ulaw(AUDIO[:RATE])]  # only the second utterance
    assert transcript.text


async def test_aclose_while_finishing_ends_the_wait_and_the_session() -> None:
    async with standin() as server:
        server.mode = "timeout"
        stt = make_stt(server.base_url)
        stream = stt.open_stream(RATE)
        await speak(stream)
        waiting = asyncio.create_task(stream.finish())
        await asyncio.sleep(0.1)
        await stream.aclose()
        with pytest.raises(ProviderError, match="closed"):
            await waiting
        await asyncio.sleep(0.05)
        assert all(c.closed for c in server.realtime.connections if c.commits)
        await stt.aclose()


async def test_push_never_blocks_and_a_hung_handshake_is_bounded() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hung.append(w)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stt = make_stt(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.3, pool_size=0)
    stream = stt.open_stream(RATE)
    pcm = speech_pcm16(10.0, RATE)
    slowest = 0.0
    for offset in range(0, len(pcm), FRAME):
        started = time.perf_counter()
        stream.push(pcm[offset:offset + FRAME])
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.005
    clock = Stopwatch()
    with pytest.raises(ProviderError, match="connect timed out"):
        await stream.finish()
    assert clock.elapsed < 0.4
    await stt.aclose()
    for writer in hung:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_nothing_is_left_running_after_aclose() -> None:
    async with standin(0.0) as server:
        stt = make_stt(server.base_url)
        await stt.warm_up()
        done = stt.open_stream(RATE)
        await speak(done)
        await done.finish()
        dropped = stt.open_stream(RATE)
        await speak(dropped)
        await dropped.aclose()
        forgotten = stt.open_stream(RATE)  # never finished nor closed by its caller
        await speak(forgotten)
        await asyncio.sleep(0.05)
        await stt.aclose()
        await asyncio.sleep(0)
        assert own_tasks() == []
        with pytest.raises(ProviderError, match="closed"):
            await forgotten.finish()


async def test_built_from_config_with_the_openai_key_and_url() -> None:
    config = Config.model_validate({"providers": {
        "stt": ["openai_realtime", "local_whisper"],
        "openai": {"api_key": OPENAI_KEY, "base_url": "http://127.0.0.1:9/v1"},
        "openai_realtime": {"model": "gpt-transcribe", "pool_size": 0}}})
    spec = registry.spec("stt", "openai_realtime")
    async with standin(0.0) as server:
        settings = config.providers.settings("openai_realtime", spec.settings)
        stt = spec.build(settings.model_copy(update={"base_url": server.base_url}), config)
        assert isinstance(stt, OpenAIRealtimeTranscriber) and stt.model == "gpt-transcribe"
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    assert transcript.text and server.realtime.connections[0].closed  # pool_size 0
    unbuilt = config.providers.settings("openai_realtime", spec.settings)
    built = spec.build(unbuilt, config)
    assert isinstance(built, OpenAIRealtimeTranscriber)
    assert str(built._client.base_url) == "http://127.0.0.1:9/v1/"  # [providers.openai]'s
    await built.aclose()
