"""Resampling: real anti-alias filtering (whole buffer and streamed) and steady streaming."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from engine.audio.resample import StreamResampler, resample, resample_float


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 10000.0
         ) -> npt.NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def level_db(out: npt.NDArray[np.int16], ref: npt.NDArray[np.int16], edge: int = 400) -> float:
    """RMS of `out` (edges cut: filter start-up) relative to `ref`, in dB."""
    core = out[edge:-edge].astype(np.float64)
    out_rms = max(float(np.sqrt(np.mean(core**2))), 1e-9)
    ref_rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    return 20 * np.log10(out_rms / ref_rms)


def stream(resampler: StreamResampler, x: npt.NDArray[np.int16], chunk: int
           ) -> tuple[list[npt.NDArray[np.int16]], npt.NDArray[np.int16]]:
    outs = [resampler.process(x[i:i + chunk]) for i in range(0, x.size, chunk)]
    return outs, resampler.flush()


def test_whole_buffer_16k_to_8k_rejects_6khz_and_passes_1khz() -> None:
    high = tone(6000, 16000)
    low = tone(1000, 16000)
    assert level_db(resample(high, 16000, 8000), high) < -60
    assert abs(level_db(resample(low, 16000, 8000), low)) < 1.0
    assert resample(low, 16000, 8000).size == 8000


@pytest.mark.parametrize("from_rate", [16000, 22050, 24000, 48000])
def test_streamed_downsampling_is_anti_aliased(from_rate: int) -> None:
    # soxr's "QQ" alone lets 6 kHz through at 0 dB; the stream filters first.
    high = tone(6000, from_rate)
    low = tone(1000, from_rate)
    chunk = from_rate // 50
    outs, tail = stream(StreamResampler(from_rate, 8000), high, chunk)
    assert level_db(np.concatenate([*outs, tail]), high) < -60
    outs, tail = stream(StreamResampler(from_rate, 8000), low, chunk)
    assert abs(level_db(np.concatenate([*outs, tail]), low)) < 1.0


@pytest.mark.parametrize("from_rate", [16000, 22050, 24000])
def test_streamed_downsampling_is_steady_and_length_exact(from_rate: int) -> None:
    x = tone(440, from_rate, seconds=2.0)
    outs, tail = stream(StreamResampler(from_rate, 8000), x, from_rate // 50)
    # Every 20 ms chunk after the first yields 20 ms (no bursts that would stall playback).
    assert {o.size for o in outs[1:]} == {160}
    total = sum(o.size for o in outs) + tail.size
    assert abs(total - 16000) <= 2


def test_streamed_downsampling_matches_whole_buffer_in_time() -> None:
    x = tone(1000, 16000)
    outs, tail = stream(StreamResampler(16000, 8000), x, 320)
    streamed = np.concatenate([*outs, tail]).astype(np.int32)
    whole = resample(x, 16000, 8000).astype(np.int32)
    assert streamed.size == whole.size
    # Not delayed: sample by sample within a few LSB of the HQ whole-buffer result.
    assert np.max(np.abs(streamed[200:-200] - whole[200:-200])) < 20


def test_streamed_upsampling_8k_to_16k_ratio_and_content() -> None:
    x = tone(1000, 8000, seconds=1.0)
    resampler = StreamResampler(8000, 16000)
    outs, tail = stream(resampler, x, 160)
    assert {o.size for o in outs[1:]} == {320}
    y = np.concatenate([*outs, tail])
    assert abs(y.size - 2 * x.size) <= 4
    spectrum = np.abs(np.fft.rfft(y.astype(np.float64)))
    peak_hz = np.argmax(spectrum) * 16000 / y.size
    assert abs(peak_hz - 1000) < 5
    assert abs(level_db(y, x)) < 1.0


def test_same_rate_and_empty_input_pass_through() -> None:
    x = tone(1000, 8000, seconds=0.1)
    assert resample(x, 8000, 8000) is x
    empty = np.zeros(0, dtype=np.int16)
    assert resample(empty, 8000, 16000).size == 0
    assert StreamResampler(16000, 8000).process(empty).size == 0


def test_float_resample_keeps_level() -> None:
    x = (tone(1000, 16000) / 32768).astype(np.float32)
    y = resample_float(x, 16000, 8000)
    assert y.dtype == np.float32 and y.size == 8000
    assert abs(float(np.sqrt(np.mean(y[400:-400] ** 2))) - float(np.sqrt(np.mean(x**2)))) < 0.01


def test_bad_rates_rejected() -> None:
    with pytest.raises(ValueError):
        StreamResampler(0, 8000)
