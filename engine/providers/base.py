"""Provider interfaces: speech-to-text, agent (LLM or FAQ) and text-to-speech.

One small Protocol per kind; one module per provider implements it (and declares it in
`engine.providers.registry`). Every call reports what it used (`Usage`, priced later by
the ledger) and how long it took (`Timing`), taken from the provider's own response
wherever it reports them. Each provider also says which model it runs (`model`), may
load or connect ahead of the first call (`warm_up`), and releases what it holds
(`aclose`). Fallback chains and the audio cache are providers of their kind too.

Audio conventions: STT takes PCM16 little-endian mono at the rate given; TTS yields
mu-law 8 kHz (Twilio's format) so no conversion happens on the way out.

Billing: a provider reports its usage in its result or last event, and books nothing
itself (the chains do, `engine.providers.chain`). A request the caller stops waiting for
is read on in the background until that report arrives, so a provider must not cut its
own request short of the chain's deadline plus `providers.drain_timeout_s`
(`ProvidersConfig.request_deadline_s`; a cloud provider bounds and times its first byte
with `engine.providers.first_byte`). A provider that runs on our own CPU says
`runs_locally = True`: its abandoned requests are closed at once instead, saving the
work (a cloud provider says False).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

ProviderKind = Literal["stt", "llm", "tts"]
# The provider suffix cache hits were once reported under ("<provider>:cache"); cache hits
# now say `Usage.cached`.
CACHE_SUFFIX = ":cache"


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
    # CPU seconds a local model spent on the request (priced at prices.cpu_second, if set).
    cpu_seconds: float = 0.0
    # True when the provider did not report the figure and we estimated it
    # (for example a stream cut before its usage chunk).
    estimated: bool = False
    # Served from the response cache (replayed audio, a cached answer): nothing was
    # consumed and nothing is billed; the line is kept so the bill says so.
    cached: bool = False


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

    @classmethod
    def from_whisper_segments(cls, segments: Sequence[Any]) -> TranscriptConfidence:
        """Whisper's per-segment signals folded into one utterance.

        avg_logprob is weighted by segment duration; no_speech_prob and compression_ratio
        take the worst segment, since one hallucinated segment spoils the utterance.
        """
        if not segments:
            return cls()
        durations = [max(float(s.end) - float(s.start), 0.0) for s in segments]
        weights = durations if sum(durations) > 0 else [1.0] * len(segments)
        avg_logprob = (sum(w * float(s.avg_logprob)
                           for w, s in zip(weights, segments, strict=True)) / sum(weights))
        return cls(avg_logprob=avg_logprob,
                   no_speech_prob=max(float(s.no_speech_prob) for s in segments),
                   compression_ratio=max(float(s.compression_ratio) for s in segments))


@dataclass(slots=True)
class Transcript:
    text: str
    confidence: TranscriptConfidence
    usage: Usage
    timing: Timing


@runtime_checkable
class SpeechToText(Protocol):
    name: str
    runs_locally: bool  # on our own CPU: an abandoned request is closed, not read on

    @property
    def model(self) -> str:
        """The model as reported in Usage."""
        ...

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        """Transcribe one utterance. Raises ProviderError on failure."""
        ...

    async def warm_up(self) -> None:
        """Load models or open connections before the first call (idempotent)."""
        ...

    async def aclose(self) -> None: ...


class SpeechStream(Protocol):
    """One caller utterance, heard while it is spoken (a streaming provider's session).

    `push` never blocks (audio is queued and sent by the stream's own task); `finish`
    says the utterance is over and returns its final transcript, which a streaming
    provider has mostly ready by then. Raises ProviderError from `finish` when the
    provider failed at any point (the caller then falls back to a batch transcription
    of the audio it kept). `aclose` abandons the stream (no transcript wanted).
    """

    def push(self, pcm16: bytes) -> None: ...

    async def finish(self) -> Transcript: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingSpeechToText(SpeechToText, Protocol):
    """A speech-to-text provider that can also hear an utterance as it arrives."""

    def open_stream(self, sample_rate: int) -> SpeechStream:
        """A stream for one utterance of PCM16 at `sample_rate`; connects in the
        background (no I/O before the first `push` returns)."""
        ...


# --- agent (LLM or FAQ) -------------------------------------------------------------


@dataclass(slots=True)
class ToolSpec:
    """A tool the agent may call: what the model is told about it (function calling)."""

    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema for the arguments object


@dataclass(slots=True)
class ToolCallRequest:
    """The agent asks for a tool to be run; `arguments` is JSON text as the model wrote it
    (not yet validated). Yielded before the reply's `AgentDone`."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChatMessage:
    """One message of the conversation. An assistant message may carry the tool calls it
    asked for; a "tool" message carries one tool's result (`tool_call_id`)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str = ""


@dataclass(slots=True)
class TextDelta:
    """A piece of the agent's answer, in order."""

    text: str


AgentAction = Literal["answer", "handoff", "goodbye", "unknown", "tool_calls"]


@dataclass(slots=True)
class AgentDone:
    """The last event of a reply: what it cost, how long it took, what it implies."""

    usage: Usage
    timing: Timing
    action: AgentAction = "answer"
    # Identifies a reusable answer (FAQ entry id, or a normalized question) for the cache.
    cache_key: str | None = None
    # The provider failed mid-stream: the reply is cut and its usage estimated.
    truncated: bool = False


AgentEvent = TextDelta | ToolCallRequest | AgentDone


@runtime_checkable
class Agent(Protocol):
    name: str
    runs_locally: bool  # on our own CPU: an abandoned request is closed, not read on

    @property
    def model(self) -> str: ...

    def respond(self, messages: list[ChatMessage],
                tools: Sequence[ToolSpec] = ()) -> AsyncGenerator[AgentEvent, None]:
        """Stream the reply to the conversation so far; the last event is AgentDone.

        With `tools`, the agent may ask for them: `ToolCallRequest` events, then an
        `AgentDone` with action "tool_calls"; the caller runs them and asks again with
        the assistant's tool-call message and the results appended.

        Closing the iterator early (barge-in) must stop the work promptly.
        Raises ProviderError before the first delta when the provider fails.
        """
        ...

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        """A short summary of older turns, used to keep the context bounded."""
        ...

    async def warm_up(self) -> None:
        """Load what the first reply needs (idempotent)."""
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
    # The provider failed mid-stream: the audio is cut (never cache it).
    truncated: bool = False


SynthesisEvent = AudioChunk | SynthesisDone


@runtime_checkable
class TextToSpeech(Protocol):
    name: str
    runs_locally: bool  # on our own CPU: an abandoned request is closed, not read on

    @property
    def model(self) -> str:
        """With `voice`, part of the audio cache key."""
        ...

    @property
    def voice(self) -> str: ...

    def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        """Stream mu-law 8 kHz audio for `text`; the last event is SynthesisDone.

        Closing the iterator early (barge-in) must stop the work promptly.
        Raises ProviderError before the first chunk when the provider fails.
        """
        ...

    def estimate_usage(self, text: str) -> Usage:
        """What a request for `text` is billed, in the provider's own unit, when it never
        reports (a cut or abandoned request): characters, or tokens for a voice billed
        per token."""
        ...

    async def warm_up(self) -> None:
        """Load or connect before the first sentence (idempotent)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class TextSpoken:
    """From a voice fed text as it is written: the audio yielded before this event
    speaks `text` (the next part of the input, whitespace kept), so a mark queued here
    tells that the caller heard it. Emitted at sentence ends, at least."""

    text: str


StreamedSynthesisEvent = AudioChunk | TextSpoken | SynthesisDone


@runtime_checkable
class ReportsUsage(Protocol):
    """A stream that knows what it owes so far: read when it is cut or closed before its
    last event (which carries the usage) came."""

    @property
    def usage(self) -> Usage | None: ...


@runtime_checkable
class StreamingTextToSpeech(TextToSpeech, Protocol):
    """A voice that takes the agent's text as it is written (input streaming)."""

    def synthesize_stream(
            self, text: AsyncIterator[str]) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        """Audio for the text pieces `text` yields, starting before the text is complete;
        `TextSpoken` events tell which text the audio so far covers; the last event is
        SynthesisDone (usage: every character sent). Closing the generator early
        (barge-in) must stop the work promptly. Raises ProviderError before the first
        chunk when the provider fails."""
        ...


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
