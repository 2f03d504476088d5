"""20 ms framing of 8 kHz mu-law audio, the unit Twilio Media Streams carries.

Every inbound payload passes through `FrameAssembler.push` (the media stream re-frames
whatever size Twilio sends), so the common case (one whole frame, nothing pending) returns
the same object without a copy. Outbound framing lives in `telephony/outbound.py`, where
marks sit between frames at byte positions.
"""

from __future__ import annotations

from engine.audio.codec import SAMPLE_RATE, ULAW_SILENCE

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
FRAME_BYTES = FRAME_SAMPLES  # mu-law: one byte per sample

_SILENCE_FRAME = bytes([ULAW_SILENCE]) * FRAME_BYTES

BytesLike = bytes | bytearray | memoryview


class FrameAssembler:
    """Cut a stream of mu-law chunks of any size into whole 160-byte frames.

    The remainder of a chunk is kept until the next `push`; `flush` emits it at the end
    of the stream, padded with mu-law silence.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def push(self, data: BytesLike) -> list[bytes]:
        """Add a chunk; return the whole frames now available (possibly none)."""
        n = len(data)
        pending = self._pending
        if not pending and n == FRAME_BYTES and type(data) is bytes:
            return [data]  # the usual case: one frame in, the same object out
        frames: list[bytes] = []
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else None
        pos = 0
        if pending:
            need = FRAME_BYTES - len(pending)
            if n < need:
                pending += data
                return frames
            pending += data[:need] if view is None else view[:need]
            frames.append(bytes(pending))
            pending.clear()
            pos = need
        end = pos + (n - pos) // FRAME_BYTES * FRAME_BYTES
        if view is None:
            assert isinstance(data, bytes)
            frames.extend([data[i:i + FRAME_BYTES] for i in range(pos, end, FRAME_BYTES)])
            if end < n:
                pending += memoryview(data)[end:]
        else:
            frames.extend([bytes(view[i:i + FRAME_BYTES]) for i in range(pos, end, FRAME_BYTES)])
            if end < n:
                pending += view[end:]
        return frames

    def flush(self, pad: bool = True) -> bytes | None:
        """Emit the partial frame left over (padded with silence unless `pad` is False)."""
        if not self._pending:
            return None
        tail = bytes(self._pending)
        self._pending.clear()
        if pad:
            tail += _SILENCE_FRAME[len(tail):]
        return tail

    def clear(self) -> None:
        """Drop the partial frame (e.g. when playback is interrupted)."""
        self._pending.clear()


def split_frames(ulaw: BytesLike) -> list[bytes]:
    """Split a whole mu-law buffer into 160-byte frames, the last one padded with silence."""
    assembler = FrameAssembler()
    frames = assembler.push(ulaw)
    tail = assembler.flush(pad=True)
    if tail is not None:
        frames.append(tail)
    return frames


def frame_duration_s(nbytes: int) -> float:
    """Play time of `nbytes` of 8 kHz mu-law."""
    return nbytes / SAMPLE_RATE
