"""OpenAITranscriber through the real `openai` SDK against the local OpenAI stand-in."""

from __future__ import annotations

import io
import math
import wave

import openai
import pytest

from engine.audio.wav import pcm16_to_wav_bytes as pcm16_to_wav
from engine.providers.base import ProviderError, SpeechToText
from engine.providers.builtin.stt_openai import OpenAITranscriber
from engine.sim.standins.openai_api import OpenAIStandin, SegmentSpec
from tests.cloud_fixtures import OPENAI_KEY, Stopwatch, closed_port_url, speech_pcm16

RATE = 16000
AUDIO_S = 2.5
AUDIO = speech_pcm16(AUDIO_S, RATE)


def make_stt(base_url: str, model: str, timeout_s: float = 4.0) -> OpenAITranscriber:
    return OpenAITranscriber(api_key=OPENAI_KEY, base_url=base_url, model=model,
                             timeout_s=timeout_s)


def test_wav_wrapper_round_trips() -> None:
    with wave.open(io.BytesIO(pcm16_to_wav(AUDIO, RATE)), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        assert wav.readframes(wav.getnframes()) == AUDIO


async def test_whisper_verbose_json_confidence_and_usage() -> None:
    async with OpenAIStandin() as server:
        server.transcript = "Hello. I need help with my bill."
        server.segments = [
            SegmentSpec("Hello.", 1.0, avg_logprob=-0.2, no_speech_prob=0.05,
                        compression_ratio=1.1),
            SegmentSpec("I need help with my bill.", 3.0, avg_logprob=-1.0,
                        no_speech_prob=0.3, compression_ratio=2.6),
        ]
        stt = make_stt(server.base_url, "whisper-1")
        assert isinstance(stt, SpeechToText)
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()

    [request] = server.requests
    assert request.path == "/v1/audio/transcriptions"
    assert request.form["model"] == "whisper-1"
    assert request.form["response_format"] == "verbose_json"
    assert "include[]" not in request.form and "include" not in request.form
    file = request.form["file"]
    assert file["content_type"] == "audio/wav" and file["filename"].endswith(".wav")
    assert (file["sample_rate"], file["channels"], file["sample_width"]) == (RATE, 1, 2)

    assert transcript.text == "Hello. I need help with my bill."
    # Duration-weighted: (1 s x -0.2 + 3 s x -1.0) / 4 s; the worst of the others.
    assert transcript.confidence.avg_logprob == pytest.approx(-0.8)
    assert transcript.confidence.no_speech_prob == pytest.approx(0.3)
    assert transcript.confidence.compression_ratio == pytest.approx(2.6)
    assert transcript.confidence.token_logprob_mean is None
    assert transcript.usage.audio_seconds == math.ceil(AUDIO_S)  # usage.seconds as billed
    assert (transcript.usage.provider, transcript.usage.kind, transcript.usage.model) == \
        ("openai", "stt", "whisper-1")
    assert transcript.timing.first_byte_s is not None
    assert transcript.timing.total_s > 0


@pytest.mark.parametrize("model", ["gpt-4o-mini-transcribe", "gpt-4o-transcribe"])
async def test_gpt4o_transcribe_logprobs_and_token_usage(model: str) -> None:
    async with OpenAIStandin() as server:
        server.transcript = "Can I change my delivery address?"
        server.token_logprob = -0.25
        stt = make_stt(server.base_url, model)
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()

    [request] = server.requests
    assert request.form["model"] == model
    assert request.form["response_format"] == "json"
    assert request.form.get("include[]", request.form.get("include")) == "logprobs"
    assert transcript.text == "Can I change my delivery address?"
    assert transcript.confidence.token_logprob_mean == pytest.approx(-0.25)
    assert transcript.confidence.avg_logprob is None
    sent = server.last_usage
    assert sent is not None and sent["type"] == "tokens"
    assert transcript.usage.input_tokens == sent["input_tokens"] > 0
    assert transcript.usage.output_tokens == sent["output_tokens"] > 0
    assert transcript.usage.audio_seconds == pytest.approx(AUDIO_S)  # from the audio itself


async def test_gpt_transcribe_json_without_logprobs() -> None:
    async with OpenAIStandin() as server:
        server.transcript = "Goodbye."
        stt = make_stt(server.base_url, "gpt-transcribe")
        transcript = await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    [request] = server.requests
    assert request.form["response_format"] == "json"
    assert "include[]" not in request.form and "include" not in request.form
    assert transcript.text == "Goodbye."
    assert transcript.confidence.token_logprob_mean is None
    assert transcript.usage.audio_seconds == math.ceil(AUDIO_S)


async def test_transcript_can_depend_on_audio_length() -> None:
    async with OpenAIStandin() as server:
        server.transcript = lambda seconds: f"{seconds:.1f} seconds"
        stt = make_stt(server.base_url, "gpt-4o-mini-transcribe")
        transcript = await stt.transcribe(speech_pcm16(1.2, 8000), 8000)
        await stt.aclose()
    assert transcript.text == "1.2 seconds"


@pytest.mark.parametrize(("mode", "status", "retryable"),
                         [("401", 401, False), ("429", 429, True), ("500", 500, True)])
async def test_http_errors(mode: str, status: int, retryable: bool) -> None:
    async with OpenAIStandin() as server:
        server.mode = mode  # type: ignore[assignment]
        stt = make_stt(server.base_url, "whisper-1")
        with pytest.raises(ProviderError) as info:
            await stt.transcribe(AUDIO, RATE)
        await stt.aclose()
    assert info.value.status == status and info.value.retryable is retryable
    assert len(server.requests) == 1


async def test_timeout_is_bounded() -> None:
    async with OpenAIStandin() as server:
        server.mode = "timeout"
        stt = make_stt(server.base_url, "gpt-4o-mini-transcribe", timeout_s=0.5)
        watch = Stopwatch()
        with pytest.raises(ProviderError) as info:
            await stt.transcribe(AUDIO, RATE)
        elapsed = watch.elapsed
        await stt.aclose()
    assert elapsed < 2 * 0.5
    assert info.value.retryable and "timed out" in str(info.value)


async def test_connection_refused() -> None:
    stt = make_stt(closed_port_url("/v1"), "whisper-1")
    with pytest.raises(ProviderError) as info:
        await stt.transcribe(AUDIO, RATE)
    await stt.aclose()
    assert info.value.retryable and info.value.status is None


@pytest.mark.parametrize(("pcm", "rate"), [(b"", RATE), (b"\x00\x01\x02", RATE),
                                           (AUDIO, 0)])
async def test_bad_audio_is_rejected_before_any_request(pcm: bytes, rate: int) -> None:
    async with OpenAIStandin() as server:
        stt = make_stt(server.base_url, "whisper-1")
        with pytest.raises(ProviderError) as info:
            await stt.transcribe(pcm, rate)
        await stt.aclose()
    assert not info.value.retryable
    assert server.requests == []


async def test_standin_rejects_verbose_json_for_gpt4o_like_the_api() -> None:
    """The stand-in keeps the real API's rule, so a wrong request shape fails in tests."""
    async with OpenAIStandin() as server:
        client = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=server.base_url,
                                    max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.audio.transcriptions.create(
                model="gpt-4o-mini-transcribe", response_format="verbose_json",
                file=("a.wav", pcm16_to_wav(AUDIO, RATE), "audio/wav"))
        await client.close()
    assert info.value.status_code == 400
    assert "not compatible" in str(info.value)
