"""The calls bench's pacing figures, from the times frames arrived (at a caller) or left
(the engine's socket writes): jitter within talk spurts, and the late frames and silence
of a real-time playout buffer, as Twilio plays them. What each figure means is in
bench/README.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.audio.frames import FRAME_S

SPURT_GAP_S = 0.100  # a longer silence between frames starts a new talk spurt


@dataclass
class CallFigures:
    jitter_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    steady_jitter_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    late_frames: int = 0
    underruns: int = 0
    silence_ms: float = 0.0
    spurts: int = 0

    def summary(self, calls: int) -> dict[str, Any]:
        jitter = np.concatenate(self.jitter_ms) if self.jitter_ms else np.array([])
        steady = np.concatenate(self.steady_jitter_ms) if self.steady_jitter_ms else np.array([])
        return {
            "jitter_ms": {"p50": pct(jitter, 50), "p99": pct(jitter, 99),
                          "max": round(float(jitter.max()), 2) if len(jitter) else None,
                          "samples": len(jitter)},
            "steady_jitter_ms": {"p50": pct(steady, 50), "p99": pct(steady, 99),
                                 "max": round(float(steady.max()), 2) if len(steady) else None},
            "late_frames": self.late_frames, "silence_ms": round(self.silence_ms, 1),
            "spurts_per_call": round(self.spurts / max(1, calls), 2),
        }


def analyse_arrivals(arrivals: list[float], lead_frames: int, window: tuple[float, float],
                     fig: CallFigures) -> None:
    """Jitter within talk spurts, and underruns of a real-time playout buffer."""
    if not arrivals:
        return
    a = np.asarray(arrivals)
    gaps = np.diff(a)
    # Index of each frame within its talk spurt; a new spurt starts after a long gap.
    new_spurt = np.concatenate(([True], gaps > SPURT_GAP_S))
    spurt_id = np.cumsum(new_spurt) - 1
    spurt_start = np.flatnonzero(new_spurt)
    index_in_spurt = np.arange(len(a)) - spurt_start[spurt_id]
    fig.spurts += len(spurt_start)
    # Gap i is between frames i and i+1; it counts unless frame i+1 is in the lead burst.
    counted = index_in_spurt[1:] > lead_frames
    jitter = np.abs(gaps[counted] - FRAME_S) * 1000
    fig.jitter_ms.append(jitter)
    in_window = (a[1:][counted] >= window[0]) & (a[1:][counted] <= window[1])
    fig.steady_jitter_ms.append(jitter[in_window])
    # Playout as Twilio does it: frames play back to back from the first arrival; a frame
    # arriving after its slot has begun is late (the caller heard a gap), and playback
    # restarts from it.
    base = float(a[0])
    k = 0
    for t in a[1:]:
        k += 1
        due = base + k * FRAME_S
        if t > due:
            fig.late_frames += 1
            fig.underruns += 1
            fig.silence_ms += (t - due) * 1000
            base, k = float(t), 0


def pct(values: npt.NDArray[np.float64], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")
