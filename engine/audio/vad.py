"""Voice activity detection and endpointing for 8 kHz caller audio, 20 ms at a time.

`VoiceActivityDetector` wraps webrtcvad (2-3 µs per frame, see
shared/reference/offline-stack.md). `Endpointer` turns its per-frame decisions into turns:

- a frame is voiced when webrtcvad says so *and* its level is above `min_level_dbfs`:
  webrtcvad keeps saying "speech" for ~100 ms after a loud sound has stopped (its own
  hangover), which would stretch a 100 ms click past `min_speech_ms`;
- start: at least `min_speech_ms` of voiced frames within the last `start_window_ms`
  (gaps tolerated), so clicks and short noises never open a turn;
- end: `endpoint_silence_ms` of silence after the last voiced frame, or `max_turn_ms`
  after the onset. A lone voiced frame in a pause (a click) does not reset the silence;
  two voiced frames in a row do;
- the utterance handed to STT runs from `preroll_ms` before the onset to `tail_ms` after
  the last voiced frame (webrtcvad misses weak final consonants; the tail keeps them).

All times are stream time (frames fed x 20 ms), never wall clock, so results are the same
whether audio arrives live or from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import webrtcvad

from engine.audio.codec import DECODE_TABLE, SAMPLE_RATE
from engine.audio.frames import FRAME_BYTES, FRAME_MS, FRAME_S, FRAME_SAMPLES
from engine.config import TurnConfig
from engine.log import get_logger

log = get_logger(__name__)

_PCM_FRAME_BYTES = FRAME_SAMPLES * 2
_DEFAULT_START_WINDOW_MS = 400


def _webrtc_vad(mode: int) -> webrtcvad.Vad:
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"VAD mode must be 0..3, got {mode!r}")
    return webrtcvad.Vad(mode)


class VoiceActivityDetector:
    """webrtcvad on one 20 ms 8 kHz PCM16 frame (bytes or an int16 array of 160 samples)."""

    __slots__ = ("_vad", "mode")

    def __init__(self, mode: int = 2) -> None:
        self.mode = mode
        self._vad = _webrtc_vad(mode)

    def is_speech(self, frame_pcm16: bytes | npt.NDArray[np.int16]) -> bool:
        if isinstance(frame_pcm16, np.ndarray):
            if frame_pcm16.dtype != np.int16 or frame_pcm16.size != FRAME_SAMPLES:
                raise ValueError(f"VAD frame must be {FRAME_SAMPLES} int16 samples, got "
                                 f"{frame_pcm16.size} {frame_pcm16.dtype}")
        elif len(frame_pcm16) != _PCM_FRAME_BYTES:
            raise ValueError(f"VAD frame must be {_PCM_FRAME_BYTES} bytes of PCM16, "
                             f"got {len(frame_pcm16)}")
        return bool(self._vad.is_speech(frame_pcm16, SAMPLE_RATE))


@dataclass(frozen=True, slots=True)
class EndpointerOptions:
    min_speech_ms: int = 200
    endpoint_silence_ms: int = 500
    max_turn_ms: int = 30_000
    preroll_ms: int = 200
    # Window in which min_speech_ms of voiced frames must fall; the difference is the
    # tolerance for unvoiced gaps (plosives, pauses between syllables).
    start_window_ms: int = _DEFAULT_START_WINDOW_MS
    tail_ms: int = 100
    # Frames quieter than this (RMS, dB full scale) are never speech.
    min_level_dbfs: float = -55.0

    def __post_init__(self) -> None:
        for name in ("min_speech_ms", "endpoint_silence_ms", "max_turn_ms", "start_window_ms"):
            if getattr(self, name) < FRAME_MS:
                raise ValueError(f"{name} must be at least {FRAME_MS} ms")
        for name in ("preroll_ms", "tail_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.start_window_ms < self.min_speech_ms:
            raise ValueError("start_window_ms must be >= min_speech_ms")

    @classmethod
    def from_turn_config(cls, turns: TurnConfig, **overrides: Any) -> EndpointerOptions:
        values: dict[str, Any] = {
            "min_speech_ms": turns.min_speech_ms,
            "endpoint_silence_ms": turns.endpoint_silence_ms,
            "max_turn_ms": round(turns.max_turn_seconds * 1000),
        }
        values["start_window_ms"] = max(_DEFAULT_START_WINDOW_MS, values["min_speech_ms"] + 200)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    at_s: float  # stream time of the first voiced frame of the turn
    detected_at_s: float  # stream time when the start was decided (end of the last frame)


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    at_s: float  # stream time when the end was decided
    # 8 kHz mono PCM16 LE: preroll + speech + tail (kept out of repr: it is large)
    utterance_pcm16: bytes = field(repr=False)
    speech_ms: int  # onset to the end of the last voiced frame
    trailing_silence_ms: int
    started_at_s: float
    # "complete": ended early because the words so far make a finished turn
    reason: Literal["silence", "max_turn", "complete"]


EndpointEvent = SpeechStarted | SpeechEnded


def _frames(ms: int) -> int:
    return -(-ms // FRAME_MS)  # ceil: a 210 ms option needs 11 frames, not 10


class Endpointer:
    """Turn detection on the caller's stream; feed every inbound 20 ms frame in order."""

    def __init__(self, options: EndpointerOptions | None = None, vad_mode: int = 2,
                 call_sid: str | None = None) -> None:
        self.options = options or EndpointerOptions()
        # The raw webrtcvad object: frames here are checked once, in feed*.
        self._vad = _webrtc_vad(vad_mode)
        self._log = log.bind(call_sid=call_sid) if call_sid else log
        o = self.options
        self._min_frames = _frames(o.min_speech_ms)
        self._window_frames = _frames(o.start_window_ms)
        self._preroll_frames = _frames(o.preroll_ms) if o.preroll_ms else 0
        self._tail_bytes = _frames(o.tail_ms) * _PCM_FRAME_BYTES if o.tail_ms else 0
        self._default_silence_frames = _frames(o.endpoint_silence_ms)
        self._silence_frames_to_end = self._default_silence_frames
        self._max_turn_frames = _frames(o.max_turn_ms)
        # Preallocated: the decoded frame, the recent-history ring (preroll + start
        # window), the start window's voiced flags; the utterance grows in a bytearray.
        self._pcm = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        self._pcm_float = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        # Sum of squares over a frame at min_level_dbfs RMS.
        self._min_energy = (10 ** (o.min_level_dbfs / 20) * 32768) ** 2 * FRAME_SAMPLES
        self._ring_frames = self._preroll_frames + self._window_frames
        self._ring = np.zeros((self._ring_frames, FRAME_SAMPLES), dtype=np.int16)
        self._window = bytearray(self._window_frames)
        self._utterance = bytearray()
        self._frames_fed = 0
        self._history_start = 0  # no preroll from before this frame (previous turn, reset)
        self._reset_turn_state()

    @classmethod
    def from_turn_config(cls, turns: TurnConfig, call_sid: str | None = None,
                         **overrides: Any) -> Endpointer:
        return cls(EndpointerOptions.from_turn_config(turns, **overrides),
                   vad_mode=turns.vad_mode, call_sid=call_sid)

    def _reset_turn_state(self) -> None:
        self._in_speech = False
        self._silence_frames_to_end = self._default_silence_frames
        self._window[:] = bytes(self._window_frames)
        self._window_voiced = 0
        self._onset = 0  # frame index of the turn's first voiced frame
        self._last_voiced = 0  # frame index of the last voiced frame counted as speech
        self._voiced_in_turn = 0
        self._silence_run = 0
        self._prev_voiced = False
        self._utterance_end = 0  # bytes of utterance up to the last voiced frame
        self._utterance.clear()

    def reset(self) -> None:
        """Forget any turn in progress and the recent history; the stream clock goes on."""
        self._reset_turn_state()
        self._history_start = self._frames_fed

    # --- state the session reads (barge-in) -------------------------------------------

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def speech_ms_so_far(self) -> int:
        """Time since the onset of the turn in progress (0 when not in speech)."""
        return (self._frames_fed - self._onset) * FRAME_MS if self._in_speech else 0

    @property
    def voiced_ms_so_far(self) -> int:
        """Voiced frames in the turn in progress, in ms (0 when not in speech)."""
        return self._voiced_in_turn * FRAME_MS if self._in_speech else 0

    @property
    def stream_time_s(self) -> float:
        return self._frames_fed * FRAME_S

    @property
    def frames_fed(self) -> int:
        return self._frames_fed

    @property
    def silence_ms_so_far(self) -> int:
        """Silence since the last voiced frame of the turn in progress (0: voiced now)."""
        return self._silence_run * FRAME_MS if self._in_speech else 0

    @property
    def utterance_bytes(self) -> int:
        """Length of the turn in progress's PCM16 so far (0 when not in speech)."""
        return len(self._utterance) if self._in_speech else 0

    def set_endpoint_silence(self, ms: int | None) -> None:
        """The silence that ends the turn in progress (None: the configured one). Read
        the words so far to choose (semantic endpointing); reset at each turn."""
        frames = _frames(ms) if ms is not None else self._default_silence_frames
        self._silence_frames_to_end = max(frames, 1)

    def end_now(self) -> SpeechEnded | None:
        """End the turn in progress at once (its words say it is complete); None when no
        turn is in progress."""
        if not self._in_speech:
            return None
        return self._end(self._frames_fed - 1, "complete")

    def utterance_since(self, offset: int) -> bytes:
        """The turn in progress's PCM16 (preroll included) from byte `offset` on: what a
        streaming recognizer has not heard yet (b"" when not in speech)."""
        return bytes(self._utterance[offset:]) if self._in_speech else b""

    # --- per-frame path -----------------------------------------------------------------

    def feed(self, ulaw_frame: bytes) -> EndpointEvent | None:
        """One 20 ms mu-law frame (160 bytes)."""
        if len(ulaw_frame) != FRAME_BYTES:
            self._log.warning("vad.bad_frame", nbytes=len(ulaw_frame), expected=FRAME_BYTES)
            raise ValueError(f"expected a {FRAME_BYTES}-byte mu-law frame, "
                             f"got {len(ulaw_frame)} bytes")
        # The method, not np.take: numpy's module-level wrapper costs ~1 us a frame.
        DECODE_TABLE.take(np.frombuffer(ulaw_frame, dtype=np.uint8), out=self._pcm)
        return self._step()

    def feed_pcm16(self, frame: bytes | npt.NDArray[np.int16]) -> EndpointEvent | None:
        """One 20 ms PCM16 frame (320 bytes LE, or 160 int16 samples)."""
        src = frame if isinstance(frame, np.ndarray) else np.frombuffer(frame, dtype="<i2")
        if src.size != FRAME_SAMPLES:
            self._log.warning("vad.bad_frame", samples=src.size, expected=FRAME_SAMPLES)
            raise ValueError(f"expected {FRAME_SAMPLES} PCM16 samples, got {src.size}")
        np.copyto(self._pcm, src, casting="same_kind")
        return self._step()

    def _step(self) -> EndpointEvent | None:
        idx = self._frames_fed
        self._frames_fed = idx + 1
        pcm = self._pcm
        # webrtcvad sees every frame (its noise model adapts on the quiet ones too).
        voiced = bool(self._vad.is_speech(pcm, SAMPLE_RATE))
        if voiced:
            np.copyto(self._pcm_float, pcm)
            voiced = float(np.dot(self._pcm_float, self._pcm_float)) >= self._min_energy
        self._ring[idx % self._ring_frames] = pcm
        event: EndpointEvent | None = None
        if not self._in_speech:
            slot = idx % self._window_frames
            self._window_voiced += voiced - self._window[slot]
            self._window[slot] = voiced
            if self._window_voiced >= self._min_frames:
                event = self._start(idx)
        else:
            self._utterance += pcm.data
            if voiced:
                self._voiced_in_turn += 1
            if voiced and self._prev_voiced:
                self._last_voiced = idx
                self._silence_run = 0
                self._utterance_end = len(self._utterance)
            else:
                self._silence_run += 1
            if self._silence_run >= self._silence_frames_to_end:
                event = self._end(idx, "silence")
            elif idx + 1 - self._onset >= self._max_turn_frames:
                event = self._end(idx, "max_turn")
        self._prev_voiced = voiced
        return event

    def _start(self, idx: int) -> SpeechStarted:
        w = self._window_frames
        onset = idx
        for k in range(max(0, idx - w + 1), idx + 1):
            if self._window[k % w]:
                onset = k
                break
        first = max(self._history_start, onset - self._preroll_frames,
                    idx - self._ring_frames + 1)
        utt = self._utterance
        for k in range(first, idx + 1):
            utt += self._ring[k % self._ring_frames].data
        self._in_speech = True
        self._onset = onset
        self._last_voiced = idx
        self._voiced_in_turn = self._window_voiced
        self._silence_run = 0
        self._utterance_end = len(utt)
        return SpeechStarted(at_s=onset * FRAME_S, detected_at_s=(idx + 1) * FRAME_S)

    def _end(self, idx: int, reason: Literal["silence", "max_turn", "complete"]
             ) -> SpeechEnded:
        keep = min(len(self._utterance), self._utterance_end + self._tail_bytes)
        del self._utterance[keep:]
        event = SpeechEnded(
            at_s=(idx + 1) * FRAME_S,
            utterance_pcm16=bytes(self._utterance),
            speech_ms=(self._last_voiced + 1 - self._onset) * FRAME_MS,
            trailing_silence_ms=self._silence_run * FRAME_MS,
            started_at_s=self._onset * FRAME_S,
            reason=reason,
        )
        self._reset_turn_state()
        self._history_start = idx + 1  # the next turn's preroll must not repeat this one
        return event
