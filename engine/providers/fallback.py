"""Fallback chains: one STT/agent/TTS made of several providers tried in order.

Each chain implements the same Protocol as its members (the walk itself, the breakers
and the events live in `engine.providers.chain`). Per request it walks the list,
skipping providers whose circuit breaker is open. A provider that raises, or produces
nothing within the first-output timeout, is recorded as a failure and the next one is
tried (a refused request is closed; one that timed out runs on in the background, see
below); every such switch is reported through `on_event` so the session can log it and
raise a provider_failover alert.

Mid-stream failures are NOT retried on another provider: once the caller has received
text or audio, restarting elsewhere would repeat it. The stream ends with what was
produced, followed by a synthesized `TruncatedAgentDone`/`TruncatedSynthesisDone`
(estimated usage, never cached), and the failure counts against the provider's breaker.

The chains book what every request costs on the bill of the call that made it, including
requests the call stopped waiting for, read on in the background for at most
`drain_timeout_s` (`engine.providers.chain`, `engine.providers.drains`): consumers never
book a `Done` event's usage themselves.

When every breaker is open the chain fails at once rather than waiting out timeouts:
the half-open trial after `breaker_reset_s` is what brings a provider back. For TTS the
final resort (Twilio's own <Say>) belongs to the session: it catches the chain's
`AllProvidersFailed` (a ProviderError).

Build the chains once per process so breakers learn from every call; log lines carry
the call through structlog's context variables bound by the session.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.providers.base import (
    Agent,
    AgentDone,
    AgentEvent,
    ChatMessage,
    ProviderHealth,
    ProviderKind,
    SpeechStream,
    SpeechToText,
    StreamingSpeechToText,
    SynthesisDone,
    TextDelta,
    Timing,
    ToolCallRequest,
    ToolSpec,
    Transcript,
    Usage,
)
from engine.providers.breaker import BreakerState
from engine.providers.chain import (
    Chain,
    FallbackEventHandler,
    Member,
    OneShot,
    UsageNames,
    first_success,
)
from engine.providers.streamed import Streamed, stream_first_served

P = TypeVar("P", bound=Member)

# How long a request nobody waits for any more is read on for its usage (config:
# providers.drain_timeout_s).
DRAIN_TIMEOUT_S = 15.0


@dataclass(slots=True)
class TruncatedAgentDone(AgentDone):
    """Closes a reply whose provider failed mid-stream; its usage is estimated."""

    truncated: bool = True


@dataclass(slots=True)
class TruncatedSynthesisDone(SynthesisDone):
    """Closes audio whose provider failed mid-stream; never cache this audio."""

    truncated: bool = True


class FallbackChain(Generic[P]):
    """What every chain offers as a provider: name, model, health, warm-up and close."""

    def __init__(self, kind: ProviderKind, providers: Sequence[P], breaker_failures: int,
                 breaker_reset_s: float, on_event: FallbackEventHandler | None,
                 clock: Callable[[], float], drain_timeout_s: float) -> None:
        self._chain: Chain[P] = Chain(kind, providers, breaker_failures, breaker_reset_s,
                                        on_event, clock, drain_timeout_s)
        self.name = self._chain.name
        # Each member's requests are handled by the chain itself; a chain of local
        # providers is local too.
        self.runs_locally = all(p.runs_locally for p in providers)

    @property
    def active_provider(self) -> str | None:
        return self._chain.active_provider

    @property
    def model(self) -> str:
        """The model of the provider that served last (the first one's until then)."""
        return self._chain.current.model

    def health(self) -> list[ProviderHealth]:
        return self._chain.health()

    @property
    def abandoned(self) -> int:
        """Requests read on in the background for their usage right now."""
        return len(self._chain.drains)

    async def settle_abandoned(self, timeout: float | None = None) -> None:
        """Wait until the requests read on in the background are booked (at most
        `timeout` seconds; shutdown, tests)."""
        await self._chain.drains.wait(timeout)

    async def warm_up(self) -> None:
        for provider in self._chain.providers:
            await provider.warm_up()

    async def aclose(self) -> None:
        await self._chain.aclose()


# --- speech-to-text -------------------------------------------------------------------


class _Transcription(OneShot[SpeechToText, Transcript]):
    def __init__(self, pcm16: bytes, sample_rate: int) -> None:
        self.pcm16 = pcm16
        self.sample_rate = sample_rate

    def call(self, provider: SpeechToText) -> Awaitable[Transcript]:
        return provider.transcribe(self.pcm16, self.sample_rate)

    def usage_of(self, result: Transcript) -> Usage:
        return result.usage

    def estimate(self, provider: SpeechToText, names: UsageNames) -> Usage:
        # Speech-to-text bills the audio sent, whatever came back.
        return Usage(provider=names[0], kind="stt", model=names[1],
                     audio_seconds=len(self.pcm16) / 2 / self.sample_rate, estimated=True)


class _StreamedTranscription(_Transcription):
    """An utterance the chain's first provider has heard as it was spoken: its transcript
    is the stream's; a provider after it transcribes the whole utterance."""

    def __init__(self, stream: SpeechStream, owner: SpeechToText, pcm16: bytes,
                 sample_rate: int) -> None:
        super().__init__(pcm16, sample_rate)
        self.stream = stream
        self.owner = owner

    def call(self, provider: SpeechToText) -> Awaitable[Transcript]:
        if provider is self.owner:
            return self.stream.finish()
        return provider.transcribe(self.pcm16, self.sample_rate)


class FallbackSTT(FallbackChain[SpeechToText]):
    """SpeechToText over several providers, each bounded by `timeout_s`."""

    def __init__(self, providers: Sequence[SpeechToText], *, timeout_s: float,
                 breaker_failures: int = 3, breaker_reset_s: float = 30.0,
                 on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        super().__init__("stt", providers, breaker_failures, breaker_reset_s, on_event, clock,
                         drain_timeout_s)
        self.timeout_s = timeout_s

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        return await first_success(self._chain, self.timeout_s,
                                    _Transcription(pcm16, sample_rate))

    @property
    def first(self) -> SpeechToText:
        """The recognizer every request tries first."""
        return self._chain.providers[0]

    @property
    def streams_audio(self) -> bool:
        """Whether the first recognizer hears audio as it arrives (and may now)."""
        return isinstance(self.first, StreamingSpeechToText) \
            and self._chain.breakers[0].state is BreakerState.CLOSED

    def open_stream(self, sample_rate: int) -> SpeechStream | None:
        """A stream to the first provider, when it hears audio as it arrives (None: the
        utterance is transcribed whole at its end). Finish it with `transcribe_streamed`."""
        first = self.first
        if not isinstance(first, StreamingSpeechToText) or not self.streams_audio:
            return None
        return first.open_stream(sample_rate)

    async def transcribe_streamed(self, stream: SpeechStream, pcm16: bytes,
                                  sample_rate: int) -> Transcript:
        """The utterance `stream` heard (`pcm16`, all of it, for a provider after the
        first); the stream is closed either way."""
        try:
            return await first_success(self._chain, self.timeout_s, _StreamedTranscription(
                stream, self._chain.providers[0], pcm16, sample_rate))
        finally:
            await stream.aclose()


# --- agent ---------------------------------------------------------------------------


def _estimate_tokens(text: str) -> int:
    # ~4 characters per token for English; only used when the provider never reported.
    return max(1, len(text) // 4) if text else 0


def _prompt_estimate(messages: list[ChatMessage]) -> int:
    return sum(_estimate_tokens(m.content) for m in messages)


class _Reply(Streamed[Agent, AgentEvent]):
    done_type = AgentDone
    nothing_error = "stream ended without a reply"
    keeps_output = True  # the estimate of a cut reply counts its tokens
    pumped = True  # a reply cut by a barge-in is read on to its usage chunk

    def __init__(self, messages: list[ChatMessage], tools: Sequence[ToolSpec] = ()) -> None:
        self.messages = messages
        self.tools = tools

    def open(self, provider: Agent) -> AsyncIterator[AgentEvent]:
        # Without tools, the call an agent written before tools knows.
        if not self.tools:
            return provider.respond(self.messages)
        return provider.respond(self.messages, self.tools)

    def has_output(self, event: AgentEvent) -> bool:
        # A tool call is output too: a reply may be nothing but tool calls.
        return (isinstance(event, TextDelta) and bool(event.text)) \
            or isinstance(event, ToolCallRequest)

    def estimate(self, provider: Agent, names: UsageNames, emitted: list[AgentEvent]
                 ) -> Usage:
        produced = "".join(e.text if isinstance(e, TextDelta) else e.arguments
                           for e in emitted if isinstance(e, TextDelta | ToolCallRequest))
        return Usage(provider=names[0], kind="llm", model=names[1],
                     input_tokens=_prompt_estimate(self.messages),
                     output_tokens=_estimate_tokens(produced), estimated=True)

    def truncated(self, usage: Usage, first_byte_s: float, total_s: float) -> AgentEvent:
        return TruncatedAgentDone(usage=usage, timing=Timing(first_byte_s, total_s))


class _Summary(OneShot[Agent, tuple[str, Usage]]):
    def __init__(self, messages: list[ChatMessage]) -> None:
        self.messages = messages

    def call(self, provider: Agent) -> Awaitable[tuple[str, Usage]]:
        return provider.summarize(self.messages)

    def usage_of(self, result: tuple[str, Usage]) -> Usage:
        return result[1]

    def estimate(self, provider: Agent, names: UsageNames) -> Usage:
        return Usage(provider=names[0], kind="llm", model=names[1],
                     input_tokens=_prompt_estimate(self.messages), estimated=True)


class FallbackAgent(FallbackChain[Agent]):
    """Agent over several providers; `first_token_timeout_s` bounds the first delta."""

    def __init__(self, providers: Sequence[Agent], *, first_token_timeout_s: float,
                 summarize_timeout_s: float = 10.0, breaker_failures: int = 3,
                 breaker_reset_s: float = 30.0, on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        super().__init__("llm", providers, breaker_failures, breaker_reset_s, on_event, clock,
                         drain_timeout_s)
        self.first_token_timeout_s = first_token_timeout_s
        self.summarize_timeout_s = summarize_timeout_s

    def respond(self, messages: list[ChatMessage],
                tools: Sequence[ToolSpec] = ()) -> AsyncGenerator[AgentEvent, None]:
        return stream_first_served(self._chain, self.first_token_timeout_s,
                                    _Reply(messages, tools))

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        return await first_success(self._chain, self.summarize_timeout_s,
                                    _Summary(messages))
