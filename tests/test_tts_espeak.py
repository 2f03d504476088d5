"""espeak-ng through ctypes: real synthesis, real audio checks (no stand-ins)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

import numpy as np
import numpy.typing as npt
import pytest

from engine.audio.codec import ulaw_to_int16
from engine.providers.base import AudioChunk, ProviderError, SynthesisDone, TextToSpeech
from engine.providers.builtin.espeak_engine import get_espeak
from engine.providers.builtin.tts_espeak import EspeakTTS

SENTENCE = "How much does the premium plan cost?"


async def _collect(tts: EspeakTTS, text: str) -> tuple[list[bytes], SynthesisDone]:
    chunks: list[bytes] = []
    done: SynthesisDone | None = None
    async for event in tts.synthesize(text):
        assert done is None, "SynthesisDone must be the last event"
        if isinstance(event, AudioChunk):
            chunks.append(event.ulaw)
        else:
            done = event
    assert done is not None
    return chunks, done


def _rms(ulaw: bytes) -> float:
    samples = ulaw_to_int16(ulaw).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def _median_pitch_hz(ulaw: bytes, rate: int = 8000) -> float:
    """Median autocorrelation pitch over loud 40 ms frames (70-400 Hz)."""
    x = ulaw_to_int16(ulaw).astype(np.float64)
    frame = 320
    loudness = float(np.mean(x**2))
    pitches: list[float] = []
    for start in range(0, x.size - frame, frame):
        f = x[start:start + frame] - x[start:start + frame].mean()
        if np.mean(f**2) < 0.5 * loudness:
            continue
        ac = np.correlate(f, f, "full")[frame - 1:]
        lo, hi = rate // 400, rate // 70
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            pitches.append(rate / lag)
    assert pitches, "no voiced frames found"
    return float(np.median(pitches))


def _log_spectrum(ulaw: bytes) -> npt.NDArray[np.float64]:
    x = ulaw_to_int16(ulaw).astype(np.float64)
    n = 256
    frames = x[: x.size // n * n].reshape(-1, n) * np.hanning(n)
    energy = np.mean(frames**2, axis=1)
    frames = frames[energy > 0.01 * energy.max()]
    return np.log(np.abs(np.fft.rfft(frames, axis=1)).mean(axis=0) + 1e-6)


def _spectral_distance(a: bytes, b: bytes) -> float:
    return float(np.sqrt(np.mean((_log_spectrum(a) - _log_spectrum(b)) ** 2)))


async def test_implements_protocol_and_streams_plausible_ulaw() -> None:
    tts = EspeakTTS(voice="en-us", rate_wpm=175)
    assert isinstance(tts, TextToSpeech)
    assert tts.name == "espeak" and tts.voice == "en-us"
    chunks, done = await _collect(tts, SENTENCE)

    assert chunks and all(isinstance(c, bytes) for c in chunks)
    # 100 ms chunks of 8 kHz mu-law; only the last may be shorter.
    assert all(len(c) == 800 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 800
    audio = b"".join(chunks)
    seconds = len(audio) / 8000
    assert 0.5 < seconds < 5.0, seconds
    assert _rms(audio) > 300, "speech must not be silence"

    assert done.usage.provider == "espeak" and done.usage.kind == "tts"
    assert done.usage.model == "espeak-ng"
    assert done.usage.characters == len(SENTENCE)
    assert done.timing.first_byte_s is not None
    assert 0 <= done.timing.first_byte_s <= done.timing.total_s
    await tts.aclose()


async def test_longer_text_gives_longer_audio_and_rate_speeds_it_up() -> None:
    short, _ = await _collect(EspeakTTS(), "Yes.")
    long, _ = await _collect(EspeakTTS(), SENTENCE + " " + SENTENCE)
    fast, _ = await _collect(EspeakTTS(rate_wpm=300), SENTENCE + " " + SENTENCE)
    short_s, long_s, fast_s = (len(b"".join(c)) / 8000 for c in (short, long, fast))
    assert short_s < 1.0 < long_s
    assert fast_s < 0.8 * long_s


async def test_empty_text_yields_no_audio_but_a_done_event() -> None:
    chunks, done = await _collect(EspeakTTS(), "   ")
    assert chunks == []
    assert done.usage.characters == 3


async def test_unknown_voice_and_variant_and_rate_are_provider_errors() -> None:
    for tts in (EspeakTTS(voice="xx-nonexistent"), EspeakTTS(voice="en-us+nosuchvariant"),
                EspeakTTS(voice=""), EspeakTTS(voice="en-us+../../lang/gmw/en")):
        with pytest.raises(ProviderError) as info:
            await _collect(tts, SENTENCE)
        assert info.value.retryable is False
    with pytest.raises(ProviderError, match="rate_wpm"):
        await _collect(EspeakTTS(rate_wpm=5), SENTENCE)
    # The engine keeps working after bad requests.
    chunks, _ = await _collect(EspeakTTS(), SENTENCE)
    assert _rms(b"".join(chunks)) > 300


async def test_nul_characters_do_not_truncate_text() -> None:
    with_nul, _ = await _collect(EspeakTTS(), "Hello\x00 and welcome to the support line.")
    assert len(b"".join(with_nul)) / 8000 > 1.0
    # A lone surrogate (broken upstream text) is replaced, not a crash.
    odd, _ = await _collect(EspeakTTS(), "Hello \ud800 there.")
    assert odd


async def test_concurrent_requests_are_serialized_and_each_gets_its_own_audio() -> None:
    texts = ["Yes.", SENTENCE, "Thank you for calling, please hold the line for a moment.",
             "No.", "I would like to cancel my subscription, please."] * 2
    voices = ["en-us", "en-gb"]
    solo = []
    for i, text in enumerate(texts):
        chunks, _ = await _collect(EspeakTTS(voice=voices[i % 2]), text)
        solo.append(len(b"".join(chunks)))

    results = await asyncio.gather(*(_collect(EspeakTTS(voice=voices[i % 2]), text)
                                     for i, text in enumerate(texts)))
    for i, (chunks, done) in enumerate(results):
        audio = b"".join(chunks)
        # espeak adds small random variation; mixed-up buffers would be far off.
        assert abs(len(audio) - solo[i]) <= 0.03 * solo[i], (texts[i], len(audio), solo[i])
        assert _rms(audio) > 300
        assert done.usage.characters == len(texts[i])


async def test_all_library_calls_run_on_one_worker_thread() -> None:
    engine = get_espeak()
    assert get_espeak() is engine
    seen: set[int] = set()
    original = engine._synthesize_sync

    def spy(text: str, voice: str, rate_wpm: int,
            abort: threading.Event) -> tuple[npt.NDArray[np.int16], int]:
        seen.add(threading.get_ident())
        return original(text, voice, rate_wpm, abort)

    engine._synthesize_sync = spy  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(engine.synthesize_ulaw8k("Testing.", "en-us", 175)
                               for _ in range(6)))
    finally:
        del engine._synthesize_sync
    assert len(seen) == 1 and threading.get_ident() not in seen


async def test_agent_and_caller_voices_sound_different() -> None:
    engine = get_espeak()
    text = SENTENCE + " I would like to know today."
    us_a = await engine.synthesize_ulaw8k(text, "en-us", 175)
    us_b = await engine.synthesize_ulaw8k(text, "en-us", 175)
    gb_a = await engine.synthesize_ulaw8k(text, "en-gb", 175)
    gb_b = await engine.synthesize_ulaw8k(text, "en-gb", 175)
    female = await engine.synthesize_ulaw8k(text, "en-us+f3", 175)

    # Accent: the voices' spectra differ well beyond run-to-run variation.
    same_voice = max(_spectral_distance(us_a, us_b), _spectral_distance(gb_a, gb_b))
    assert _spectral_distance(us_a, gb_a) > 1.5 * same_voice
    # A female variant is pitched clearly higher.
    assert _median_pitch_hz(female) > 1.5 * _median_pitch_hz(us_a)


async def test_closing_the_stream_early_is_clean() -> None:
    tts = EspeakTTS()
    stream = tts.synthesize(SENTENCE)
    assert isinstance(stream, AsyncGenerator)
    first = await anext(stream)
    assert isinstance(first, AudioChunk)
    await stream.aclose()
    chunks, _ = await _collect(tts, "Still working.")
    assert chunks
