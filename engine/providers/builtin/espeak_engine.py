"""Process-wide espeak-ng, loaded with ctypes from the espeakng-loader wheel.

libespeak-ng keeps global state and is not thread-safe, so every call into it runs on
one dedicated worker thread owned by `EspeakEngine`, one request at a time. Synthesis
is synchronous (AUDIO_OUTPUT_SYNCHRONOUS): `espeak_Synth` calls our callback with
22,050 Hz samples on that same thread and returns when the text is spoken.

Voices are given as `language[+variant]` ("en-us", "en-gb+f3") or as an espeak voice
identifier ("gmw/en-US"). A language is resolved to the best-priority voice that speaks
it, because espeak_SetVoiceByName only knows identifiers ("en-gb" is not one).
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import espeakng_loader
import numpy as np
import numpy.typing as npt

from engine.audio.codec import SAMPLE_RATE as ULAW_RATE
from engine.audio.codec import int16_to_ulaw
from engine.audio.resample import resample
from engine.log import get_logger
from engine.providers.base import ProviderError

log = get_logger(__name__)

PROVIDER = "espeak"
MIN_RATE_WPM = 80  # espeak-ng's documented speaking-rate range
MAX_RATE_WPM = 450

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_EE_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    # espeak_VOICE from speak_lib.h
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated language)* then 0
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class EspeakEngine:
    """The one libespeak-ng of this process; all methods are safe to call from any task."""

    def __init__(self) -> None:
        # One thread: the library must never be entered concurrently.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        self._lib: ctypes.CDLL | None = None
        self._sample_rate = 0
        self._data_path = Path(espeakng_loader.get_data_path())
        self._languages: dict[str, tuple[int, str]] = {}  # language -> (priority, identifier)
        self._resolved: dict[str, str] = {}  # requested voice -> name given to espeak
        self._current_voice: str | None = None
        self._current_rate: int | None = None
        # Filled by the callback during one espeak_Synth call (worker thread only).
        self._pieces: list[npt.NDArray[np.int16]] = []
        self._abort: threading.Event | None = None
        # Kept referenced: the library holds a raw pointer to it.
        self._callback = _SynthCallback(self._on_samples)

    # --- public, async --------------------------------------------------------------

    async def synthesize_pcm(self, text: str, voice: str,
                             rate_wpm: int) -> tuple[npt.NDArray[np.int16], int]:
        """Speak `text`; returns int16 mono samples and their sample rate (22,050 Hz)."""
        abort = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._synthesize_sync, text,
                                              voice, rate_wpm, abort)
        except asyncio.CancelledError:
            # The worker may be mid-synthesis: make the callback stop it.
            abort.set()
            raise

    async def synthesize_ulaw8k(self, text: str, voice: str, rate_wpm: int) -> bytes:
        """Speak `text` as mu-law 8 kHz (Twilio's format), anti-aliased by soxr."""
        samples, rate = await self.synthesize_pcm(text, voice, rate_wpm)
        if samples.size == 0:
            return b""
        return int16_to_ulaw(resample(samples, rate, ULAW_RATE))

    async def sample_rate(self) -> int:
        """The library's output rate (initializes it if needed)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._ensure_initialized)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- worker thread only ---------------------------------------------------------

    def _ensure_initialized(self) -> int:
        if self._lib is not None:
            return self._sample_rate
        lib_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise ProviderError(PROVIDER, f"cannot load {lib_path}: {exc}",
                                retryable=False) from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))

        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     str(self._data_path).encode(), 0)
        if rate <= 0:
            raise ProviderError(PROVIDER, f"espeak_Initialize failed ({rate}) with data at "
                                f"{self._data_path}", retryable=False)
        lib.espeak_SetSynthCallback(self._callback)
        self._languages = _list_languages(lib)
        self._lib = lib
        self._sample_rate = rate
        log.info("espeak_initialized", sample_rate=rate, voices=len(self._languages))
        return rate

    def _on_samples(self, wav: ctypes._Pointer[ctypes.c_short] | None, count: int,
                    _events: int | None) -> int:
        if self._abort is not None and self._abort.is_set():
            return 1  # non-zero tells espeak to stop this synthesis
        if wav and count > 0:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).astype(np.int16))
        return 0

    def _select_voice(self, voice: str) -> None:
        name = self._resolved.get(voice)
        if name is None:
            base, _, variant = voice.strip().partition("+")
            if not base:
                raise ProviderError(PROVIDER, f"empty voice name {voice!r}", retryable=False)
            if variant and ("/" in variant or "\\" in variant or ".." in variant):
                raise ProviderError(PROVIDER, f"invalid voice variant {variant!r}",
                                    retryable=False)
            if variant and not (self._data_path / "voices" / "!v" / variant).is_file():
                # espeak silently ignores unknown variants; a typo should be loud.
                raise ProviderError(PROVIDER, f"unknown voice variant {variant!r} in "
                                    f"{voice!r}", retryable=False)
            known = self._languages.get(base.lower())
            name = known[1] if known else base
            if variant:
                name = f"{name}+{variant}"
        if name == self._current_voice:
            return
        assert self._lib is not None
        if self._lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
            self._current_voice = None  # do not trust what espeak kept
            raise ProviderError(PROVIDER, f"unknown voice {voice!r}", retryable=False)
        self._resolved[voice] = name
        self._current_voice = name
        self._current_rate = None  # a new voice resets the rate

    def _synthesize_sync(self, text: str, voice: str, rate_wpm: int,
                         abort: threading.Event) -> tuple[npt.NDArray[np.int16], int]:
        rate = self._ensure_initialized()
        assert self._lib is not None
        if not MIN_RATE_WPM <= rate_wpm <= MAX_RATE_WPM:
            raise ProviderError(PROVIDER, f"rate_wpm {rate_wpm} outside "
                                f"{MIN_RATE_WPM}..{MAX_RATE_WPM}", retryable=False)
        self._select_voice(voice)
        # NUL would end the C string early; other text is espeak's to pronounce.
        clean = text.replace("\x00", " ").strip()
        if not clean or abort.is_set():  # nothing to say, or cancelled while queued
            return np.zeros(0, dtype=np.int16), rate
        if self._current_rate != rate_wpm:
            self._lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
            self._current_rate = rate_wpm
        encoded = ctypes.create_string_buffer(clean.encode("utf-8", "replace"))
        self._pieces = []
        self._abort = abort
        try:
            status = self._lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0,
                                            _ESPEAK_CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
        finally:
            pieces, self._pieces, self._abort = self._pieces, [], None
        if status != _EE_OK:
            raise ProviderError(PROVIDER, f"espeak_Synth failed ({status})")
        if not pieces:
            return np.zeros(0, dtype=np.int16), rate
        return np.concatenate(pieces), rate


def _list_languages(lib: ctypes.CDLL) -> dict[str, tuple[int, str]]:
    """language code -> (priority, voice identifier), keeping the best priority."""
    best: dict[str, tuple[int, str]] = {}
    voices = lib.espeak_ListVoices(None)
    index = 0
    while voices[index]:
        voice = voices[index].contents
        index += 1
        if not voice.identifier or not voice.languages:
            continue
        identifier = voice.identifier.decode("utf-8", "replace")
        address = voice.languages
        while True:
            priority = ctypes.c_ubyte.from_address(address).value
            if priority == 0:
                break
            language = ctypes.string_at(address + 1)
            address += 2 + len(language)
            code = language.decode("utf-8", "replace").lower()
            if code not in best or priority < best[code][0]:
                best[code] = (priority, identifier)
    return best


_engine: EspeakEngine | None = None
_engine_lock = threading.Lock()


def get_espeak() -> EspeakEngine:
    """The process-wide espeak engine (the library has one global state)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = EspeakEngine()
        return _engine
