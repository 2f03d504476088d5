"""Resampling with a real anti-alias filter (soxr), whole-buffer and streaming.

`audioop.ratecv` has no anti-alias filter; soxr's is -83 dB at 6 kHz on 16k->8k.
Streaming uses quality "QQ" because soxr's HQ streaming output is bursty, while QQ gives
a steady output per 20 ms input (see shared/reference/offline-stack.md).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr


def resample(samples: npt.NDArray[np.int16], from_rate: int, to_rate: int) -> npt.NDArray[np.int16]:
    """Resample a whole int16 mono buffer (high quality)."""
    if from_rate == to_rate or samples.size == 0:
        return samples
    out = soxr.resample(samples, from_rate, to_rate, quality="HQ")
    return np.asarray(out, dtype=np.int16)


def resample_float(samples: npt.NDArray[np.float32], from_rate: int,
                   to_rate: int) -> npt.NDArray[np.float32]:
    """Resample a whole float32 mono buffer (high quality)."""
    if from_rate == to_rate or samples.size == 0:
        return samples
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def _lowpass_taps(from_rate: int, to_rate: int) -> npt.NDArray[np.float32]:
    """Kaiser-windowed sinc low-pass at `from_rate`, ~80 dB down from `to_rate`/2.

    Passband to 0.425 x to_rate (3.4 kHz for 8 kHz: the telephone band), stopband from
    0.5 x to_rate, so nothing above the output Nyquist folds back.
    """
    atten_db = 80.0
    cutoff = 0.4625 * to_rate
    transition = 0.075 * to_rate
    beta = 0.1102 * (atten_db - 8.7)
    ntaps = int(np.ceil((atten_db - 7.95) / (2.285 * 2 * np.pi * transition / from_rate))) | 1
    m = np.arange(ntaps) - (ntaps - 1) / 2
    taps = np.sinc(2 * cutoff / from_rate * m) * np.kaiser(ntaps, beta)
    return (taps / taps.sum()).astype(np.float32)


def _to_int16(x: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


class StreamResampler:
    """Resample a stream chunk by chunk, keeping filter state between chunks.

    soxr "QQ" is cubic interpolation with no anti-alias filter (a 6 kHz tone goes through
    16k->8k at 0 dB), so when downsampling with QQ the input is first low-pass filtered
    here (FIR, 80 dB); for integer ratios (16k, 24k, 48k -> 8k) the filter also decimates
    and soxr is not needed. Output stays steady: one input chunk, one proportional output.
    """

    __slots__ = ("_consumed", "_decimation", "_history", "_stream", "_taps", "from_rate",
                 "to_rate")

    def __init__(self, from_rate: int, to_rate: int, quality: str = "QQ") -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._taps: npt.NDArray[np.float32] | None = None
        self._history = np.zeros(0, dtype=np.float32)
        self._decimation = 0
        self._consumed = 0  # input samples seen (to place the decimation phase)
        self._stream: soxr.ResampleStream | None = None
        if to_rate < from_rate and quality == "QQ":
            self._taps = _lowpass_taps(from_rate, to_rate)
            self._history = np.zeros(self._taps.size - 1, dtype=np.float32)
            if from_rate % to_rate == 0:
                self._decimation = from_rate // to_rate
        if self._decimation == 0:
            dtype = "float32" if self._taps is not None else "int16"
            self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype=dtype,
                                               quality=quality)

    def process(self, chunk: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        if self._taps is None:
            assert self._stream is not None
            return np.asarray(self._stream.resample_chunk(chunk), dtype=np.int16)
        n = chunk.size
        if n == 0:
            return np.zeros(0, dtype=np.int16)
        x = np.concatenate((self._history, chunk.astype(np.float32)))
        self._history = x[n:]
        filtered = np.convolve(x, self._taps, mode="valid")  # n outputs
        # filtered[k] is centred on input sample consumed + k - delay; drop the filter's
        # start-up so the stream is not delayed, and keep every M-th when decimating.
        delay = (self._taps.size - 1) // 2
        first = max(0, delay - self._consumed)
        self._consumed += n
        if self._decimation:
            first += (delay - (self._consumed - n) - first) % self._decimation
            return _to_int16(filtered[first::self._decimation])
        assert self._stream is not None
        return _to_int16(np.asarray(self._stream.resample_chunk(filtered[first:])))

    def flush(self) -> npt.NDArray[np.int16]:
        """The samples still held in the filters (call once, at the end of the stream)."""
        if self._taps is None:
            assert self._stream is not None
            tail = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
            return np.asarray(tail, dtype=np.int16)
        # Push the FIR's group delay out with zeros.
        out = self.process(np.zeros((self._taps.size - 1) // 2, dtype=np.int16))
        if self._stream is None:
            return out
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return np.concatenate((out, _to_int16(np.asarray(tail))))
