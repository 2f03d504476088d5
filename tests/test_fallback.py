"""Circuit breaker and fallback chains, with scripted providers implementing our Protocols;
what the chains book, including requests the caller stopped waiting for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from engine.providers.base import (
    Agent,
    AgentDone,
    AgentEvent,
    AudioChunk,
    ChatMessage,
    ProviderError,
    SpeechToText,
    SynthesisDone,
    SynthesisEvent,
    TextDelta,
    TextToSpeech,
    Timing,
    Transcript,
    TranscriptConfidence,
    Usage,
)
from engine.providers.booking import bill_to
from engine.providers.breaker import BreakerState, CircuitBreaker
from engine.providers.chain import AllProvidersFailed, FallbackEvent
from engine.providers.fallback import FallbackAgent, FallbackSTT, TruncatedAgentDone
from engine.providers.fallback_tts import FallbackTTS, TruncatedSynthesisDone


@pytest.fixture
def booked() -> Iterator[list[Usage]]:
    """What the chains book in this test (the usage sink a session would bind)."""
    bill: list[Usage] = []
    with bill_to(bill.append):
        yield bill


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- scripted providers ---------------------------------------------------------------

HANG = "hang"


class ScriptedStream:
    """An async iterator that plays a script: events, exceptions or HANG; records aclose."""

    def __init__(self, script: list[Any]) -> None:
        self._script = list(script)
        self.closed = False
        self.produced = 0

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> Any:
        if self.closed or not self._script:
            raise StopAsyncIteration
        step = self._script.pop(0)
        if step == HANG:
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        self.produced += 1
        return step

    async def aclose(self) -> None:
        self.closed = True


def _usage(name: str, kind: Any) -> Usage:
    return Usage(provider=name, kind=kind, model="m")


class ScriptedAgent:
    runs_locally = False
    def __init__(self, name: str, scripts: list[list[Any]]) -> None:
        self.name = name
        self.model = "test-model"
        self._scripts = scripts  # one script per call; the last one repeats
        self.calls = 0
        self.streams: list[ScriptedStream] = []

    def respond(self, messages: list[ChatMessage]) -> AsyncIterator[AgentEvent]:
        script = self._scripts[min(self.calls, len(self._scripts) - 1)]
        self.calls += 1
        stream = ScriptedStream(script)
        self.streams.append(stream)
        return stream

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        self.calls += 1
        return f"summary by {self.name}", _usage(self.name, "llm")

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class ScriptedTTS:
    runs_locally = False
    def __init__(self, name: str, scripts: list[list[Any]], voice: str = "v") -> None:
        self.name = name
        self.model = "test-voice-model"
        self.voice = voice
        self._scripts = scripts
        self.calls = 0
        self.streams: list[ScriptedStream] = []

    def synthesize(self, text: str) -> AsyncIterator[SynthesisEvent]:
        script = self._scripts[min(self.calls, len(self._scripts) - 1)]
        self.calls += 1
        stream = ScriptedStream(script)
        self.streams.append(stream)
        return stream

    def estimate_usage(self, text: str) -> Usage:
        return Usage(self.name, "tts", self.model, characters=len(text), estimated=True)

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class ScriptedSTT:
    runs_locally = False

    def __init__(self, name: str, outcomes: list[Any]) -> None:
        self.name = name
        self.model = "test-stt-model"
        self._outcomes = outcomes  # str (text), an exception, or HANG; last one repeats
        self.calls = 0
        self.closed = False

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        outcome = self._outcomes[min(self.calls, len(self._outcomes) - 1)]
        self.calls += 1
        if outcome == HANG:
            await asyncio.Event().wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return Transcript(text=outcome, confidence=TranscriptConfidence(),
                          usage=_usage(self.name, "stt"), timing=Timing(0.1, 0.1))

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


def agent_done(name: str) -> AgentDone:
    return AgentDone(usage=_usage(name, "llm"), timing=Timing(0.1, 0.2))


def synth_done(name: str) -> SynthesisDone:
    return SynthesisDone(usage=_usage(name, "tts"), timing=Timing(0.1, 0.2))


def reply(name: str, *texts: str) -> list[Any]:
    return [*(TextDelta(t) for t in texts), agent_done(name)]


def audio(name: str, *chunks: bytes) -> list[Any]:
    return [*(AudioChunk(c) for c in chunks), synth_done(name)]


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


MESSAGES = [ChatMessage("user", "what are your hours?")]


def test_scripted_providers_implement_the_protocols() -> None:
    assert isinstance(ScriptedSTT("a", ["x"]), SpeechToText)
    assert isinstance(ScriptedAgent("a", [[]]), Agent)
    assert isinstance(ScriptedTTS("a", [[]]), TextToSpeech)
    chain = FallbackTTS([ScriptedTTS("a", [[]])], first_audio_timeout_s=1)
    assert isinstance(chain, TextToSpeech)
    assert isinstance(FallbackAgent([ScriptedAgent("a", [[]])], first_token_timeout_s=1), Agent)
    assert isinstance(FallbackSTT([ScriptedSTT("a", ["x"])], timeout_s=1), SpeechToText)


# --- breaker --------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_recovers_through_half_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures_to_open=3, reset_after_s=30, clock=clock)
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure(ProviderError("a", "boom", status=500))
    breaker.record_failure("boom")
    breaker.record_success()  # a success resets the count: failures must be consecutive
    breaker.record_failure("boom")
    breaker.record_failure("boom")
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure("third")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    health = breaker.health("a", "stt")
    assert not health.healthy and health.consecutive_failures == 3
    assert health.last_error == "third" and health.open_until == pytest.approx(1030.0)

    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # a second caller waits for the trial's outcome
    breaker.record_failure("still down")
    assert breaker.state is BreakerState.OPEN and not breaker.allow()

    clock.now += 30
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()
    health = breaker.health("a", "stt")
    assert health.healthy and health.consecutive_failures == 0 and health.open_until is None


def test_breaker_released_trial_lets_the_next_caller_try() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures_to_open=1, reset_after_s=5, clock=clock)
    breaker.record_failure("x")
    clock.now += 5
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()  # the trial was cancelled without an outcome
    assert breaker.allow()


def test_breaker_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures_to_open=0, reset_after_s=1)
    with pytest.raises(ValueError):
        CircuitBreaker(failures_to_open=1, reset_after_s=-1)


# --- speech-to-text -------------------------------------------------------------------


async def test_stt_provider_error_switches_to_next_and_reports_event() -> None:
    events: list[FallbackEvent] = []
    first = ScriptedSTT("cloud", [ProviderError("cloud", "server error", status=500)])
    second = ScriptedSTT("local", ["hello there"])
    chain = FallbackSTT([first, second], timeout_s=1.0, on_event=events.append)
    assert chain.name == "fallback(cloud,local)"

    transcript = await chain.transcribe(b"\x00\x00" * 160, 8000)

    assert transcript.text == "hello there"
    assert chain.active_provider == "local"
    assert len(events) == 1
    assert events[0].kind == "stt" and events[0].from_provider == "cloud"
    assert events[0].to_provider == "local"
    assert "server error" in events[0].error and not events[0].timed_out
    health = {h.name: h for h in chain.health()}
    assert health["cloud"].consecutive_failures == 1 and health["local"].healthy


async def test_stt_hanging_provider_times_out_then_next_serves() -> None:
    events: list[FallbackEvent] = []
    first = ScriptedSTT("slow", [HANG])
    second = ScriptedSTT("fast", ["ok"])
    chain = FallbackSTT([first, second], timeout_s=0.05, on_event=events.append)
    loop = asyncio.get_running_loop()
    started = loop.time()
    transcript = await chain.transcribe(b"", 16000)
    elapsed = loop.time() - started
    assert transcript.text == "ok"
    assert 0.04 <= elapsed < 1.0
    assert events[0].timed_out and "0.05" in events[0].error


async def test_stt_unexpected_exception_is_a_failure_not_a_crash() -> None:
    chain = FallbackSTT([ScriptedSTT("buggy", [RuntimeError("bug")]),
                         ScriptedSTT("good", ["fine"])], timeout_s=1)
    assert (await chain.transcribe(b"", 8000)).text == "fine"


async def test_stt_all_failed_raises_all_providers_failed() -> None:
    events: list[FallbackEvent] = []
    chain = FallbackSTT([ScriptedSTT("a", [ProviderError("a", "down")]),
                         ScriptedSTT("b", [HANG])], timeout_s=0.02, on_event=events.append)
    with pytest.raises(AllProvidersFailed) as caught:
        await chain.transcribe(b"", 8000)
    assert "all providers failed" in str(caught.value)
    assert [name for name, _ in caught.value.errors] == ["a", "b"]
    assert isinstance(caught.value, ProviderError)
    assert [(e.from_provider, e.to_provider) for e in events] == [("a", "b"), ("b", None)]


async def test_on_event_handler_error_does_not_break_the_request() -> None:
    def broken(_: FallbackEvent) -> None:
        raise RuntimeError("observer bug")

    chain = FallbackSTT([ScriptedSTT("a", [ProviderError("a", "x")]),
                         ScriptedSTT("b", ["ok"])], timeout_s=1, on_event=broken)
    assert (await chain.transcribe(b"", 8000)).text == "ok"


async def test_aclose_closes_every_provider() -> None:
    a, b = ScriptedSTT("a", ["x"]), ScriptedSTT("b", ["y"])
    await FallbackSTT([a, b], timeout_s=1).aclose()
    assert a.closed and b.closed


# --- agent ----------------------------------------------------------------------------


async def test_open_breaker_skips_provider_on_next_turn() -> None:
    clock = FakeClock()
    events: list[FallbackEvent] = []
    first = ScriptedAgent("llm", [[ProviderError("llm", "rate limited", status=429)]])
    second = ScriptedAgent("faq", [reply("faq", "We open ", "at nine.")])
    chain = FallbackAgent([first, second], first_token_timeout_s=1, breaker_failures=1,
                          breaker_reset_s=30, on_event=events.append, clock=clock)

    turn1 = await collect(chain.respond(MESSAGES))
    assert "".join(e.text for e in turn1 if isinstance(e, TextDelta)) == "We open at nine."
    assert first.calls == 1 and len(events) == 1
    assert first.streams[0].closed  # the failed stream was released

    turn2 = await collect(chain.respond(MESSAGES))
    assert isinstance(turn2[-1], AgentDone)
    assert first.calls == 1  # breaker open: not even called
    assert second.calls == 2
    assert len(events) == 1  # skipping an open breaker is not a new switch
    assert chain.active_provider == "faq"


async def test_half_open_trial_success_closes_breaker() -> None:
    clock = FakeClock()
    first = ScriptedAgent("llm", [[ProviderError("llm", "down")], reply("llm", "back")])
    second = ScriptedAgent("faq", [reply("faq", "fallback")])
    chain = FallbackAgent([first, second], first_token_timeout_s=1, breaker_failures=1,
                          breaker_reset_s=10, clock=clock)
    await collect(chain.respond(MESSAGES))
    await collect(chain.respond(MESSAGES))
    assert first.calls == 1
    clock.now += 10
    turn3 = await collect(chain.respond(MESSAGES))
    assert first.calls == 2 and turn3[0] == TextDelta("back")
    assert chain.active_provider == "llm"
    assert next(h for h in chain.health() if h.name == "llm").healthy


async def test_half_open_trial_failure_reopens_breaker() -> None:
    clock = FakeClock()
    first = ScriptedAgent("llm", [[ProviderError("llm", "down")]])
    second = ScriptedAgent("faq", [reply("faq", "fallback")])
    chain = FallbackAgent([first, second], first_token_timeout_s=1, breaker_failures=1,
                          breaker_reset_s=10, clock=clock)
    await collect(chain.respond(MESSAGES))
    clock.now += 10
    await collect(chain.respond(MESSAGES))  # trial fails, faq serves
    assert first.calls == 2
    await collect(chain.respond(MESSAGES))
    assert first.calls == 2  # open again for another 10 s
    assert second.calls == 3


async def test_agent_first_token_timeout_switches_and_closes_stream(
        booked: list[Usage]) -> None:
    events: list[FallbackEvent] = []
    first = ScriptedAgent("llm", [[HANG]])
    second = ScriptedAgent("faq", [reply("faq", "hi")])
    chain = FallbackAgent([first, second], first_token_timeout_s=0.05,
                          on_event=events.append, drain_timeout_s=0.1)
    out = await collect(chain.respond(MESSAGES))
    assert out[0] == TextDelta("hi")
    assert events[0].timed_out and events[0].to_provider == "faq"
    # The timed-out request is read on in the background (the issue: it may be billed),
    # then closed at the drain deadline, booked as a flagged estimate.
    assert not first.streams[0].closed and chain.abandoned == 1
    await chain.settle_abandoned(1.0)
    assert first.streams[0].closed and chain.abandoned == 0
    assert [(u.provider, u.estimated) for u in booked] == [("faq", False), ("llm", True)]
    assert booked[1].input_tokens > 0 and booked[1].output_tokens == 0


async def test_agent_mid_stream_failure_is_not_retried() -> None:
    events: list[FallbackEvent] = []
    first = ScriptedAgent("llm", [[TextDelta("We open "), TextDelta("at"),
                                   ProviderError("llm", "connection reset")]])
    second = ScriptedAgent("faq", [reply("faq", "never heard")])
    chain = FallbackAgent([first, second], first_token_timeout_s=1, on_event=events.append)
    out = await collect(chain.respond(MESSAGES))
    assert [e.text for e in out if isinstance(e, TextDelta)] == ["We open ", "at"]
    done = out[-1]
    assert isinstance(done, TruncatedAgentDone) and isinstance(done, AgentDone)
    assert done.usage.estimated and done.usage.output_tokens > 0
    assert done.usage.model == "test-model" and done.cache_key is None
    assert second.calls == 0
    assert len(events) == 1 and events[0].mid_stream and events[0].to_provider is None
    assert next(h for h in chain.health() if h.name == "llm").consecutive_failures == 1


async def test_agent_all_failed() -> None:
    chain = FallbackAgent([ScriptedAgent("a", [[ProviderError("a", "x")]]),
                           ScriptedAgent("b", [[]])],  # an empty stream is a failure too
                          first_token_timeout_s=1)
    with pytest.raises(AllProvidersFailed, match="b: stream ended without a reply"):
        await collect(chain.respond(MESSAGES))


async def test_all_breakers_open_fails_fast_without_calling_anyone() -> None:
    clock = FakeClock()
    a = ScriptedAgent("a", [[ProviderError("a", "x")]])
    b = ScriptedAgent("b", [[ProviderError("b", "y")]])
    chain = FallbackAgent([a, b], first_token_timeout_s=1, breaker_failures=1, clock=clock)
    with pytest.raises(AllProvidersFailed):
        await collect(chain.respond(MESSAGES))
    with pytest.raises(AllProvidersFailed, match="circuit open"):
        await collect(chain.respond(MESSAGES))
    assert (a.calls, b.calls) == (1, 1)


async def test_barge_in_reads_the_cut_reply_on_for_its_usage(booked: list[Usage]) -> None:
    first = ScriptedAgent("llm", [reply("llm", "one ", "two ", "three")])
    chain = FallbackAgent([first], first_token_timeout_s=1)
    stream = chain.respond(MESSAGES)
    assert await anext(stream) == TextDelta("one ")
    await stream.aclose()  # type: ignore[attr-defined]
    await chain.settle_abandoned(1.0)
    # The vendor generated (and bills) the whole reply: read to its usage, then closed.
    assert first.streams[0].closed and first.streams[0].produced == 4
    assert booked == [_usage("llm", "llm")]


async def test_a_cancelled_reply_is_still_read_on_and_booked_once(
        booked: list[Usage]) -> None:
    first = ScriptedAgent("llm", [[TextDelta("one "), HANG, TextDelta("two"),
                                   agent_done("llm")]])
    chain = FallbackAgent([first], first_token_timeout_s=1)
    received: list[Any] = []

    async def consume() -> None:
        async for event in chain.respond(MESSAGES):
            received.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()  # a barge-in cancels the reply task while it waits for a token
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received == [TextDelta("one ")] and chain.abandoned == 1
    await chain.settle_abandoned(0.2)  # the provider hangs: estimated at the deadline
    await chain.aclose()
    assert chain.abandoned == 0 and first.streams[0].closed
    assert len(booked) == 1 and booked[0].estimated and booked[0].output_tokens == 1


async def test_a_refused_request_is_not_billed_and_a_served_one_once(
        booked: list[Usage]) -> None:
    refused = ScriptedAgent("llm", [[ProviderError("llm", "HTTP 429", status=429)]])
    chain = FallbackAgent([refused, ScriptedAgent("faq", [reply("faq", "hi")])],
                          first_token_timeout_s=1)
    await collect(chain.respond(MESSAGES))
    stt = FallbackSTT([ScriptedSTT("a", [ProviderError("a", "HTTP 401", status=401)]),
                       ScriptedSTT("b", ["hello"])], timeout_s=1)
    await stt.transcribe(b"\0\0" * 800, 8000)
    text, _ = await chain.summarize(MESSAGES)
    assert [u.provider for u in booked] == ["faq", "b", "llm"] and text == "summary by llm"
    assert chain.abandoned == stt.abandoned == 0


async def test_a_transcription_past_its_timeout_is_booked_when_it_answers(
        booked: list[Usage]) -> None:
    class Slow(ScriptedSTT):
        async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
            await asyncio.sleep(0.15)  # answers, but after the chain stopped waiting
            return await super().transcribe(pcm16, sample_rate)

    stt = FallbackSTT([Slow("cloud", ["late"]), ScriptedSTT("local", ["now"])],
                      timeout_s=0.05, drain_timeout_s=1.0)
    assert (await stt.transcribe(b"\0\0" * 8000, 8000)).text == "now"
    await stt.settle_abandoned(1.0)
    assert [(u.provider, u.estimated) for u in booked] == [("local", False),
                                                           ("cloud", False)]
    never = FallbackSTT([ScriptedSTT("cloud", [HANG]), ScriptedSTT("local", ["now"])],
                        timeout_s=0.05, drain_timeout_s=0.05)
    await never.transcribe(b"\0\0" * 8000, 8000)
    await never.aclose()
    estimate = booked[-1]
    assert estimate.provider == "cloud" and estimate.estimated
    assert estimate.audio_seconds == pytest.approx(1.0)  # the audio sent is billed


async def test_summarize_falls_back() -> None:
    class BrokenSummary(ScriptedAgent):
        async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
            raise ProviderError(self.name, "nope")

    chain = FallbackAgent([BrokenSummary("a", [[]]), ScriptedAgent("b", [[]])],
                          first_token_timeout_s=1)
    text, usage = await chain.summarize(MESSAGES)
    assert text == "summary by b" and usage.provider == "b"


# --- text-to-speech -------------------------------------------------------------------


async def test_tts_error_switches_and_voice_follows_active_provider() -> None:
    events: list[FallbackEvent] = []
    first = ScriptedTTS("eleven", [[ProviderError("eleven", "503", status=503)]],
                        voice="rachel")
    second = ScriptedTTS("espeak", [audio("espeak", b"\x7f" * 800, b"\xff" * 400)],
                         voice="en-us")
    chain = FallbackTTS([first, second], first_audio_timeout_s=1, on_event=events.append)
    assert chain.voice == "rachel"
    out = await collect(chain.synthesize("Hello."))
    assert b"".join(e.ulaw for e in out if isinstance(e, AudioChunk)) == (
        b"\x7f" * 800 + b"\xff" * 400)
    assert isinstance(out[-1], SynthesisDone) and not isinstance(out[-1],
                                                                 TruncatedSynthesisDone)
    assert chain.voice == "en-us" and chain.active_provider == "espeak"
    assert events[0].from_provider == "eleven" and events[0].to_provider == "espeak"


async def test_tts_hang_then_next_and_abandoned_stream_closed(booked: list[Usage]) -> None:
    first = ScriptedTTS("eleven", [[AudioChunk(b""), HANG]])  # empty chunks are not audio
    second = ScriptedTTS("espeak", [audio("espeak", b"\x01" * 10)])
    chain = FallbackTTS([first, second], first_audio_timeout_s=0.05, drain_timeout_s=0.05)
    out = await collect(chain.synthesize("Hi."))
    assert out[0] == AudioChunk(b"\x01" * 10)
    await chain.settle_abandoned(1.0)
    assert first.streams[0].closed
    assert [(u.provider, u.characters, u.estimated) for u in booked] == [
        ("espeak", 0, False), ("eleven", len("Hi."), True)]


async def test_a_provider_on_our_own_cpu_is_closed_not_read_on(booked: list[Usage]) -> None:
    class LocalTTS(ScriptedTTS):
        runs_locally = True  # reading on would only burn CPU for a free request

    first = LocalTTS("piper", [[AudioChunk(b""), HANG]])
    second = ScriptedTTS("espeak", [audio("espeak", b"\x01" * 10)])
    chain = FallbackTTS([first, second], first_audio_timeout_s=0.05, drain_timeout_s=60)
    await collect(chain.synthesize("Hi."))
    await asyncio.wait_for(chain.settle_abandoned(), 1.0)  # not the 60 s deadline
    assert first.streams[0].closed
    assert [(u.provider, u.estimated) for u in booked] == [("espeak", False), ("piper", True)]


async def test_tts_cut_by_the_caller_is_read_on_to_its_reported_usage(
        booked: list[Usage]) -> None:
    first = ScriptedTTS("eleven", [audio("eleven", b"\x01" * 160, b"\x02" * 160)])
    chain = FallbackTTS([first], first_audio_timeout_s=1)
    stream = chain.synthesize("Hello there.")
    assert await anext(stream) == AudioChunk(b"\x01" * 160)
    await stream.aclose()  # a barge-in between two chunks
    await chain.settle_abandoned(1.0)
    assert booked == [_usage("eleven", "tts")] and first.streams[0].closed


async def test_tts_done_without_audio_is_a_failure_and_stream_closed() -> None:
    first = ScriptedTTS("eleven", [[synth_done("eleven"), AudioChunk(b"late")]])
    second = ScriptedTTS("espeak", [audio("espeak", b"\x02" * 10)])
    chain = FallbackTTS([first, second], first_audio_timeout_s=1)
    out = await collect(chain.synthesize("Hi."))
    assert out[0] == AudioChunk(b"\x02" * 10)
    assert first.streams[0].closed and first.streams[0].produced == 1


async def test_tts_mid_stream_failure_ends_stream_without_retry() -> None:
    events: list[FallbackEvent] = []
    first = ScriptedTTS("eleven", [[AudioChunk(b"\x10" * 160), ProviderError("eleven", "reset")]])
    second = ScriptedTTS("espeak", [audio("espeak", b"\x20" * 160)])
    chain = FallbackTTS([first, second], first_audio_timeout_s=1, on_event=events.append)
    out = await collect(chain.synthesize("Hello there."))
    assert b"".join(e.ulaw for e in out if isinstance(e, AudioChunk)) == b"\x10" * 160
    assert isinstance(out[-1], TruncatedSynthesisDone)
    assert out[-1].usage.characters == len("Hello there.") and out[-1].usage.estimated
    assert second.calls == 0 and events[0].mid_stream


async def test_tts_all_failed_is_distinct_for_the_say_fallback() -> None:
    chain = FallbackTTS([ScriptedTTS("a", [[ProviderError("a", "x")]]),
                         ScriptedTTS("b", [[ProviderError("b", "y")]])],
                        first_audio_timeout_s=1)
    with pytest.raises(AllProvidersFailed) as caught:
        await collect(chain.synthesize("Hi."))
    assert caught.value.provider == "fallback(a,b)"
    assert "a: a: x" in str(caught.value) and "b: b: y" in str(caught.value)


async def test_cancelled_half_open_trial_releases_the_slot() -> None:
    clock = FakeClock()
    first = ScriptedTTS("eleven", [[ProviderError("eleven", "x")], [HANG],
                                   audio("eleven", b"\x03")])
    second = ScriptedTTS("espeak", [audio("espeak", b"\x04")])
    chain = FallbackTTS([first, second], first_audio_timeout_s=5, breaker_failures=1,
                        breaker_reset_s=10, clock=clock, drain_timeout_s=0.05)
    await collect(chain.synthesize("a"))
    clock.now += 10
    task = asyncio.create_task(collect(chain.synthesize("b")))  # the trial hangs
    await asyncio.sleep(0.01)
    task.cancel()  # barge-in before any audio
    with pytest.raises(asyncio.CancelledError):
        await task
    await chain.settle_abandoned(1.0)  # read on for its usage until the drain deadline
    assert first.streams[1].closed
    out = await collect(chain.synthesize("c"))  # a new trial is allowed at once
    assert first.calls == 3 and out[0] == AudioChunk(b"\x03")


def test_empty_chain_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one provider"):
        FallbackTTS([], first_audio_timeout_s=1)


async def test_chains_report_the_serving_model_warm_up_members_and_mark_cuts() -> None:
    first = ScriptedTTS("eleven", [[ProviderError("eleven", "down")]])
    second = ScriptedTTS("espeak", [[AudioChunk(b"\x05"), ProviderError("espeak", "cut")]])
    first.model, second.model = "flash", "espeak-ng"
    chain = FallbackTTS([first, second], first_audio_timeout_s=1)
    assert chain.model == "flash"  # the first provider's until another serves
    out = await collect(chain.synthesize("Hi."))
    assert chain.model == "espeak-ng" and out[-1].truncated
    assert out[-1].usage.model == "espeak-ng"
    assert not synth_done("x").truncated and not agent_done("x").truncated

    warmed: list[str] = []

    class Warming(ScriptedSTT):
        async def warm_up(self) -> None:
            warmed.append(self.name)

    await FallbackSTT([Warming("a", ["x"]), Warming("b", ["y"])], timeout_s=1).warm_up()
    assert warmed == ["a", "b"]
