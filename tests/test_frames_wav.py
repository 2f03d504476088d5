"""20 ms framing and WAV in/out."""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.audio import codec
from engine.audio.frames import (
    FRAME_BYTES,
    FRAME_MS,
    FrameAssembler,
    frame_duration_s,
    split_frames,
)
from engine.audio.wav import (
    WavFormatError,
    pcm16_to_wav_bytes,
    read_wav,
    ulaw_to_wav_bytes,
    wav_bytes_to_pcm16,
    write_ulaw_wav,
    write_wav,
)

RNG = np.random.default_rng(1234)


def random_bytes(n: int) -> bytes:
    return RNG.integers(0, 256, n, dtype=np.uint8).tobytes()


# --- framing -------------------------------------------------------------------------------

def test_constants() -> None:
    assert (FRAME_MS, FRAME_BYTES) == (20, 160)
    assert frame_duration_s(FRAME_BYTES) == pytest.approx(0.02)
    assert frame_duration_s(8000) == pytest.approx(1.0)


def test_random_chunks_reassemble_exactly() -> None:
    stream = random_bytes(10_007)
    assembler = FrameAssembler()
    frames: list[bytes] = []
    pos = 0
    for size in RNG.integers(0, 700, 200):
        chunk = stream[pos:pos + int(size)]
        pos += len(chunk)
        frames += assembler.push(chunk)
        assert all(len(f) == FRAME_BYTES for f in frames)
        assert assembler.pending_bytes == pos % FRAME_BYTES
    frames += assembler.push(stream[pos:])
    assert len(frames) == len(stream) // FRAME_BYTES
    assert b"".join(frames) == stream[: len(frames) * FRAME_BYTES]
    assert assembler.pending_bytes == len(stream) % FRAME_BYTES  # 87
    tail = assembler.flush()
    assert tail is not None and len(tail) == FRAME_BYTES
    assert tail[:87] == stream[-87:]
    assert tail[87:] == bytes([codec.ULAW_SILENCE]) * (FRAME_BYTES - 87)
    assert assembler.pending_bytes == 0
    assert assembler.flush() is None


def test_flush_without_padding_returns_the_raw_remainder() -> None:
    assembler = FrameAssembler()
    assert assembler.push(b"\x01" * 50) == []
    assert assembler.flush(pad=False) == b"\x01" * 50
    assert assembler.flush(pad=False) is None


def test_whole_frame_fast_path_returns_the_same_object() -> None:
    frame = random_bytes(FRAME_BYTES)
    assert FrameAssembler().push(frame)[0] is frame


def test_bytearray_and_memoryview_inputs() -> None:
    data = random_bytes(500)
    assembler = FrameAssembler()
    frames = assembler.push(bytearray(data[:100])) + assembler.push(memoryview(data)[100:])
    assert [type(f) for f in frames] == [bytes, bytes, bytes]
    assert b"".join(frames) == data[:480]
    assert assembler.pending_bytes == 20


def test_clear_drops_the_partial_frame() -> None:
    assembler = FrameAssembler()
    assembler.push(b"\x00" * 30)
    assembler.clear()
    assert assembler.pending_bytes == 0
    assert assembler.push(b"\x02" * FRAME_BYTES) == [b"\x02" * FRAME_BYTES]


def test_split_frames_pads_only_the_last() -> None:
    data = random_bytes(400)
    frames = split_frames(data)
    assert [len(f) for f in frames] == [160, 160, 160]
    assert b"".join(frames)[:400] == data
    assert frames[-1][80:] == b"\xff" * 80
    assert split_frames(data[:320]) == [data[:160], data[160:320]]
    assert split_frames(b"") == []


# --- WAV -----------------------------------------------------------------------------------

def test_pcm16_wav_round_trip(tmp_path: Path) -> None:
    pcm = RNG.integers(-32768, 32768, 4001, dtype=np.int16).astype("<i2").tobytes()
    path = tmp_path / "a.wav"
    write_wav(path, pcm, 16000)
    assert read_wav(path) == (pcm, 16000)
    with wave.open(str(path), "rb") as w:  # a plain, standard file
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)


def test_pcm16_to_wav_bytes_is_readable_by_the_stdlib() -> None:
    pcm = RNG.integers(-32768, 32768, 800, dtype=np.int16).astype("<i2").tobytes()
    data = pcm16_to_wav_bytes(pcm, 8000)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data), "rb") as w:
        assert w.getframerate() == 8000
        assert w.readframes(w.getnframes()) == pcm
    assert wav_bytes_to_pcm16(data) == (pcm, 8000)


def test_stereo_is_mixed_down(tmp_path: Path) -> None:
    left = np.array([1000, -2000, 32767, -32768], dtype=np.int16)
    right = np.array([3000, 2000, 32767, -32768], dtype=np.int16)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(np.column_stack([left, right]).astype("<i2").tobytes())
    pcm, rate = read_wav(path)
    assert rate == 22050
    assert np.frombuffer(pcm, dtype="<i2").tolist() == [2000, 0, 32767, -32768]


def test_8bit_unsigned_wav(tmp_path: Path) -> None:
    path = tmp_path / "u8.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128, 255, 0, 192]))
    pcm, _ = read_wav(path)
    assert np.frombuffer(pcm, dtype="<i2").tolist() == [0, 127 << 8, -32768, 64 << 8]


def test_mulaw_wav_round_trip(tmp_path: Path) -> None:
    ulaw = random_bytes(1601)  # odd: exercises the RIFF pad byte
    data = ulaw_to_wav_bytes(ulaw)
    # Header fields a player relies on: format tag 7, 1 channel, 8 kHz, 8 bits.
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", data[20:36])
    assert (tag, channels, rate, byte_rate, align, bits) == (7, 1, 8000, 8000, 1, 8)
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert wav_bytes_to_pcm16(data) == (codec.ulaw_to_pcm16(ulaw), 8000)
    path = tmp_path / "mulaw.wav"
    write_ulaw_wav(path, ulaw)
    assert read_wav(path) == (codec.ulaw_to_pcm16(ulaw), 8000)


def _riff(fmt_body: bytes, payload: bytes, extra_chunk: bytes = b"") -> bytes:
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body + extra_chunk
            + b"data" + struct.pack("<I", len(payload)) + payload)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_float32_wav_with_extra_chunk() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.5, -1.5], dtype="<f4")
    fmt = struct.pack("<HHIIHHH", 3, 1, 24000, 96000, 4, 32, 0)
    data = _riff(fmt, x.tobytes(), extra_chunk=b"LIST" + struct.pack("<I", 3) + b"abc\x00")
    pcm, rate = wav_bytes_to_pcm16(data)
    assert rate == 24000
    assert np.frombuffer(pcm, dtype="<i2").tolist() == [0, 16384, -16384, 32767, -32768]


def test_extensible_24bit_stereo_wav() -> None:
    samples = [(0x123456, -0x100000), (0x7FFFFF, -0x800000)]
    raw = b"".join(v.to_bytes(3, "little", signed=True) for pair in samples for v in pair)
    pcm_guid = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 48000, 48000 * 6, 6, 24, 22, 24, 3) + pcm_guid
    pcm, rate = wav_bytes_to_pcm16(_riff(fmt, raw))
    assert rate == 48000
    # top 16 bits of each 24-bit sample, then the channel average
    assert np.frombuffer(pcm, dtype="<i2").tolist() == [(0x1234 - 0x1000) // 2,
                                                        (0x7FFF - 0x8000) // 2]


def test_bad_input_raises_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WavFormatError, match="not a RIFF/WAVE"):
        wav_bytes_to_pcm16(b"ID3\x03 not a wav at all")
    alaw = _riff(struct.pack("<HHIIHHH", 6, 1, 8000, 8000, 1, 8, 0), b"\x55" * 10)
    with pytest.raises(WavFormatError, match="0x0006"):
        wav_bytes_to_pcm16(alaw)
    truncated = pcm16_to_wav_bytes(b"\x00\x00" * 10, 8000)[:30]
    with pytest.raises(WavFormatError):
        wav_bytes_to_pcm16(truncated)
    path = tmp_path / "bad.wav"
    path.write_bytes(b"RIFF")
    with pytest.raises(WavFormatError, match=r"bad\.wav"):
        read_wav(path)
    with pytest.raises(ValueError, match="even"):
        pcm16_to_wav_bytes(b"\x00", 8000)
    assert issubclass(WavFormatError, ValueError)
