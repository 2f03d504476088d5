"""Provider interfaces: speech-to-text, agent (LLM or FAQ) and text-to-speech.

One small Protocol per kind; one module per provider implements it. Every call reports
what it used (`Usage`, priced later by the ledger) and how long it took (`Timing`),
taken from the provider's own response wherever it reports them.

Audio conventions: STT takes PCM16 little-endian mono at the rate given; TTS yields
mu-law 8 kHz (Twilio's format) so no conversion happens on the way out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

ProviderKind = Literal["stt", "llm", "tts"]


@dataclass(slots=True)
class Usage:
    """What one provider call consumed, in the units it is billed in."""

    provider: str  # "openai", "elevenlabs", "local_whisper", "espeak", "faq", ...
    kind: ProviderKind
    model: str
    audio_seconds: float = 0.0  # STT input audio
    input_tokens: int = 0  # LLM prompt tokens (including cached), or token-billed STT
    cached_input_tokens: int = 0
    output_tokens: int = 0
    characters: int = 0  # TTS input characters
    # True when the provider did not report the figure and we estimated it
    # (for example a stream cut before its usage chunk).
    estimated: bool = False


@dataclass(slots=True)
class Timing:
    """Seconds from the request to its first byte/token/audio, and to its end."""

    first_byte_s: float | None
    total_s: float


class ProviderError(Exception):
    """A provider call failed; `retryable` says whether a later call may succeed."""

    def __init__(self, provider: str, message: str, *, status: int | None = None,
                 retryable: bool = True) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status
        self.retryable = retryable


# --- speech-to-text ---------------------------------------------------------------


@dataclass(slots=True)
class TranscriptConfidence:
    """Confidence signals as the provider reports them (None when not reported)."""

    avg_logprob: float | None = None  # whisper segment average (< -1 is poor)
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    token_logprob_mean: float | None = None  # gpt-4o(-mini)-transcribe include=logprobs


@dataclass(slots=True)
class Transcript:
    text: str
    confidence: TranscriptConfidence
    usage: Usage
    timing: Timing


@runtime_checkable
class SpeechToText(Protocol):
    name: str

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        """Transcribe one utterance. Raises ProviderError on failure."""
        ...

    async def aclose(self) -> None: ...


# --- agent (LLM or FAQ) -------------------------------------------------------------


@dataclass(slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(slots=True)
class TextDelta:
    """A piece of the agent's answer, in order."""

    text: str


AgentAction = Literal["answer", "handoff", "goodbye", "unknown"]


@dataclass(slots=True)
class AgentDone:
    """The last event of a reply: what it cost, how long it took, what it implies."""

    usage: Usage
    timing: Timing
    action: AgentAction = "answer"
    # Identifies a reusable answer (FAQ entry id, or a normalized question) for the cache.
    cache_key: str | None = None


AgentEvent = TextDelta | AgentDone


@runtime_checkable
class Agent(Protocol):
    name: str

    def respond(self, messages: list[ChatMessage]) -> AsyncIterator[AgentEvent]:
        """Stream the reply to the conversation so far; the last event is AgentDone.

        Closing the iterator early (barge-in) must stop the work promptly.
        Raises ProviderError before the first delta when the provider fails.
        """
        ...

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        """A short summary of older turns, used to keep the context bounded."""
        ...

    async def aclose(self) -> None: ...


# --- text-to-speech -----------------------------------------------------------------


@dataclass(slots=True)
class AudioChunk:
    """mu-law 8 kHz mono bytes, any length."""

    ulaw: bytes


@dataclass(slots=True)
class SynthesisDone:
    usage: Usage
    timing: Timing


SynthesisEvent = AudioChunk | SynthesisDone


@runtime_checkable
class TextToSpeech(Protocol):
    name: str
    voice: str  # part of the audio cache key

    def synthesize(self, text: str) -> AsyncIterator[SynthesisEvent]:
        """Stream mu-law 8 kHz audio for `text`; the last event is SynthesisDone.

        Closing the iterator early (barge-in) must stop the work promptly.
        Raises ProviderError before the first chunk when the provider fails.
        """
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class ProviderHealth:
    """What the fallback chain reports about one provider."""

    name: str
    kind: ProviderKind
    healthy: bool
    consecutive_failures: int = 0
    last_error: str | None = None
    open_until: float | None = None  # circuit breaker open until (monotonic seconds)
    extra: dict[str, str] = field(default_factory=dict)
