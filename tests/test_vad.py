"""VAD and endpointing on synthetic voice-like telephone audio (8 kHz, through mu-law).

The voice-like signal is a glottal harmonic series (pitch 100-200 Hz with vibrato) shaped
by three vowel formants and a syllable-rate envelope; the first tests check that
webrtcvad really hears it as speech, so the endpointer tests rest on a verified signal.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from engine.audio import codec
from engine.audio.frames import FRAME_BYTES, split_frames
from engine.audio.vad import (
    Endpointer,
    EndpointerOptions,
    EndpointEvent,
    SpeechEnded,
    SpeechStarted,
    VoiceActivityDetector,
)
from engine.config import TurnConfig

RATE = 8000
VOWEL_A = ((700.0, 130.0), (1220.0, 70.0), (2600.0, 160.0))


def voice(seconds: float, pitch_hz: float = 140.0, level_dbfs: float = -12.0,
          formants: tuple[tuple[float, float], ...] = VOWEL_A) -> npt.NDArray[np.int16]:
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = pitch_hz * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))  # vibrato
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    out = np.zeros(n)
    for k in range(1, int(3800 / pitch_hz) + 1):
        fk = k * pitch_hz
        gain = sum(1 / (1 + ((fk - f) / bw) ** 2) for f, bw in formants) / np.sqrt(k)
        out += gain * np.sin(k * phase)
    out *= 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)  # ~4 syllables per second
    out *= 10 ** (level_dbfs / 20) * 32767 / np.max(np.abs(out))
    return out.astype(np.int16)


def silence(seconds: float) -> npt.NDArray[np.int16]:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def noise(seconds: float, rms: float, seed: int = 0) -> npt.NDArray[np.int16]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, rms, int(seconds * RATE)), -32768, 32767).astype(np.int16)


def telephone(*parts: npt.NDArray[np.int16]) -> bytes:
    """Concatenate and encode to mu-law, as the caller's audio arrives from Twilio."""
    return codec.int16_to_ulaw(np.concatenate(parts))


def run(endpointer: Endpointer, ulaw: bytes) -> list[EndpointEvent]:
    events = []
    for frame in split_frames(ulaw):
        event = endpointer.feed(frame)
        if event is not None:
            events.append(event)
    return events


def voiced_fraction(ulaw: bytes, mode: int = 2) -> float:
    vad = VoiceActivityDetector(mode)
    frames = [codec.ulaw_to_pcm16(f) for f in split_frames(ulaw)]
    return sum(vad.is_speech(f) for f in frames) / len(frames)


# --- the detector and the test signal ------------------------------------------------------

@pytest.mark.parametrize("pitch_hz", [120.0, 160.0, 200.0])
@pytest.mark.parametrize("level_dbfs", [-6.0, -12.0])
def test_webrtcvad_hears_the_synthetic_voice_as_speech(pitch_hz: float, level_dbfs: float
                                                       ) -> None:
    assert voiced_fraction(telephone(voice(1.0, pitch_hz, level_dbfs))) >= 0.9


def test_a_quiet_talker_is_heard_between_syllable_gaps() -> None:
    # At -20 dBFS the troughs between syllables drop out: speech with gaps.
    quiet = telephone(voice(1.0, 120.0, -20.0))
    assert 0.5 <= voiced_fraction(quiet) < 0.9
    events = run(Endpointer(), telephone(silence(0.5)) + quiet + telephone(silence(0.8)))
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]


def test_webrtcvad_does_not_hear_silence_or_line_hiss() -> None:
    assert voiced_fraction(telephone(silence(1.0))) == 0.0
    # About -70 dBFS; a fresh detector may flag a few frames while it adapts.
    assert voiced_fraction(telephone(noise(2.0, rms=10))) <= 0.05


def test_detector_accepts_bytes_and_arrays_and_rejects_bad_frames() -> None:
    vad = VoiceActivityDetector(3)
    frame = voice(0.02)
    assert vad.is_speech(frame) == vad.is_speech(frame.astype("<i2").tobytes())
    with pytest.raises(ValueError):
        vad.is_speech(b"\x00" * 100)
    with pytest.raises(ValueError):
        vad.is_speech(np.zeros(160, dtype=np.int32))
    with pytest.raises(ValueError):
        VoiceActivityDetector(4)


# --- endpointing ---------------------------------------------------------------------------

def test_silence_produces_no_events() -> None:
    endpointer = Endpointer()
    assert run(endpointer, telephone(silence(5.0), noise(5.0, rms=10))) == []
    assert not endpointer.in_speech
    assert endpointer.stream_time_s == pytest.approx(10.0)


@pytest.mark.parametrize("burst_s", [0.1, 0.16])
def test_short_bursts_do_not_start_a_turn(burst_s: float) -> None:
    # Loud white noise is "speech" to webrtcvad frame by frame, so only the duration
    # rule keeps a click or a cough from opening a turn.
    burst = noise(burst_s, rms=8000, seed=3)
    assert voiced_fraction(telephone(burst)) == 1.0
    events = run(Endpointer(), telephone(silence(1.0), burst, silence(1.0), burst, silence(1.0)))
    assert events == []


def test_one_utterance_start_end_and_preroll() -> None:
    lead, speech_s = 1.0, 1.0
    audio = telephone(silence(lead), voice(speech_s), silence(0.6))
    endpointer = Endpointer()
    events = run(endpointer, audio)
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    started, ended = events
    assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
    assert started.at_s == pytest.approx(lead, abs=0.06)
    # Decided once min_speech_ms (200) of voice has been seen.
    assert started.detected_at_s == pytest.approx(started.at_s + 0.2, abs=0.06)
    assert ended.reason == "silence"
    assert ended.trailing_silence_ms == 500
    assert ended.started_at_s == started.at_s
    assert 1000 <= ended.speech_ms <= 1000 + 120  # webrtcvad's own hangover
    assert ended.at_s == pytest.approx(started.at_s + ended.speech_ms / 1000 + 0.5, abs=1e-9)
    utterance_s = len(ended.utterance_pcm16) / 2 / RATE
    options = endpointer.options
    expected_s = (ended.speech_ms + options.preroll_ms + options.tail_ms) / 1000
    assert utterance_s == pytest.approx(expected_s, abs=1e-9)
    assert speech_s + options.preroll_ms / 1000 <= utterance_s <= speech_s + 0.45
    # The utterance is exactly the decoded caller audio from onset - preroll.
    decoded = codec.ulaw_to_pcm16(audio)
    offset = round((started.at_s - options.preroll_ms / 1000) * RATE) * 2
    assert ended.utterance_pcm16 == decoded[offset:offset + len(ended.utterance_pcm16)]
    assert not endpointer.in_speech and endpointer.speech_ms_so_far == 0


def test_pauses_shorter_than_the_endpoint_keep_one_turn() -> None:
    phrase = voice(0.5)
    audio = telephone(silence(0.5), phrase, silence(0.3), phrase, silence(0.35), phrase,
                      silence(0.7))
    events = run(Endpointer(), audio)
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    ended = events[1]
    assert isinstance(ended, SpeechEnded)
    assert ended.speech_ms >= 2100


def test_a_longer_pause_ends_the_turn_and_the_next_one_starts() -> None:
    phrase = voice(0.6)
    events = run(Endpointer(), telephone(silence(0.5), phrase, silence(0.8), phrase,
                                         silence(0.8)))
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded] * 2


def test_max_turn_cuts_a_long_monologue() -> None:
    options = EndpointerOptions(max_turn_ms=2000)
    events = run(Endpointer(options), telephone(silence(0.5), voice(5.0), silence(0.8)))
    kinds = [type(e) for e in events]
    assert kinds[:2] == [SpeechStarted, SpeechEnded]
    cut = events[1]
    assert isinstance(cut, SpeechEnded) and cut.reason == "max_turn"
    assert cut.at_s - cut.started_at_s == pytest.approx(2.0, abs=1e-9)
    assert len(cut.utterance_pcm16) / 2 / RATE <= 2.0 + options.preroll_ms / 1000 + 1e-9
    # The caller keeps talking: new turns start at once (5 s = 2 s + 2 s + the rest).
    assert kinds == [SpeechStarted, SpeechEnded] * 3
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert [e.reason for e in ends] == ["max_turn", "max_turn", "silence"]
    assert ends[1].started_at_s == pytest.approx(ends[0].at_s, abs=0.06)
    # Consecutive utterances do not overlap: no audio is transcribed twice.
    total_s = sum(len(e.utterance_pcm16) for e in ends) / 2 / RATE
    assert total_s <= 5.0 + options.preroll_ms / 1000 + options.tail_ms / 1000


def test_speech_duration_for_barge_in() -> None:
    endpointer = Endpointer()
    frames = split_frames(telephone(silence(0.4), voice(1.5)))
    durations: list[int] = []
    started_at: float | None = None
    for frame in frames:
        event = endpointer.feed(frame)
        if isinstance(event, SpeechStarted):
            started_at = event.at_s
        durations.append(endpointer.speech_ms_so_far)
    assert started_at is not None and endpointer.in_speech
    # Counted from the onset (stream time), growing by one frame per frame fed.
    assert durations[-1] == round((endpointer.stream_time_s - started_at) * 1000)
    first = next(i for i, d in enumerate(durations) if d)
    assert all(b - a == 20 for a, b in zip(durations[first:], durations[first + 1:], strict=False))
    assert 0 < endpointer.voiced_ms_so_far <= endpointer.speech_ms_so_far
    interruption_min_ms = TurnConfig().interruption_min_ms
    crossed = next(i for i, d in enumerate(durations) if d >= interruption_min_ms)
    assert (crossed + 1) * 0.02 == pytest.approx(started_at + interruption_min_ms / 1000)


def test_events_depend_only_on_the_stream() -> None:
    audio = telephone(silence(0.3), voice(0.8, 180.0), silence(0.6), voice(0.4), silence(0.6))
    assert run(Endpointer(), audio) == run(Endpointer(), audio)


def test_reset_drops_the_turn_in_progress() -> None:
    endpointer = Endpointer()
    run(endpointer, telephone(silence(0.2), voice(0.6)))
    assert endpointer.in_speech
    clock = endpointer.stream_time_s
    endpointer.reset()
    assert not endpointer.in_speech and endpointer.speech_ms_so_far == 0
    assert endpointer.stream_time_s == clock
    assert run(endpointer, telephone(silence(1.0))) == []


def test_feed_pcm16_matches_feed() -> None:
    audio = telephone(silence(0.3), voice(0.7), silence(0.6))
    by_ulaw = run(Endpointer(), audio)
    endpointer = Endpointer()
    by_pcm: list[EndpointEvent] = []
    for frame in split_frames(audio):
        event = endpointer.feed_pcm16(codec.ulaw_to_pcm16(frame))
        if event:
            by_pcm.append(event)
    assert by_pcm == by_ulaw and len(by_pcm) == 2


def test_bad_frames_are_rejected() -> None:
    endpointer = Endpointer()
    with pytest.raises(ValueError, match="160-byte"):
        endpointer.feed(b"\xff" * (FRAME_BYTES + 1))
    with pytest.raises(ValueError):
        endpointer.feed_pcm16(b"\x00" * 100)
    assert endpointer.frames_fed == 0  # a rejected frame does not advance the clock


def test_options_from_turn_config_and_validation() -> None:
    turns = TurnConfig(min_speech_ms=300, endpoint_silence_ms=700, max_turn_seconds=12.5,
                       vad_mode=3)
    endpointer = Endpointer.from_turn_config(turns, call_sid="CA123")
    assert endpointer.options.min_speech_ms == 300
    assert endpointer.options.endpoint_silence_ms == 700
    assert endpointer.options.max_turn_ms == 12500
    assert endpointer.options.start_window_ms >= 400
    with pytest.raises(ValueError):
        EndpointerOptions(min_speech_ms=400, start_window_ms=300)
    with pytest.raises(ValueError):
        EndpointerOptions(preroll_ms=-20)


def test_longer_min_speech_ignores_a_longer_burst() -> None:
    burst = noise(0.3, rms=8000, seed=5)
    audio = telephone(silence(0.5), burst, silence(1.0))
    assert [type(e) for e in run(Endpointer(), audio)] == [SpeechStarted, SpeechEnded]
    assert run(Endpointer(EndpointerOptions(min_speech_ms=400, start_window_ms=500)),
               audio) == []
