"""Fallback chains: one STT/agent/TTS made of several providers tried in order.

Each chain implements the same Protocol as its members. Per request it walks the list,
skipping providers whose circuit breaker is open. A provider that raises, or produces
nothing within the first-output timeout, is recorded as a failure (its stream is closed
so the HTTP response is released) and the next one is tried; every such switch is
reported through `on_event` so the session can log it and raise a provider_failover alert.

Mid-stream failures are NOT retried on another provider: once the caller has received
text or audio, restarting elsewhere would repeat it. The stream ends with what was
produced, followed by a synthesized `TruncatedAgentDone`/`TruncatedSynthesisDone`
(estimated usage, never cached), and the failure counts against the provider's breaker.

When every breaker is open the chain fails at once rather than waiting out timeouts:
the half-open trial after `breaker_reset_s` is what brings a provider back. For TTS the
final resort (Twilio's own <Say>) belongs to the session: it catches `AllProvidersFailed`.

Build the chains once per process so breakers learn from every call; log lines carry
the call through structlog's context variables bound by the session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from engine.log import get_logger
from engine.providers.base import (
    Agent,
    AgentDone,
    AgentEvent,
    ChatMessage,
    ProviderError,
    ProviderHealth,
    ProviderKind,
    SpeechToText,
    SynthesisDone,
    SynthesisEvent,
    TextDelta,
    TextToSpeech,
    Timing,
    Transcript,
    Usage,
)
from engine.providers.breaker import CircuitBreaker

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """A provider failed during a request; `to_provider` took over (None: nobody did)."""

    kind: ProviderKind
    from_provider: str
    to_provider: str | None
    error: str
    at: float  # wall-clock epoch seconds, comparable across processes
    timed_out: bool = False
    # The failure came after output had reached the caller, so no switch was made.
    mid_stream: bool = False


FallbackEventHandler = Callable[[FallbackEvent], None]


class AllProvidersFailed(ProviderError):
    """Every provider of a chain failed (or was skipped by its open breaker)."""

    def __init__(self, chain_name: str, errors: Sequence[tuple[str, str]]) -> None:
        detail = "; ".join(f"{name}: {error}" for name, error in errors) or "no providers"
        super().__init__(chain_name, f"all providers failed: {detail}", retryable=True)
        self.errors = list(errors)


@dataclass(slots=True)
class TruncatedAgentDone(AgentDone):
    """Closes a reply whose provider failed mid-stream; its usage is estimated."""

    truncated: ClassVar[bool] = True


@dataclass(slots=True)
class TruncatedSynthesisDone(SynthesisDone):
    """Closes audio whose provider failed mid-stream; never cache this audio."""

    truncated: ClassVar[bool] = True


class _Named(Protocol):
    name: str

    async def aclose(self) -> None: ...


P = TypeVar("P", bound=_Named)
T = TypeVar("T")


def _describe(exc: BaseException, timeout_s: float | None) -> str:
    if isinstance(exc, TimeoutError) and timeout_s is not None:
        return f"no output within {timeout_s:g}s"
    return str(exc) or type(exc).__name__


async def _close_stream(stream: AsyncIterator[Any]) -> None:
    """Close an abandoned provider stream so its connection is released."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # a provider's cleanup error must not mask the real outcome
        log.warning("provider stream close failed", error=str(exc))


class _Chain(Generic[P]):
    """Providers, their breakers and the event callback shared by one chain."""

    def __init__(self, kind: ProviderKind, providers: Sequence[P], breaker_failures: int,
                 breaker_reset_s: float, on_event: FallbackEventHandler | None,
                 clock: Callable[[], float]) -> None:
        if not providers:
            raise ValueError(f"a {kind} fallback chain needs at least one provider")
        self.kind = kind
        self.providers = list(providers)
        self.breakers = [CircuitBreaker(breaker_failures, breaker_reset_s, clock)
                         for _ in self.providers]
        self.on_event = on_event
        self.name = f"fallback({','.join(p.name for p in self.providers)})"
        self.active_provider: str | None = None

    def emit(self, event: FallbackEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # the observer's bug must not break the call
            log.exception("fallback event handler failed", kind=self.kind)

    def health(self) -> list[ProviderHealth]:
        return [b.health(p.name, self.kind) for p, b in zip(self.providers, self.breakers,
                                                            strict=True)]

    async def aclose(self) -> None:
        results = await asyncio.gather(*(p.aclose() for p in self.providers),
                                       return_exceptions=True)
        for provider, result in zip(self.providers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("provider close failed", provider=provider.name,
                            error=str(result))


class _Walk(Generic[P]):
    """One request's walk down a chain: yields the providers to try, collects failures."""

    def __init__(self, chain: _Chain[P]) -> None:
        self._chain = chain
        self.errors: list[tuple[str, str]] = []
        self._pending: tuple[str, str, bool] | None = None  # failed name, error, timed out

    def __iter__(self) -> Iterator[tuple[P, CircuitBreaker]]:
        for provider, breaker in zip(self._chain.providers, self._chain.breakers,
                                     strict=True):
            if not breaker.allow():
                self.errors.append((provider.name, "circuit open"))
                continue
            self._report_switch(to_provider=provider.name)
            yield provider, breaker

    def failed(self, provider: P, breaker: CircuitBreaker, exc: Exception,
               timeout_s: float) -> None:
        timed_out = isinstance(exc, TimeoutError)
        error = _describe(exc, timeout_s)
        breaker.record_failure(error)
        self.errors.append((provider.name, error))
        self._pending = (provider.name, error, timed_out)
        if isinstance(exc, ProviderError) or timed_out:
            log.warning("provider failed, trying next", kind=self._chain.kind,
                        provider=provider.name, error=error, timed_out=timed_out,
                        status=getattr(exc, "status", None))
        else:  # not the Protocol's error type: a bug or an SDK surprise, keep the trace
            log.warning("provider raised unexpected error, trying next",
                        kind=self._chain.kind, provider=provider.name, error=error,
                        exc_info=exc)

    def served(self, provider: P, breaker: CircuitBreaker) -> None:
        breaker.record_success()
        self._chain.active_provider = provider.name

    def exhausted(self) -> AllProvidersFailed:
        self._report_switch(to_provider=None)
        failure = AllProvidersFailed(self._chain.name, self.errors)
        log.error("all providers failed", kind=self._chain.kind, errors=self.errors)
        return failure

    def _report_switch(self, to_provider: str | None) -> None:
        if self._pending is None:
            return
        name, error, timed_out = self._pending
        self._pending = None
        self._chain.emit(FallbackEvent(kind=self._chain.kind, from_provider=name,
                                       to_provider=to_provider, error=error,
                                       at=time.time(), timed_out=timed_out))

    def failed_mid_stream(self, provider: P, breaker: CircuitBreaker,
                          exc: Exception) -> None:
        error = _describe(exc, None)
        breaker.record_failure(error)
        log.warning("provider failed mid-stream; ending the stream with what was produced",
                    kind=self._chain.kind, provider=provider.name, error=error,
                    exc_info=None if isinstance(exc, ProviderError) else exc)
        self._chain.emit(FallbackEvent(kind=self._chain.kind, from_provider=provider.name,
                                       to_provider=None, error=error, at=time.time(),
                                       mid_stream=True))


async def _first_success(chain: _Chain[P], timeout_s: float,
                         call: Callable[[P], Awaitable[T]]) -> T:
    """A one-shot request through the chain: the first provider that answers in time."""
    walk = _Walk(chain)
    for provider, breaker in walk:
        try:
            async with asyncio.timeout(timeout_s):
                result = await call(provider)
        except asyncio.CancelledError:
            breaker.release()
            raise
        except Exception as exc:
            walk.failed(provider, breaker, exc, timeout_s)
            continue
        walk.served(provider, breaker)
        return result
    raise walk.exhausted()


# --- speech-to-text -------------------------------------------------------------------


class FallbackSTT:
    """SpeechToText over several providers, each bounded by `timeout_s`."""

    def __init__(self, providers: Sequence[SpeechToText], *, timeout_s: float,
                 breaker_failures: int = 3, breaker_reset_s: float = 30.0,
                 on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._chain: _Chain[SpeechToText] = _Chain("stt", providers, breaker_failures,
                                                   breaker_reset_s, on_event, clock)
        self.name = self._chain.name
        self.timeout_s = timeout_s

    @property
    def active_provider(self) -> str | None:
        return self._chain.active_provider

    def health(self) -> list[ProviderHealth]:
        return self._chain.health()

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        return await _first_success(self._chain, self.timeout_s,
                                    lambda p: p.transcribe(pcm16, sample_rate))

    async def aclose(self) -> None:
        await self._chain.aclose()


# --- agent ---------------------------------------------------------------------------


async def _first_agent_event(stream: AsyncIterator[AgentEvent]) -> AgentEvent:
    # Empty deltas are not output: a provider must say something to count as serving.
    while True:
        event = await anext(stream)
        if isinstance(event, AgentDone) or event.text:
            return event


def _estimate_tokens(text: str) -> int:
    # ~4 characters per token for English; only used when the provider never reported.
    return max(1, len(text) // 4) if text else 0


class FallbackAgent:
    """Agent over several providers; `first_token_timeout_s` bounds the first delta."""

    def __init__(self, providers: Sequence[Agent], *, first_token_timeout_s: float,
                 summarize_timeout_s: float = 10.0, breaker_failures: int = 3,
                 breaker_reset_s: float = 30.0, on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._chain: _Chain[Agent] = _Chain("llm", providers, breaker_failures,
                                            breaker_reset_s, on_event, clock)
        self.name = self._chain.name
        self.first_token_timeout_s = first_token_timeout_s
        self.summarize_timeout_s = summarize_timeout_s

    @property
    def active_provider(self) -> str | None:
        return self._chain.active_provider

    def health(self) -> list[ProviderHealth]:
        return self._chain.health()

    async def respond(self, messages: list[ChatMessage]) -> AsyncIterator[AgentEvent]:
        walk = _Walk(self._chain)
        for provider, breaker in walk:
            started = time.monotonic()
            stream: AsyncIterator[AgentEvent] | None = None
            try:
                try:
                    stream = provider.respond(messages)
                    async with asyncio.timeout(self.first_token_timeout_s):
                        first = await _first_agent_event(stream)
                except asyncio.CancelledError:
                    breaker.release()
                    raise
                except StopAsyncIteration:
                    walk.failed(provider, breaker,
                                ProviderError(provider.name, "stream ended without a reply"),
                                self.first_token_timeout_s)
                    continue
                except Exception as exc:
                    walk.failed(provider, breaker, exc, self.first_token_timeout_s)
                    continue
                walk.served(provider, breaker)
                first_byte_s = time.monotonic() - started
                yield first
                if isinstance(first, AgentDone):
                    return
                produced = [first.text]
                try:
                    async for event in stream:
                        if isinstance(event, TextDelta):
                            produced.append(event.text)
                        yield event
                        if isinstance(event, AgentDone):
                            return
                except Exception as exc:
                    walk.failed_mid_stream(provider, breaker, exc)
                    yield self._truncated_done(provider, messages, "".join(produced),
                                               first_byte_s, time.monotonic() - started)
                    return
                # The provider ended without AgentDone: close the reply with an estimate.
                walk.failed_mid_stream(provider, breaker, ProviderError(
                    provider.name, "stream ended without AgentDone"))
                yield self._truncated_done(provider, messages, "".join(produced),
                                           first_byte_s, time.monotonic() - started)
                return
            finally:
                if stream is not None:
                    await _close_stream(stream)
        raise walk.exhausted()

    @staticmethod
    def _truncated_done(provider: Agent, messages: list[ChatMessage], produced: str,
                        first_byte_s: float, total_s: float) -> TruncatedAgentDone:
        usage = Usage(provider=provider.name, kind="llm",
                      model=str(getattr(provider, "model", "") or "unknown"),
                      input_tokens=sum(_estimate_tokens(m.content) for m in messages),
                      output_tokens=_estimate_tokens(produced), estimated=True)
        return TruncatedAgentDone(usage=usage, timing=Timing(first_byte_s, total_s))

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        return await _first_success(self._chain, self.summarize_timeout_s,
                                    lambda p: p.summarize(messages))

    async def aclose(self) -> None:
        await self._chain.aclose()


# --- text-to-speech ------------------------------------------------------------------


async def _first_audio_event(stream: AsyncIterator[SynthesisEvent]) -> SynthesisEvent:
    while True:
        event = await anext(stream)
        if isinstance(event, SynthesisDone) or event.ulaw:
            return event


class FallbackTTS:
    """TextToSpeech over several providers; `first_audio_timeout_s` bounds the first chunk.

    `voice` is the voice of the provider that served last (the first one's until then).
    """

    def __init__(self, providers: Sequence[TextToSpeech], *, first_audio_timeout_s: float,
                 breaker_failures: int = 3, breaker_reset_s: float = 30.0,
                 on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._chain: _Chain[TextToSpeech] = _Chain("tts", providers, breaker_failures,
                                                   breaker_reset_s, on_event, clock)
        self.name = self._chain.name
        self.voice = self._chain.providers[0].voice
        self.first_audio_timeout_s = first_audio_timeout_s

    @property
    def active_provider(self) -> str | None:
        return self._chain.active_provider

    def health(self) -> list[ProviderHealth]:
        return self._chain.health()

    async def synthesize(self, text: str) -> AsyncIterator[SynthesisEvent]:
        walk = _Walk(self._chain)
        for provider, breaker in walk:
            started = time.monotonic()
            stream: AsyncIterator[SynthesisEvent] | None = None
            try:
                try:
                    stream = provider.synthesize(text)
                    async with asyncio.timeout(self.first_audio_timeout_s):
                        first = await _first_audio_event(stream)
                    if isinstance(first, SynthesisDone) and text.strip():
                        # Silence for real text: the caller would hear nothing.
                        raise ProviderError(provider.name, "no audio for non-empty text")
                except asyncio.CancelledError:
                    breaker.release()
                    raise
                except StopAsyncIteration:
                    walk.failed(provider, breaker,
                                ProviderError(provider.name, "stream ended without audio"),
                                self.first_audio_timeout_s)
                    continue
                except Exception as exc:
                    walk.failed(provider, breaker, exc, self.first_audio_timeout_s)
                    continue
                walk.served(provider, breaker)
                self.voice = provider.voice
                first_byte_s = time.monotonic() - started
                yield first
                if isinstance(first, SynthesisDone):
                    return
                try:
                    async for event in stream:
                        yield event
                        if isinstance(event, SynthesisDone):
                            return
                except Exception as exc:
                    walk.failed_mid_stream(provider, breaker, exc)
                    yield self._truncated_done(provider, text, first_byte_s,
                                               time.monotonic() - started)
                    return
                walk.failed_mid_stream(provider, breaker, ProviderError(
                    provider.name, "stream ended without SynthesisDone"))
                yield self._truncated_done(provider, text, first_byte_s,
                                           time.monotonic() - started)
                return
            finally:
                if stream is not None:
                    await _close_stream(stream)
        raise walk.exhausted()

    @staticmethod
    def _truncated_done(provider: TextToSpeech, text: str, first_byte_s: float,
                        total_s: float) -> TruncatedSynthesisDone:
        # TTS vendors bill the request's characters whether or not the audio arrived.
        usage = Usage(provider=provider.name, kind="tts",
                      model=str(getattr(provider, "model", "") or "unknown"),
                      characters=len(text), estimated=True)
        return TruncatedSynthesisDone(usage=usage, timing=Timing(first_byte_s, total_s))

    async def aclose(self) -> None:
        await self._chain.aclose()

