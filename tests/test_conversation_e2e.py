"""End-to-end offline calls with real audio: the simulated caller speaks (espeak), local
Whisper recognizes it, the FAQ agent answers, espeak speaks, and the caller hears it.
What the caller heard is checked by transcribing it."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.audio.codec import ulaw_to_int16
from engine.bus.events import Alert, UsageCost
from engine.config import Config
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.wiring import Providers, build_engine, build_providers
from tests.harness import (
    EventLog,
    base_sections,
    heard_text,
    local_providers,
    make_local_engine,
    running_engine,
)

pytestmark = pytest.mark.slow

async def cloud_tts_engine(config: Config):  # type: ignore[no-untyped-def]
    """Local speech recognition and agent; the voices the config names (cloud)."""
    local, cloud = local_providers(config), build_providers(config)
    return await build_engine(config, history=False, providers=Providers(
        stt=local.stt, agents=local.agents, tts=cloud.tts))


async def cloud_stt_engine(config: Config):  # type: ignore[no-untyped-def]
    """The speech recognition the config names (cloud); local agent and voice."""
    local, cloud = local_providers(config), build_providers(config)
    return await build_engine(config, history=False, providers=Providers(
        stt=cloud.stt, agents=local.agents, tts=local.tts))


async def test_faq_question_is_answered_and_heard(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        events = EventLog(run)
        caller = run.caller()
        result = await caller.run(Scenario(name="hours", steps=[
            Step(say="How much does the premium plan cost?")]))
        await asyncio.sleep(0.1)
        await events.close()
    assert result.error is None, result.error
    line = result.lines[0]
    assert line.reply_latency_s is not None and line.reply_latency_s < 3.0
    # What the caller heard after its question, transcribed: the pricing answer.
    start = int((line.ended_at - result.started_at) / 0.02) * 160
    text = await heard_text(bytes(result.heard[start:]))
    assert "45" in text or "forty" in text or "premium" in text, text
    callers = [e.text.lower() for e in events.lines(caller.call_sid, "caller") if e.text]
    assert any("premium" in t for t in callers), callers
    agents = [e.text for e in events.lines(caller.call_sid, "agent")]
    assert any("45 dollars" in t for t in agents), agents


async def test_representative_request_ends_in_a_transfer(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(
            name="person", hangup_at_end=False,
            steps=[Step(say="I want to speak to a representative.")])), 60)
        session = run.engine.registry.get_any(caller.call_sid)
    assert result.ended_by == "redirect", (result.ended_by, result.error)
    dial = ET.fromstring(result.redirects[0]).findtext("./Dial/Number")
    assert dial == run.config.transfer.number
    assert session is not None and session.escalated
    assert session.end_reason == "transferred"


async def test_dtmf_zero_asks_for_a_human(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(
            name="zero", hangup_at_end=False, steps=[Step(dtmf="0")])), 60)
    assert result.ended_by == "redirect"
    assert run.rest.updates_for(caller.call_sid)


async def test_barge_in_clears_and_context_keeps_what_was_heard(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(name="barge", steps=[
            Step(say="How much does the premium plan cost?"),
            Step(say="Where are you located?", barge_in=True, after_s=1.0),
        ])), 90)
        session = run.engine.registry.get_any(caller.call_sid)
    assert result.error is None
    assert result.clears_received >= 1
    assert session is not None and session.conversation is not None
    pipeline: Any = session.conversation
    turns = pipeline.context.turns
    assert len(turns) >= 2
    pricing_turn = next(t for t in turns if "premium" in t.user.lower())
    full = ("The Basic plan is 20 dollars a month with 10 gigabytes of data. The Premium "
            "plan is 45 dollars a month with unlimited data and calls.")
    # Cut during the first sentence: only what the caller heard (by marks, to 400 ms) is
    # kept — the first words of that sentence, marked as cut.
    assert len(pricing_turn.assistant) < len(full)
    heard = pricing_turn.assistant
    assert heard.endswith("…") and len(heard) > 3, heard
    assert full.startswith(heard[:-1]), heard
    assert result.marks_echoed  # the cut sentence's mark was echoed after the clear
    assert "45 dollars" not in pricing_turn.assistant
    assert "Main Street" in turns[-1].assistant


async def test_backchannel_does_not_cut_the_agent_off(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        events = EventLog(run)
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(name="uhhuh", steps=[
            Step(say="How much does the premium plan cost?"),
            Step(say="Okay.", barge_in=True, after_s=1.0),
        ])), 90)
        await run.engine.hub.drain()
        await events.close()
    assert result.error is None
    assert result.clears_received == 0
    # The whole answer played: its last mark came back as heard.
    assert result.marks_received == result.marks_echoed
    # The ignored backchannel was transcribed all the same: on the bill with the question.
    heard = [e for e in events.events if isinstance(e, UsageCost)
             and e.call_sid == caller.call_sid and e.kind == "stt"]
    backchannels = [e for e in events.lines(caller.call_sid, "caller")
                    if "okay" in e.text.lower()]
    assert len(heard) >= 2 and backchannels, (len(heard), backchannels)


async def test_failing_tts_falls_back_and_the_call_goes_on(tmp_path: Path) -> None:
    standin = ElevenLabsStandin(api_key="xi-test")
    url = await standin.start()
    standin.mode = "500"
    try:
        sections = base_sections()
        sections["providers"] = {"tts": ["elevenlabs", "espeak"],
                                 "elevenlabs": {"api_key": "xi-test", "base_url": url}}

        async with running_engine(tmp_path, make_engine=cloud_tts_engine,
                                  **sections) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await caller.run(Scenario(name="fallback", steps=[
                Step(say="Where are you located?")]))
            await asyncio.sleep(0.1)
            await events.close()
    finally:
        await standin.stop()
    assert result.error is None
    assert standin.requests, "the first provider was tried"
    alerts = [e for e in events.events if isinstance(e, Alert) and e.kind == "provider_failover"]
    assert alerts and "elevenlabs" in alerts[0].message
    agents = [e.text for e in events.lines(caller.call_sid, "agent")]
    assert any("Main Street" in t for t in agents)
    samples = ulaw_to_int16(bytes(result.agent_audio)).astype(np.float64)
    assert np.sqrt(np.mean(samples ** 2)) > 300  # real speech reached the caller


async def test_low_confidence_says_sorry_then_hands_off(tmp_path: Path) -> None:
    from engine.sim.standins.openai_api import OpenAIStandin

    standin = OpenAIStandin(api_key="sk-test")
    url = await standin.start()
    standin.transcript = "mumble mumble"
    standin.avg_logprob = -1.6  # whisper-1 verbose_json: a poor segment
    sections = base_sections()
    sections["providers"] = {"stt": ["openai"], "openai": {
        "api_key": "sk-test", "base_url": url, "stt_model": "whisper-1"}}
    sections["policy"] = {"max_misunderstandings": 2}

    try:
        async with running_engine(tmp_path, make_engine=cloud_stt_engine,
                                  **sections) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario(
                name="mumble", hangup_at_end=False,
                steps=[Step(say="Where are you located?"), Step(say="Where is your store?")])),
                90)
            await asyncio.sleep(0.1)
            await events.close()
    finally:
        await standin.stop()
    agents = [e.text for e in events.lines(caller.call_sid, "system")] + \
        [e.text for e in events.lines(caller.call_sid, "agent")]
    assert any("didn't catch that" in t for t in agents), agents
    assert result.ended_by == "redirect"  # the second miss hands the caller to a person
    alerts = [e.kind for e in events.events if isinstance(e, Alert)]
    assert "low_confidence" in alerts and "handoff_requested" in alerts


async def test_call_over_its_cost_cap_is_handed_to_a_person(tmp_path: Path) -> None:
    sections = base_sections()
    # The first phone minute (billed as it starts) already costs more than the cap.
    sections["prices"] = {"twilio_per_minute": 0.06}
    sections["policy"] = {"call_cost_cap_usd": 0.05}
    async with running_engine(tmp_path, make_engine=make_local_engine, **sections) as run:
        events = EventLog(run)
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(
            name="cap", hangup_at_end=False, steps=[Step(say="Where are you located?")])), 60)
        await asyncio.sleep(0.1)
        await events.close()
    assert result.ended_by == "redirect"
    kinds = [e.kind for e in events.events if isinstance(e, Alert)]
    assert "call_cost_cap" in kinds and "handoff_requested" in kinds
    agents = [e.text for e in events.lines(caller.call_sid, "agent")]
    assert any("colleague" in t for t in agents), agents


async def test_repeated_question_is_answered_from_the_cache(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **base_sections()) as run:
        events = EventLog(run)
        before = run.engine.deps.cache.stats().audio.hits
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(name="twice", steps=[
            Step(say="Where are you located?"), Step(say="Where are you located?")])), 90)
        stats = run.engine.deps.cache.stats()
        metrics, _ = run.engine.hub.metrics.render()
        await run.engine.hub.drain()
        await events.close()
    assert result.error is None
    # The answer's audio (and the greeting's) were synthesized once, then replayed.
    assert stats.audio.hits - before >= 1
    assert b"switchboard_cache_hits_total 1.0" in metrics or \
        b"switchboard_cache_hits_total 2.0" in metrics
    # Cache hits are on the bill as free lines that say where they came from.
    hits = [e for e in events.events if isinstance(e, UsageCost)
            and e.call_sid == caller.call_sid and e.cached]
    assert {e.kind for e in hits} == {"llm", "tts"}, hits
    assert all(e.cost_usd == 0 for e in hits)
    assert any(e.provider == "answer_cache" for e in hits)


async def test_when_every_voice_fails_twilio_says_it_and_the_call_goes_on(
        tmp_path: Path) -> None:
    standin = ElevenLabsStandin(api_key="xi-test")
    url = await standin.start()
    standin.mode = "500"
    try:
        sections = base_sections()
        sections["providers"] = {"tts": ["elevenlabs"],
                                 "elevenlabs": {"api_key": "xi-test", "base_url": url}}

        async with running_engine(tmp_path, make_engine=cloud_tts_engine,
                                  **sections) as run:
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario(name="say", steps=[
                Step(say="Where are you located?")])), 90)
            session = run.engine.registry.get_any(caller.call_sid)
            updates = run.rest.updates_for(caller.call_sid)
    finally:
        await standin.stop()
    assert result.error is None, result.error
    # The greeting and the answer were spoken by Twilio's <Say>, each followed by a new
    # media stream for the same call; the caller hung up normally at the end.
    assert any("How can I help" in s for s in result.twilio_says), result.twilio_says
    assert result.lines, "the caller spoke after the first <Say>"
    assert any("Main Street" in s for s in result.twilio_says), result.twilio_says
    assert result.streams >= 3 and result.ended_by == "caller"
    assert all("<Say>" in u.form.get("Twiml", "") for u in updates)
    assert session is not None and session.end_reason == "caller hung up"
