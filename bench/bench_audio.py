"""Per-20-ms-frame cost of the audio hot path: codec, VAD, endpointing, resampling, framing.

Run: .venv/bin/python bench/bench_audio.py [--frames 50000]

Each operation is timed call by call (perf_counter_ns, ~50 ns of timer overhead included)
over the same synthetic caller stream (voice-like bursts and silence through mu-law).
"frames/s per core" is 1 s divided by the mean cost: how many 20 ms frames one core could
process if it did nothing else (a call needs 50/s in each direction).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.audio import codec
from engine.audio.frames import FRAME_BYTES, FrameAssembler, split_frames
from engine.audio.resample import StreamResampler
from engine.audio.vad import Endpointer, VoiceActivityDetector

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:
        audioop = None  # type: ignore[assignment]

RATE = 8000
T = TypeVar("T")


@dataclass
class Row:
    name: str
    p50_us: float
    p99_us: float
    mean_us: float
    audioop_p50_us: float | None = None

    @property
    def frames_per_s(self) -> float:
        return 1e6 / self.mean_us


def caller_stream(seconds: float) -> bytes:
    """Alternating 1.2 s voice-like bursts and 0.8 s pauses, encoded to mu-law."""
    rng = np.random.default_rng(0)
    parts: list[npt.NDArray[np.float64]] = []
    total = 0
    while total < seconds * RATE:
        n = int(1.2 * RATE)
        t = np.arange(n) / RATE
        pitch = rng.uniform(110, 210)
        phase = 2 * np.pi * pitch * t
        burst = sum(np.sin(k * phase) / k for k in range(1, int(3800 / pitch)))
        burst *= 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
        parts += [burst / np.max(np.abs(burst)) * 8000, np.zeros(int(0.8 * RATE))]
        total += n + int(0.8 * RATE)
    pcm = np.concatenate(parts)[: int(seconds * RATE)].astype(np.int16)
    return codec.int16_to_ulaw(pcm)


def time_calls(fn: Callable[[T], object], inputs: Sequence[T]) -> npt.NDArray[np.int64]:
    clock = time.perf_counter_ns
    out = np.empty(len(inputs), dtype=np.int64)
    for i, item in enumerate(inputs):
        t0 = clock()
        fn(item)
        out[i] = clock() - t0
    return out


def summarize(name: str, ns: npt.NDArray[np.int64],
              reference_ns: npt.NDArray[np.int64] | None = None) -> Row:
    row = Row(name, float(np.percentile(ns, 50)) / 1e3, float(np.percentile(ns, 99)) / 1e3,
              float(ns.mean()) / 1e3)
    if reference_ns is not None:
        row.audioop_p50_us = float(np.percentile(reference_ns, 50)) / 1e3
    return row


def codec_rows(ulaw_frames: list[bytes], pcm_frames: list[bytes],
               int16_frames: list[npt.NDArray[np.int16]]) -> list[Row]:
    """mu-law decoding and encoding, the VAD, and the endpointer that combines them."""
    rows: list[Row] = []
    ref = time_calls(lambda f: audioop.ulaw2lin(f, 2), ulaw_frames) if audioop else None
    rows.append(summarize("decode mu-law -> PCM16 bytes", time_calls(codec.ulaw_to_pcm16,
                                                                       ulaw_frames), ref))
    rows.append(summarize("decode mu-law -> int16 array",
                          time_calls(codec.ulaw_to_int16, ulaw_frames)))
    ref = time_calls(lambda p: audioop.lin2ulaw(p, 2), pcm_frames) if audioop else None
    rows.append(summarize("encode PCM16 bytes -> mu-law", time_calls(codec.pcm16_to_ulaw,
                                                                       pcm_frames), ref))
    rows.append(summarize("encode int16 array -> mu-law",
                          time_calls(codec.int16_to_ulaw, int16_frames)))

    vad = VoiceActivityDetector(2)
    rows.append(summarize("VAD is_speech (webrtcvad, mode 2)",
                          time_calls(vad.is_speech, pcm_frames)))
    endpointer = Endpointer()
    rows.append(summarize("Endpointer.feed (decode+VAD+turns)",
                          time_calls(endpointer.feed, ulaw_frames)))
    return rows


def resample_rows(pcm_frames: list[bytes],
                  int16_frames: list[npt.NDArray[np.int16]]) -> list[Row]:
    """Up to the STT rate, and down from the TTS rates."""
    rows: list[Row] = []
    up = StreamResampler(8000, 16000)
    ref = None
    if audioop:
        state = None

        def ratecv(p: bytes) -> None:
            nonlocal state
            _, state = audioop.ratecv(p, 2, 1, 8000, 16000, state)

        ref = time_calls(ratecv, pcm_frames)
    rows.append(summarize("stream resample 8k -> 16k (soxr QQ)",
                          time_calls(up.process, int16_frames), ref))
    for rate in (16000, 24000, 22050):
        src = [np.repeat(f, 4)[: rate // 50] for f in int16_frames]  # 20 ms at `rate`
        down = StreamResampler(rate, 8000)
        method = "FIR decimation" if rate % 8000 == 0 else "FIR + soxr QQ"
        rows.append(summarize(f"stream resample {rate / 1000:g}k -> 8k ({method})",
                              time_calls(down.process, src)))
    return rows


def framing_rows(ulaw_frames: list[bytes], n_frames: int) -> list[Row]:
    """Outbound framing: TTS chunks of uneven size (here 50-900 bytes) into 160-byte
    frames, and the whole-frame fast path of inbound audio."""
    rng = np.random.default_rng(1)
    stream = b"".join(ulaw_frames)
    sizes = rng.integers(50, 900, n_frames)
    chunks, pos = [], 0
    for size in sizes:
        if pos + size > len(stream):
            pos = 0
        chunks.append(stream[pos:pos + int(size)])
        pos += int(size)
    assembler = FrameAssembler()
    rows = [summarize("FrameAssembler.push (uneven chunks)",
                      time_calls(assembler.push, chunks))]
    whole = [bytes(f) for f in ulaw_frames]
    rows.append(summarize("FrameAssembler.push (whole frames)",
                          time_calls(FrameAssembler().push, whole)))
    assert all(len(f) == FRAME_BYTES for f in whole)
    return rows


def run(n_frames: int) -> list[Row]:
    ulaw_frames = split_frames(caller_stream(n_frames * 0.02))[:n_frames]
    pcm_frames = [codec.ulaw_to_pcm16(f) for f in ulaw_frames]
    int16_frames = [np.frombuffer(p, dtype="<i2").astype(np.int16) for p in pcm_frames]
    return (codec_rows(ulaw_frames, pcm_frames, int16_frames)
            + resample_rows(pcm_frames, int16_frames)
            + framing_rows(ulaw_frames, n_frames))


def print_table(rows: list[Row], n_frames: int) -> None:
    print(f"Audio hot path, {n_frames} frames of 20 ms each; Python {sys.version.split()[0]}, "
          f"numpy {np.__version__}; audioop {'available' if audioop else 'missing'}")
    header = (f"{'operation (per 20 ms frame)':<40} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8} "
              f"{'frames/s/core':>14} {'vs audioop p50':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r.p50_us / r.audioop_p50_us:.2f}x" if r.audioop_p50_us else "-"
        print(f"{r.name:<40} {r.p50_us:>8.2f} {r.p99_us:>8.2f} {r.mean_us:>8.2f} "
              f"{r.frames_per_s:>14,.0f} {ratio:>15}")
    print("vs audioop: our p50 / audioop's p50 on the same frames (<1 is faster); ratecv has "
          "no anti-alias filter.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=50_000)
    args = parser.parse_args(argv)
    print_table(run(args.frames), args.frames)


if __name__ == "__main__":
    main()
