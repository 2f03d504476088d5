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


class StreamResampler:
    """Resample a stream chunk by chunk, keeping filter state between chunks."""

    __slots__ = ("_stream", "from_rate", "to_rate")

    def __init__(self, from_rate: int, to_rate: int, quality: str = "QQ") -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16", quality=quality)

    def process(self, chunk: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        return self._stream.resample_chunk(chunk)  # type: ignore[no-any-return]

    def flush(self) -> npt.NDArray[np.int16]:
        return self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)  # type: ignore[no-any-return]
