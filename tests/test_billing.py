"""Everything billed is booked, and no ledger outlives its call.

The ledger against the vendors' own bills (the stand-ins' usage logs) to the micro-dollar
on a real engine with the cloud SDKs: a barge-in during a long reply, a caller hanging up
mid-reply, a first-token timeout that falls back. Then, on a session and the hub without
a network: phone minutes from the webhook and Media Streams minutes per stream, the end
waiting for the cut reply's turn, usage arriving after the end, Twilio's own <Say>.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.bus import events as ev
from engine.config import Config
from engine.hub import OpsHub
from engine.money.prices import PriceTable
from engine.providers.base import AudioChunk, SynthesisDone, SynthesisEvent, Timing, Usage
from engine.providers.fallback_tts import FallbackTTS
from engine.session.call_session import CallSession
from engine.session.ports import ControlResult
from engine.session.records import TurnRecord
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.wiring import build_engine
from tests.harness import EventLog, base_sections, running_engine

LONG_REPLY = ("Our premium plan costs 45 dollars a month. It includes unlimited data and "
              "calls. You also get roaming in thirty countries at no extra cost. There is "
              "no contract, so you can cancel at any time. Every two years you get a free "
              "phone upgrade. Would you like me to sign you up today?")
QUESTION = "How much does the premium plan cost?"
USD_1E6 = Decimal("0.000001")


def dec(value: float) -> Decimal:
    return Decimal(repr(value))


# --- the whole engine against the vendors' bills ---------------------------------------


async def _cloud_engine(config: Config):  # type: ignore[no-untyped-def]
    return await build_engine(config, history=False, supervisor_api=False)


@pytest.mark.slow
async def test_ledger_equals_the_vendors_bills_through_cuts_and_timeouts(
        tmp_path: Path) -> None:
    openai, eleven = OpenAIStandin(api_key="sk-test"), ElevenLabsStandin(api_key="xi-test")
    oa_url, el_url = await openai.start(), await eleven.start()
    openai.transcript = QUESTION
    openai.reply = LONG_REPLY
    openai.token_interval_s = 0.08  # the reply takes ~4 s to write: cut while written
    sections = base_sections()
    sections["providers"] = {
        "stt": ["openai"], "agent": ["openai", "faq"], "tts": ["elevenlabs"],
        "llm_first_token_timeout_s": 1.0,
        "openai": {"api_key": "sk-test", "base_url": oa_url},
        "elevenlabs": {"api_key": "xi-test", "base_url": el_url}}
    sections["cache"] = {"backend": "off"}
    try:
        async with running_engine(tmp_path, make_engine=_cloud_engine, **sections) as run:
            events = EventLog(run)
            # A barge-in while the long reply is written and spoken, then a hang-up while
            # the answer to the barge-in is spoken.
            cut = run.caller()
            cut_result = await asyncio.wait_for(cut.run(Scenario(
                name="cut", hangup_at_end=False, steps=[
                    Step(say=QUESTION),
                    Step(say="Wait, where is your store?", barge_in=True, after_s=1.0),
                    Step(pause=2.5), Step(hangup=True)])), 90)
            # Noise first (transcribed as nothing, so no turn), then a question whose
            # first token comes too late: the FAQ agent answers instead.
            openai.latency_s = 1.6
            noise = iter([""])
            openai.transcript = lambda seconds: next(noise, QUESTION)
            late = run.caller()
            late_result = await asyncio.wait_for(late.run(Scenario(
                name="late", steps=[Step(say="Um, let me think."),
                                    Step(say=QUESTION, wait_timeout_s=2.0)])), 90)
            deps = run.engine.deps
            for chain in (deps.stt, deps.agent, deps.tts):
                await chain.settle_abandoned(20.0)
            await run.engine.hub.drain()
            await asyncio.sleep(0.2)
            await events.close()
            sessions = [run.engine.registry.get_any(c.call_sid) for c in (cut, late)]
            active = run.engine.hub.ledger.active_calls
    finally:
        await openai.stop()
        await eleven.stop()
    assert cut_result.error is None and late_result.error is None
    assert cut_result.clears_received >= 1  # the barge-in cut the agent off
    assert not active  # no ledger outlives its call
    sids = {cut.call_sid, late.call_sid}
    costs = [e for e in events.events if isinstance(e, ev.UsageCost) and e.call_sid in sids]

    # The vendors' bills, priced by the configured prices, plus one phone minute and one
    # Media Streams minute per call (each call is shorter than a minute).
    table = PriceTable(run.config.prices)
    vendors = openai.bill() + eleven.bill()
    expected = sum((table.cost_decimal(u)[0] for u in vendors), Decimal(0))
    prices = run.config.prices
    minutes = 2 * (dec(prices.twilio_per_minute) + dec(prices.twilio_media_streams_per_minute))
    booked = sum((dec(e.cost_usd) for e in costs), Decimal(0))
    assert abs(booked - (expected + minutes)) < USD_1E6, (booked, expected, minutes)

    # Every chat request the vendor billed is booked from its own usage, the cut reply,
    # the answer cut by the hang-up and the one that came too late included.
    chats = [u for u in vendors if u.kind == "llm"]
    assert len(chats) >= 3  # (the barge-in may reach the agent as two turns)
    assert all(u.output_tokens == len(LONG_REPLY.split()) for u in chats)  # read on to the end
    booked_chats = [e for e in costs if e.kind == "llm" and e.provider == "openai"]
    assert not any(e.estimated for e in booked_chats)
    assert Counter((e.input_tokens, e.output_tokens) for e in booked_chats) == \
        Counter((u.input_tokens, u.output_tokens) for u in chats)
    # The reply cut by the hang-up was still being written when the call ended: its usage
    # came after the end, booked under the call.
    ended_at = next(i for i, e in enumerate(events.events)
                    if isinstance(e, ev.CallEnded) and e.call_sid == cut.call_sid)
    assert any(isinstance(e, ev.UsageCost) and e.call_sid == cut.call_sid and e.kind == "llm"
               for e in events.events[ended_at:])
    # Every transcription and every voice request the vendors accepted.
    transcriptions = sum(u.kind == "stt" for u in vendors)
    assert Counter(e.kind for e in costs if e.provider == "openai") == {
        "llm": len(chats), "stt": transcriptions}
    voice = sum(e.characters for e in costs if e.provider == "elevenlabs")
    assert voice == sum(u.characters for u in eleven.bill()) > 0
    # Twilio: a phone minute from the webhook and a Media Streams minute, per call.
    twilio = Counter((e.call_sid, e.model) for e in costs
                     if e.kind == "telephony" and e.cost_usd)
    assert twilio == {(sid, m): 1 for sid in sids for m in ("voice", "media_stream")}
    # The noise was dropped, and its transcription is on the bill all the same.
    assert any(isinstance(e, ev.TranscriptLine) and e.call_sid == late.call_sid
               and e.speaker == "caller" and e.final and not e.text for e in events.events)
    # The timeout fell back to the FAQ agent, which answered (for free).
    assert any(e.provider == "faq" and e.call_sid == late.call_sid for e in costs)
    assert any(isinstance(e, ev.Alert) and e.kind == "provider_failover"
               for e in events.events)
    # The phone bill counts from the webhook, before the media stream started.
    for session in sessions:
        assert session is not None and session.ended_at is not None
        ended = next(e for e in events.events
                     if isinstance(e, ev.CallEnded) and e.call_sid == session.call_sid)
        assert ended.duration_s == pytest.approx(session.ended_at - session.created_at)


# --- one session and the hub, no network -----------------------------------------------


class _Player:
    """An `AudioOut` that plays nothing."""

    closed = False
    frames_sent = 0

    def enqueue_audio(self, ulaw: bytes) -> None:
        pass

    def enqueue_mark(self, name: str, pad: bool = True) -> None:
        pass

    async def clear(self) -> list[str]:
        return []

    def is_playing(self, now: float) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class _Control:
    """A `CallControl` whose every action succeeds."""

    async def say_then_reconnect(self, call_sid: str, text: str, from_number: str,
                                 to_number: str) -> ControlResult:
        return ControlResult(ok=True)

    async def transfer(self, call_sid: str, number: str, announcement: str) -> ControlResult:
        return ControlResult(ok=True)

    async def hang_up(self, call_sid: str) -> ControlResult:
        return ControlResult(ok=True)


async def _end_stream(reason: str) -> None:
    pass


def _hub_and_session(config: Config | None = None) -> tuple[OpsHub, CallSession,
                                                             list[ev.EventBase]]:
    config = config or Config()
    hub = OpsHub.from_config(config)
    published: list[ev.EventBase] = []
    hub.publish = published.append  # type: ignore[method-assign]
    session = CallSession("CA" + "b" * 32, config, tts=None, control=_Control(),  # type: ignore[arg-type]
                          observer=hub)
    hub.call_created(session)
    return hub, session, published


def _costs(published: list[ev.EventBase]) -> list[ev.UsageCost]:
    return [e for e in published if isinstance(e, ev.UsageCost)]


async def test_phone_minutes_count_from_the_webhook_and_each_stream_on_its_own() -> None:
    hub, session, published = _hub_and_session()
    prices = hub.config.prices
    # Twilio answered (the webhook) 59.5 s before the media stream started.
    session.created_at = time.time() - 59.5
    session.attach_stream("MZ1", _Player(), _end_stream)
    await asyncio.sleep(0.7)  # the call is now in its second phone minute
    session.awaiting_stream = True  # Twilio plays a <Say>, then a new stream comes
    session.stream_lost_while_awaiting()
    session.reattach_stream("MZ2", _Player(), _end_stream)
    await session.end("caller hung up")
    telephony = [(e.model, dec(e.cost_usd)) for e in _costs(published)
                 if e.kind == "telephony" and e.cost_usd]
    phone = [cost for model, cost in telephony if model == "voice"]
    streams = [cost for model, cost in telephony if model == "media_stream"]
    assert sum(phone) == 2 * dec(prices.twilio_per_minute)  # 60.2 s from the webhook
    # Two streams of under a minute: a started minute each, at the Media Streams rate.
    assert streams == [dec(prices.twilio_media_streams_per_minute)] * 2
    ended = next(e for e in published if isinstance(e, ev.CallEnded))
    assert ended.duration_s > 60.0 and not hub.ledger.active_calls


async def test_the_end_waits_for_the_cut_reply_and_late_usage_reopens_nothing() -> None:
    hub, session, published = _hub_and_session()
    order: list[str] = []

    async def reply() -> None:
        try:
            await asyncio.Event().wait()  # speaking, until cut
        finally:
            await asyncio.sleep(0.05)  # closing the agent stream, like the real reply
            order.append("turn")
            hub.turn_completed(session, TurnRecord(idx=1, caller_audio_s=2.0,
                                                   agent_audio_s=1.0))

    original = hub.call_ended

    def call_ended(s: CallSession, reason: str) -> None:
        order.append("ended")
        original(s, reason)

    hub.call_ended = call_ended  # type: ignore[method-assign]
    session.spawn(reply(), "reply")
    session.book(Usage("openai", "llm", "gpt-5.4-mini", input_tokens=1000, output_tokens=100))
    await asyncio.sleep(0.01)
    await session.end("caller hung up")
    assert order == ["turn", "ended"]  # the turn is recorded before the end is reported
    assert session.call_sid not in hub.ledger.active_calls
    ended = next(e for e in published if isinstance(e, ev.CallEnded))
    day_before = hub.ledger.today_usd

    # A request read on in the background finishes after the end: booked under the call
    # and in the day's total, without a ledger for the call again.
    late = Usage("openai", "llm", "gpt-5.4-mini", input_tokens=2000, output_tokens=50)
    session.book(late)
    hub.turn_completed(session, TurnRecord(idx=2, caller_audio_s=1.0, agent_audio_s=1.0))
    assert not hub.ledger.active_calls and hub.ledger.call(session.call_sid) is None
    cost = hub.ledger.prices.cost_decimal(late)[0]
    last = _costs(published)[-1]
    assert last.call_sid == session.call_sid and dec(last.cost_usd) == cost > 0
    assert dec(last.call_cost_usd) == dec(ended.cost_usd) + cost
    assert dec(hub.ledger.today_usd) == dec(day_before) + cost


class _Voice:
    """A voice that answers every line with a little audio and reports its characters."""
    runs_locally = False

    name = "voice"
    model = "voice-1"
    voice = "v"

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        yield AudioChunk(b"\xff" * 160)
        yield SynthesisDone(Usage("voice", "tts", self.model, characters=len(text)),
                            Timing(0.0, 0.0))

    def estimate_usage(self, text: str) -> Usage:
        return Usage(self.name, "tts", self.model, characters=len(text), estimated=True)

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_a_supervisor_line_is_booked_on_its_call() -> None:
    config = Config()
    hub = OpsHub.from_config(config)
    published: list[ev.EventBase] = []
    hub.publish = published.append  # type: ignore[method-assign]
    voice = FallbackTTS([_Voice()], first_audio_timeout_s=1.0)
    session = CallSession("CA" + "c" * 32, config, tts=voice, control=_Control(),
                          observer=hub)
    hub.call_created(session)
    session.attach_stream("MZ1", _Player(), _end_stream)
    # The supervisor's command runs in the API's task, not one of the call's.
    await session.say_now("One moment, I am checking that for you.")
    await session.end("caller hung up")
    lines = [e for e in _costs(published) if e.kind == "tts"]
    assert [(e.call_sid, e.characters) for e in lines] == [
        (session.call_sid, len("One moment, I am checking that for you."))]


async def test_twilio_speaking_for_us_is_booked() -> None:
    config = Config.model_validate({"transfer": {"announcement": "Connecting you now."}})
    hub, session, published = _hub_and_session(config)
    booked: list[Usage] = []
    original = hub.usage

    def usage(s: Any, u: Usage) -> None:
        booked.append(u)
        original(s, u)

    hub.usage = usage  # type: ignore[method-assign]
    session.attach_stream("MZ1", _Player(), _end_stream)
    await session.say_via_twilio("Sorry, one moment please.")
    await session.transfer("+15550100999", "caller asked for a person")
    await session.end("transferred")
    said = [(u.provider, u.kind, u.model, u.characters) for u in booked]
    assert said == [("twilio", "tts", "say", len("Sorry, one moment please.")),
                    ("twilio", "tts", "say", len("Connecting you now."))]
    assert {e.provider for e in _costs(published) if e.kind == "tts"} == {"twilio"}
