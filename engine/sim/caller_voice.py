"""The simulated caller's voice: the neural voice, audibly not the agent's, or espeak.

By default a caller speaks with the Piper voice the engine also uses, at the caller's
own rate and pitch (`[providers.piper]` caller_length_scale, caller_pitch_semitones), so
the recognizer hears speech like a person's and a listener tells the two apart. Where
piper-tts or the voice wheel is not installed, it falls back to espeak-ng with the given
voice (robotic: Whisper tiny.en gets a third of its words wrong after the phone line).
One voice per setting is kept per process: every caller of a demo or a test shares it.
"""

from __future__ import annotations

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import AudioChunk, TextToSpeech
from engine.providers.builtin.tts_espeak import EspeakTTS
from engine.providers.builtin.tts_piper import PiperSettings, build_caller_voice, piper_settings
from engine.providers.registry import ProviderUnavailable

log = get_logger(__name__)

DEFAULT_ESPEAK_VOICE = "en-us+m3"
DEFAULT_RATE_WPM = 165

_voices: dict[str, TextToSpeech] = {}


def caller_voice(config: Config | None = None, *, espeak_voice: str = DEFAULT_ESPEAK_VOICE,
                 rate_wpm: int = DEFAULT_RATE_WPM) -> TextToSpeech:
    """The caller's voice: the neural one per `config` (its defaults without one), else
    espeak's `espeak_voice` at `rate_wpm`."""
    settings = piper_settings(config) if config is not None else PiperSettings()
    key = f"{settings.model_dump_json()}|{espeak_voice}|{rate_wpm}"
    voice = _voices.get(key)
    if voice is None:
        try:
            voice = build_caller_voice(settings)
        except ProviderUnavailable as exc:
            log.warning("sim.caller_voice_fallback", voice=espeak_voice, reason=exc.reason)
            voice = espeak_caller_voice(espeak_voice, rate_wpm)
        _voices[key] = voice
    return voice


def espeak_caller_voice(voice: str, rate_wpm: int = DEFAULT_RATE_WPM) -> TextToSpeech:
    """espeak's `voice` (a scenario may ask for one)."""
    key = f"espeak:{voice}:{rate_wpm}"
    found = _voices.get(key)
    if found is None:
        found = _voices[key] = EspeakTTS(voice=voice, rate_wpm=rate_wpm)
    return found


def voice_key(voice: TextToSpeech) -> str:
    """What the caller's speech cache keys a voice by."""
    return f"{voice.name}/{voice.model}/{voice.voice}"


async def speak(voice: TextToSpeech, text: str) -> bytes:
    """`text` in `voice`, whole, as mu-law 8 kHz."""
    parts = [event.ulaw async for event in voice.synthesize(text)
             if isinstance(event, AudioChunk)]
    return b"".join(parts)
