"""WAV files in and out: always mono PCM16 on our side.

Reading accepts what TTS vendors, recorders and test fixtures produce: PCM 8/16/24/32-bit,
IEEE float 32/64-bit, G.711 mu-law (format 7), WAVE_FORMAT_EXTENSIBLE, any channel count
(mixed down to mono). The stdlib `wave` module reads plain PCM; the other formats are
parsed here because `wave` rejects them (on 3.11 it also rejects EXTENSIBLE).
"""

from __future__ import annotations

import io
import os
import struct
import wave
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from engine.audio.codec import DECODE_TABLE
from engine.log import get_logger

log = get_logger(__name__)

PathLike = str | os.PathLike[str]

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class WavFormatError(ValueError):
    """The data is not a WAV file we can read."""


@dataclass(frozen=True, slots=True)
class _Format:
    tag: int
    channels: int
    sample_rate: int
    bits: int
    extensible: bool


def pcm16_to_wav_bytes(pcm16: bytes, sample_rate: int) -> bytes:
    """Mono PCM16 little-endian -> a complete WAV file in memory."""
    _check_pcm16(pcm16, sample_rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
    return buf.getvalue()


def write_wav(path: PathLike, pcm16: bytes, sample_rate: int) -> None:
    """Write mono PCM16 little-endian samples as a WAV file."""
    _check_pcm16(pcm16, sample_rate)
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)


def ulaw_to_wav_bytes(ulaw: bytes, sample_rate: int = 8000) -> bytes:
    """Mono G.711 mu-law -> a WAV file (format 7), half the size of PCM16 (recordings)."""
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    # Non-PCM formats carry an 18-byte fmt chunk (cbSize=0) and a fact chunk.
    fmt = struct.pack("<HHIIHHH", WAVE_FORMAT_MULAW, 1, sample_rate, sample_rate, 1, 8, 0)
    data_pad = b"\x00" if len(ulaw) % 2 else b""
    body = (b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"fact" + struct.pack("<II", 4, len(ulaw))
            + b"data" + struct.pack("<I", len(ulaw)) + ulaw + data_pad)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_ulaw_wav(path: PathLike, ulaw: bytes, sample_rate: int = 8000) -> None:
    """Write mono mu-law as a WAV file (format 7)."""
    with open(path, "wb") as f:
        f.write(ulaw_to_wav_bytes(ulaw, sample_rate))


def read_wav(path: PathLike) -> tuple[bytes, int]:
    """Read a WAV file -> (mono PCM16 little-endian bytes, sample rate)."""
    with open(path, "rb") as f:
        try:
            return _read(f)
        except WavFormatError as exc:
            log.warning("wav.unreadable", path=os.fspath(path), error=str(exc))
            raise WavFormatError(f"{os.fspath(path)}: {exc}") from None


def wav_bytes_to_pcm16(data: bytes) -> tuple[bytes, int]:
    """A WAV file in memory -> (mono PCM16 little-endian bytes, sample rate)."""
    try:
        return _read(io.BytesIO(data))
    except WavFormatError as exc:
        log.warning("wav.unreadable", nbytes=len(data), error=str(exc))
        raise


def _check_pcm16(pcm16: bytes, sample_rate: int) -> None:
    if len(pcm16) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")


def _read(f: BinaryIO) -> tuple[bytes, int]:
    start = f.tell()
    fmt, raw = _parse_riff(f)
    if fmt.tag == WAVE_FORMAT_PCM and not fmt.extensible:
        # Plain PCM: let the stdlib read it (it validates the header its own way).
        f.seek(start)
        try:
            with wave.open(f, "rb") as w:
                raw = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as exc:
            raise WavFormatError(f"bad PCM WAV: {exc}") from None
    samples = _decode(fmt, raw)
    return _mix_to_mono(samples, fmt.channels).astype("<i2", copy=False).tobytes(), \
        fmt.sample_rate


def _parse_riff(f: BinaryIO) -> tuple[_Format, bytes]:
    header = f.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        raise WavFormatError("not a RIFF/WAVE file")
    fmt: _Format | None = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            raise WavFormatError("no data chunk" if fmt else "no fmt chunk")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            body = f.read(size)
            if len(body) < 16:
                raise WavFormatError("fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            extensible = tag == WAVE_FORMAT_EXTENSIBLE
            if extensible:
                if len(body) < 26:
                    raise WavFormatError("EXTENSIBLE fmt chunk too short")
                tag = struct.unpack("<H", body[24:26])[0]  # first 2 bytes of SubFormat
            if channels < 1 or rate < 1:
                raise WavFormatError(f"bad fmt: {channels} channels at {rate} Hz")
            fmt = _Format(tag, channels, rate, bits, extensible)
        elif cid == b"data":
            if fmt is None:
                raise WavFormatError("data chunk before fmt chunk")
            # Streamed WAVs (e.g. from TTS APIs) may carry a placeholder size: read to EOF.
            raw = f.read(size) if size not in (0, 0xFFFFFFFF) else f.read()
            return fmt, raw
        else:
            f.seek(size + (size & 1), io.SEEK_CUR)
        if cid == b"fmt " and size & 1:
            f.seek(1, io.SEEK_CUR)


def _decode(fmt: _Format, raw: bytes) -> npt.NDArray[np.int16]:
    width = fmt.bits // 8 if fmt.bits % 8 == 0 else 0
    frame_bytes = width * fmt.channels
    if frame_bytes == 0:
        raise WavFormatError(f"unsupported sample size: {fmt.bits} bits")
    raw = raw[: len(raw) - len(raw) % frame_bytes]  # drop a torn last frame
    if fmt.tag == WAVE_FORMAT_MULAW and fmt.bits == 8:
        return DECODE_TABLE[np.frombuffer(raw, dtype=np.uint8)]
    if fmt.tag == WAVE_FORMAT_PCM:
        if width == 1:  # 8-bit WAV is unsigned
            return ((np.frombuffer(raw, dtype=np.uint8).astype(np.int16) - 128) << 8)
        if width == 2:
            return np.frombuffer(raw, dtype="<i2").astype(np.int16)
        if width == 3:
            b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
            return (b[:, 1].astype(np.uint16) | (b[:, 2].astype(np.uint16) << 8)).view(np.int16)
        if width == 4:
            return (np.frombuffer(raw, dtype="<i4") >> 16).astype(np.int16)
    if fmt.tag == WAVE_FORMAT_IEEE_FLOAT and width in (4, 8):
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8")
        return np.clip(np.rint(x * 32767.0), -32768, 32767).astype(np.int16)
    raise WavFormatError(f"unsupported WAV format tag 0x{fmt.tag:04x} with {fmt.bits} bits")


def _mix_to_mono(samples: npt.NDArray[np.int16], channels: int) -> npt.NDArray[np.int16]:
    if channels == 1:
        return samples
    mixed = samples.reshape(-1, channels).astype(np.int32).sum(axis=1) // channels
    return mixed.astype(np.int16)
