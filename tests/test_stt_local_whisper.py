"""faster-whisper tiny.en on real espeak speech over a telephone round trip."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rapidfuzz import fuzz

from engine.audio.codec import ulaw_to_pcm16
from engine.providers.base import ProviderError, SpeechToText
from engine.providers.builtin.espeak_engine import get_espeak
from engine.providers.builtin.stt_local_whisper import LocalWhisperSTT
from engine.providers.model_files import (
    WHISPER_TINY_EN_FILES,
    ExpectedFile,
    ModelIntegrityError,
    file_sha256,
    locate_bundled_whisper,
    verify_model_dir,
)

pytest.importorskip("faster_whisper")

CALLER_VOICE = "en-gb"  # EspeakSettings.caller_voice
QUESTION = "How much does the premium plan cost?"


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    try:
        return locate_bundled_whisper()
    except ModelIntegrityError as exc:
        pytest.skip(f"bundled whisper model not installed: {exc}")


@pytest.fixture(scope="module")
def stt(bundled_dir: Path) -> Iterator[LocalWhisperSTT]:
    # Loop-independent (thread pool + threading lock), so one model serves the module.
    provider = LocalWhisperSTT()
    yield provider
    asyncio.run(provider.aclose())


async def _telephone_pcm(text: str, voice: str = CALLER_VOICE) -> bytes:
    """Speech as the engine receives it from Twilio: 8 kHz mu-law decoded to PCM16."""
    return ulaw_to_pcm16(await get_espeak().synthesize_ulaw8k(text, voice, 175))


@pytest.mark.slow
async def test_transcribes_caller_question_after_telephone_round_trip(
        stt: LocalWhisperSTT) -> None:
    assert isinstance(stt, SpeechToText)
    await stt.warm_up()
    pcm = await _telephone_pcm(QUESTION)
    transcript = await stt.transcribe(pcm, 8000)

    words = transcript.text.lower()
    assert ("premium" in words and "plan" in words) or \
        fuzz.ratio(words, QUESTION.lower()) > 70, transcript.text
    assert transcript.confidence.avg_logprob is not None
    assert transcript.confidence.avg_logprob > -1.0
    assert transcript.confidence.no_speech_prob is not None
    assert transcript.confidence.no_speech_prob < 0.5
    assert transcript.confidence.compression_ratio is not None
    assert transcript.usage.provider == "local_whisper" and transcript.usage.kind == "stt"
    assert transcript.usage.model == "tiny.en"
    assert transcript.usage.audio_seconds == pytest.approx(len(pcm) / 2 / 8000)
    assert 0 < transcript.timing.total_s < 10


@pytest.mark.slow
async def test_silence_gives_empty_or_low_confidence(stt: LocalWhisperSTT) -> None:
    transcript = await stt.transcribe(bytes(2 * 8000 * 2), 8000)
    no_speech = transcript.confidence.no_speech_prob
    assert transcript.text == "" or (no_speech is not None and no_speech > 0.6), transcript
    assert transcript.usage.audio_seconds == pytest.approx(2.0)


@pytest.mark.slow
async def test_concurrent_transcriptions_do_not_block_the_loop(stt: LocalWhisperSTT) -> None:
    await stt.warm_up()
    first = await _telephone_pcm(QUESTION)
    second = await _telephone_pcm("I would like to cancel my subscription.", "en-us")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(stt.transcribe(first, 8000), stt.transcribe(second, 8000))
    stop.set()
    await tick
    assert "premium" in results[0].text.lower()
    assert "cancel" in results[1].text.lower()
    # Decoding takes hundreds of ms; the loop must keep ticking meanwhile.
    assert gaps and max(gaps) < 0.15, max(gaps)


async def test_too_short_audio_returns_empty_without_loading_a_model(tmp_path: Path) -> None:
    # This model cannot load; a short utterance must not even try.
    provider = LocalWhisperSTT(model=str(tmp_path / "absent"))
    transcript = await provider.transcribe(bytes(2 * 400), 8000)  # 50 ms
    assert transcript.text == ""
    assert transcript.usage.audio_seconds == pytest.approx(0.05)
    with pytest.raises(ProviderError):
        await provider.transcribe(bytes(2 * 8000), 8000)  # 1 s: now it must load, and fails
    await provider.aclose()


async def test_bad_audio_input_is_a_provider_error() -> None:
    provider = LocalWhisperSTT(model="/nonexistent/model")
    with pytest.raises(ProviderError, match="odd number"):
        await provider.transcribe(b"\x00\x01\x02", 8000)
    with pytest.raises(ProviderError, match="sample rate"):
        await provider.transcribe(bytes(1600), 0)
    await provider.aclose()


def _copy_small_files(source: Path, target: Path) -> None:
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy2(source / name, target / name)


async def test_tampered_model_file_is_refused(bundled_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _copy_small_files(bundled_dir, model_dir)
    (model_dir / "model.bin").write_bytes(b"not the weights")

    with pytest.raises(ModelIntegrityError) as info:
        verify_model_dir(model_dir, WHISPER_TINY_EN_FILES)
    message = str(info.value)
    assert "model.bin" in message
    assert WHISPER_TINY_EN_FILES["model.bin"].sha256 in message
    assert file_sha256(model_dir / "model.bin") in message

    # The provider refuses it too: it is the pinned model (config.json matches), damaged.
    provider = LocalWhisperSTT(model=str(model_dir))
    with pytest.raises(ModelIntegrityError):
        await provider.warm_up()
    await provider.aclose()


async def test_missing_model_file_is_refused(bundled_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _copy_small_files(bundled_dir, model_dir)
    with pytest.raises(ModelIntegrityError, match=r"model\.bin is missing"):
        verify_model_dir(model_dir, WHISPER_TINY_EN_FILES)
    provider = LocalWhisperSTT(model=str(model_dir))
    with pytest.raises(ModelIntegrityError):
        await provider.warm_up()
    await provider.aclose()


async def test_unknown_model_dir_is_loaded_as_is_not_verified(tmp_path: Path) -> None:
    model_dir = tmp_path / "other"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    provider = LocalWhisperSTT(model=str(model_dir))
    with pytest.raises(ProviderError) as info:
        await provider.warm_up()
    # Not our pinned model, so no integrity refusal: the load itself fails.
    assert not isinstance(info.value, ModelIntegrityError)
    await provider.aclose()


def test_bundled_model_verifies(bundled_dir: Path) -> None:
    verify_model_dir(bundled_dir, WHISPER_TINY_EN_FILES)
    assert (bundled_dir / "model.bin").stat().st_size == WHISPER_TINY_EN_FILES["model.bin"].size


def test_digest_is_cached_per_path_size_and_mtime(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"a" * 1000)
    stat = target.stat()
    first = file_sha256(target)
    verify_model_dir(tmp_path, {"weights.bin": ExpectedFile(1000, first)})

    # Same size and mtime: the cached digest is used, so the change goes unseen...
    target.write_bytes(b"b" * 1000)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(target) == first
    # ...a new mtime makes it rehash and the check fail.
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(target) != first
    with pytest.raises(ModelIntegrityError, match=r"weights\.bin"):
        verify_model_dir(tmp_path, {"weights.bin": ExpectedFile(1000, first)})


def test_model_dir_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="does not exist"):
        verify_model_dir(tmp_path / "nope", WHISPER_TINY_EN_FILES)
