"""Hearing the caller: the transcript ready when the turn ends, and endpointing that knows
a finished sentence. Real engines, real caller audio (espeak), local Whisper or the
OpenAI realtime transcription stand-in through the official SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.bus.events import TurnLatency
from engine.config import Config
from engine.session.completeness import completeness
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.openai_api import OpenAIStandin
from engine.wiring import Providers, build_engine, build_providers
from tests.harness import (
    EventLog,
    base_sections,
    local_providers,
    make_local_engine,
    running_engine,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("text", "verdict"), [
    ("What time do you open?", "complete"),
    ("I would like to check my order status.", "complete"),
    ("No thanks.", "complete"),
    ("Yes", "complete"),
    ("Can I get two?", "complete"),
    ("My number is 4 1 5.", "trailing"),
    ("I want to", "trailing"),
    ("and, uh,", "trailing"),
    ("um", "trailing"),
    ("It is for my order", "unknown"),
    ("", "unknown"),
])
def test_completeness(text: str, verdict: str) -> None:
    assert completeness(text) == verdict


async def _call(tmp_path: Path, steps: list[Step], make_engine: Callable[[Config], Any],
                **sections: dict[str, Any]) -> tuple[list[str], list[TurnLatency]]:
    async with running_engine(tmp_path, make_engine=make_engine, **sections) as run:
        events = EventLog(run)
        caller = run.caller()
        result = await asyncio.wait_for(caller.run(Scenario(name="hearing", steps=steps)), 90)
        await asyncio.sleep(0.2)
        await events.close()
    assert result.error is None, result.error
    callers = [e.text for e in events.lines(caller.call_sid, "caller") if e.text]
    latencies = [e for e in events.events if isinstance(e, TurnLatency)]
    return callers, latencies


async def test_a_number_read_out_with_a_pause_stays_one_turn(tmp_path: Path) -> None:
    # 0.7 s of silence inside the line: longer than the 0.5 s that ends a turn whose
    # words are unknown, shorter than the wait for words that trail off.
    line = "My phone number is four one five / five five five zero one zero zero."
    callers, _ = await _call(tmp_path, [Step(say=line)], make_local_engine, **base_sections())
    assert len(callers) == 1, callers
    said = callers[0].lower()
    # Both halves in the one turn. The neural caller voice varies from run to run, and
    # Whisper has heard its "four" as "for": the number's end is what tells the halves.
    assert ("15" in said or "one five" in said or "1 5" in said) and "0" in said, said

    # Without semantic endpointing the pause ends the turn in the middle of the number.
    sections = base_sections()
    sections["turns"]["semantic_endpointing"] = False
    callers, _ = await _call(tmp_path / "plain", [Step(say=line)], make_local_engine,
                             **sections)
    assert len(callers) == 2, callers


async def _realtime_engine(config: Config):  # type: ignore[no-untyped-def]
    local, cloud = local_providers(config), build_providers(config)
    return await build_engine(config, history=False, providers=Providers(
        stt=cloud.stt, agents=local.agents, tts=local.tts))


@pytest.mark.parametrize("semantic", [True, False])
async def test_a_streaming_recognizer_has_the_transcript_when_the_turn_ends(
        tmp_path: Path, semantic: bool) -> None:
    standin = OpenAIStandin(api_key="sk-test")
    url = await standin.start()
    standin.latency_s = 0.15
    standin.transcript = "Where is your store?"
    sections = base_sections()
    sections["turns"]["semantic_endpointing"] = semantic
    sections["providers"] = {"stt": ["openai_realtime"], "openai": {
        "api_key": "sk-test", "base_url": url}}
    try:
        callers, latencies = await _call(tmp_path, [Step(say="Where is your store?")],
                                         _realtime_engine, **sections)
    finally:
        await standin.stop()
    assert callers == ["Where is your store?"]
    (turn,) = latencies
    assert turn.endpointing_s is not None and turn.stt_s is not None
    heard_after = turn.endpointing_s + turn.stt_s  # silence + waiting for the words
    if semantic:
        # Cut at the first pause, transcribed while the caller was silent; a complete
        # question ends the turn as soon as its words are in: well under 0.5 s + 0.15 s.
        assert turn.endpointing_s < 0.45 and turn.stt_s < 0.05, turn
        assert heard_after < 0.45, turn
    else:
        # The whole turn streamed, committed when 0.5 s of silence ended it.
        assert turn.endpointing_s >= 0.5 and 0.14 < turn.stt_s < 0.5, turn
