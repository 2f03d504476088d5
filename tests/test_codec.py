"""mu-law codec: bit-exact with audioop on every input, and with the G.711 formula."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from engine.audio import codec

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # 3.13+ without audioop-lts
        audioop = None  # type: ignore[assignment]

needs_audioop = pytest.mark.skipif(audioop is None, reason="neither audioop nor audioop-lts")

ALL_CODES = bytes(range(256))
ALL_PCM16 = np.arange(-32768, 32768, dtype="<i2").tobytes()


def g711_ulaw_decode(code: int) -> int:
    """ITU-T G.711 mu-law expansion, written out per code (independent of the numpy tables)."""
    u = ~code & 0xFF
    sign = -1 if u & 0x80 else 1
    exponent = (u >> 4) & 0x7
    mantissa = u & 0xF
    magnitude = ((2 * mantissa + 33) << (exponent + 2)) - 132
    return sign * magnitude


@needs_audioop
def test_decode_matches_audioop_for_every_code() -> None:
    assert audioop is not None
    assert codec.ulaw_to_pcm16(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


@needs_audioop
def test_encode_matches_audioop_for_every_int16() -> None:
    assert audioop is not None
    assert codec.pcm16_to_ulaw(ALL_PCM16) == audioop.lin2ulaw(ALL_PCM16, 2)


def test_decode_matches_g711_formula_for_every_code() -> None:
    expected = [g711_ulaw_decode(c) for c in range(256)]
    assert codec.ulaw_to_int16(ALL_CODES).tolist() == expected


@pytest.mark.parametrize(("code", "value"), [(0x00, -32124), (0x80, 32124), (0xFF, 0),
                                             (0x7F, 0), (0xFE, 8), (0x7E, -8), (0xEF, 132)])
def test_known_g711_values(code: int, value: int) -> None:
    assert g711_ulaw_decode(code) == value  # the reference formula itself
    assert int(codec.ulaw_to_int16(bytes([code]))[0]) == value


def test_encode_extremes_and_silence() -> None:
    # CPython drops the 2 low bits with an arithmetic shift, so -1 becomes -1 >> 2 == -1
    # and encodes as the smallest negative level (0x7E), while +1 encodes as zero.
    pcm = np.array([0, 32767, -32768, 1, -1], dtype=np.int16)
    assert codec.int16_to_ulaw(pcm) == bytes([0xFF, 0x80, 0x00, 0xFF, 0x7E])
    assert codec.ULAW_SILENCE == 0xFF


def test_every_code_round_trips_except_negative_zero() -> None:
    decoded = codec.ulaw_to_int16(ALL_CODES)
    reencoded = codec.int16_to_ulaw(decoded)
    for c in range(256):
        # 0x7F decodes to 0, which encodes as the positive zero 0xFF.
        assert reencoded[c] == (0xFF if c == 0x7F else c), hex(c)


def test_pcm_round_trip_error_is_logarithmic() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    back = codec.ulaw_to_int16(codec.int16_to_ulaw(pcm)).astype(np.int32)
    error = np.abs(back - pcm.astype(np.int32))
    # mu-law keeps a roughly constant relative error: the step doubles per segment
    # (8 at the bottom, 1024 at the top); 5% + 12 LSB bounds it everywhere, clipping
    # at 32124 included.
    magnitude = np.abs(pcm.astype(np.int32))
    assert np.all(error <= 12 + magnitude // 20)
    assert error[magnitude < 100].max() <= 8
    # Monotonic: a louder input never decodes quieter.
    assert np.all(np.diff(back) >= 0)


def test_odd_length_pcm_raises() -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        codec.pcm16_to_ulaw(b"\x00\x01\x02")


def test_wrong_dtype_raises_instead_of_encoding_garbage() -> None:
    with pytest.raises(TypeError):
        codec.int16_to_ulaw(np.zeros(160, dtype=np.int32))


def test_bytes_and_array_apis_agree() -> None:
    rng = np.random.default_rng(7)
    ulaw = rng.integers(0, 256, 1600, dtype=np.uint8).tobytes()
    assert codec.ulaw_to_pcm16(ulaw) == codec.ulaw_to_int16(ulaw).astype("<i2").tobytes()
    pcm = codec.ulaw_to_pcm16(ulaw)
    assert codec.pcm16_to_ulaw(pcm) == codec.int16_to_ulaw(np.frombuffer(pcm, dtype="<i2"))
