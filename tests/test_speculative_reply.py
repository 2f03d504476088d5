"""A speculative reply (turns.speculative_reply): the agent starts on the caller's words
at a pause; used when the turn ends on them, thrown away and billed when the caller goes
on. Real engines, real caller audio, the OpenAI stand-in (realtime transcription and chat)
through the official SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.bus.events import ToolCalled, TranscriptLine, TurnLatency, UsageCost
from engine.config import Config
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.openai_tools import ToolRule
from engine.wiring import Providers, build_engine, build_providers
from tests.harness import EventLog, base_sections, local_providers, running_engine
from tests.test_tools_calls import order_answer, texts, tool_engine

pytestmark = pytest.mark.slow

LLM_LATENCY_S = 0.4


async def _cloud_engine(config: Config):  # type: ignore[no-untyped-def]
    """OpenAI's realtime transcription and chat (stand-in), a local voice."""
    local, cloud = local_providers(config), build_providers(config)
    return await build_engine(config, history=False, providers=Providers(
        stt=cloud.stt, agents=cloud.agents, tts=local.tts))


def _sections(url: str, speculate: bool) -> dict[str, dict[str, Any]]:
    sections = base_sections()
    sections["turns"]["speculative_reply"] = speculate
    sections["providers"] = {"stt": ["openai_realtime"], "agent": ["openai"],
                             "openai": {"api_key": "sk-test", "base_url": url}}
    return sections


async def _call(tmp_path: Path, standin: OpenAIStandin, line: str, speculate: bool
                ) -> tuple[list[str], list[TurnLatency], list[UsageCost], int]:
    url = await standin.start()
    try:
        async with running_engine(tmp_path, make_engine=_cloud_engine,
                                  **_sections(url, speculate)) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await asyncio.wait_for(
                caller.run(Scenario(name="speculation", steps=[Step(say=line)])), 90)
            await asyncio.sleep(0.3)
            await events.close()
    finally:
        await standin.stop()
    assert result.error is None, result.error
    callers = [e.text for e in events.lines(caller.call_sid, "caller") if e.text]
    latencies = [e for e in events.events if isinstance(e, TurnLatency)]
    llm = [e for e in events.events if isinstance(e, UsageCost) and e.kind == "llm"]
    chats = sum(1 for r in standin.requests if r.path.endswith("/chat/completions"))
    return callers, latencies, llm, chats


def _standin(*segments: str) -> OpenAIStandin:
    """Each committed segment of the caller's audio is transcribed as the next text."""
    standin = OpenAIStandin(api_key="sk-test")
    standin.latency_s = LLM_LATENCY_S
    standin.realtime.latency_s = 0.15  # the words at a pause are in 0.15 s after it
    heard = list(segments)

    def transcript(seconds: float) -> str:
        return heard.pop(0) if len(heard) > 1 else heard[0]

    standin.transcript = transcript
    standin.reply = "Your order shipped on Monday. It should arrive by Thursday."
    return standin


async def test_a_turn_that_ends_on_its_words_at_a_pause_is_answered_from_the_head_start(
        tmp_path: Path) -> None:
    # Words neither finished nor trailing off: the turn waits the usual 0.5 s of silence,
    # and the agent, started at the pause, has its first token by then.
    callers, latencies, llm, chats = await _call(
        tmp_path, _standin("It is about my order"), "It is about my order", speculate=True)
    assert callers == ["It is about my order"]
    assert chats == 1 and len(llm) == 1  # asked once: the speculation was the reply
    (turn,) = latencies
    assert turn.speculated
    assert turn.llm_first_token_s is not None and turn.endpointing_s is not None
    # 0.4 s of LLM latency, most of it spent while the engine waited for the silence.
    assert turn.llm_first_token_s < LLM_LATENCY_S - 0.15, turn

    callers, latencies, llm, chats = await _call(
        tmp_path / "off", _standin("It is about my order"), "It is about my order",
        speculate=False)
    assert chats == 1
    (plain,) = latencies
    assert not plain.speculated
    assert plain.llm_first_token_s is not None and plain.llm_first_token_s >= LLM_LATENCY_S
    assert turn.voice_to_voice_s < plain.voice_to_voice_s - 0.15, (turn, plain)


async def test_a_caller_who_goes_on_after_the_pause_gets_an_answer_to_the_whole_turn(
        tmp_path: Path) -> None:
    # "if" trails off: the turn waits; the speculation on it is thrown away when the
    # caller goes on, and billed; the answer is to the whole line.
    standin = _standin("I was wondering if", "you are open on Sunday?")
    asked: list[str] = []
    standin.reply = lambda last_user: asked.append(last_user) or "We are open on Sunday."
    callers, latencies, llm, chats = await _call(
        tmp_path, standin, "I was wondering if / you are open on Sunday?", speculate=True)
    assert callers == ["I was wondering if you are open on Sunday?"]
    assert asked == ["I was wondering if", "I was wondering if you are open on Sunday?"]
    assert chats == 2
    assert len(llm) == 2 and all(u.cost_usd > 0 for u in llm)  # the thrown-away one too
    assert len(latencies) == 1 and not latencies[0].speculated


async def test_a_speculated_first_round_asks_for_a_tool_that_runs_only_once_the_turn_is_real(
        tmp_path: Path) -> None:
    # A number at the end trails off: the turn waits 1.2 s, while the speculative first
    # round already asks for the lookup; the tool runs after the turn has ended, once.
    rules = [ToolRule.single("4471", "lookup_order", {"order_id": "4471"}, order_answer)]
    turns = {**base_sections()["turns"], "speculative_reply": True}
    async with tool_engine(tmp_path, ["My order number is 4471."], rules,
                           stt="openai_realtime", turns=turns) as t:
        result = await t.call(Step(say="My order number is four four seven one."))
        chats = sum(1 for r in t.openai.requests if r.path.endswith("/chat/completions"))
    assert result.error is None
    assert texts(t.agent_lines(result.call_sid)) == ["Your order 4471 is shipped."]
    assert t.api.requests == [{"order_id": "4471"}]
    assert chats == 2  # the speculated round (used, not asked again) and the answer's
    [turn] = [e for e in t.events.events if isinstance(e, TurnLatency)
              and e.call_sid == result.call_sid]
    assert turn.speculated
    order = [e for e in t.events.events if e.call_sid == result.call_sid and (
        isinstance(e, ToolCalled)
        or (isinstance(e, TranscriptLine) and e.speaker == "caller" and e.final and e.text))]
    assert isinstance(order[0], TranscriptLine) and isinstance(order[-1], ToolCalled)


async def test_a_speculated_reply_is_cut_by_a_barge_in_like_any_other(tmp_path: Path) -> None:
    standin = _standin("It is about my order", "Wait, stop.")
    standin.reply = ("Your order shipped on Monday from our warehouse in Ohio. It should "
                     "arrive by Thursday, and you will get an email with the tracking "
                     "number as soon as the carrier scans it.")
    url = await standin.start()
    try:
        async with running_engine(tmp_path, make_engine=_cloud_engine,
                                  **_sections(url, speculate=True)) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario(name="speculation", steps=[
                Step(say="It is about my order"),
                Step(say="Wait, stop.", barge_in=True, after_s=1.0)])), 90)
            await asyncio.sleep(0.3)
            await events.close()
    finally:
        await standin.stop()
    assert result.error is None, result.error
    agent = [e for e in events.lines(caller.call_sid, "agent") if e.final]
    first_answer = next(e for e in agent if e.text.startswith("Your order shipped"))
    assert first_answer.interrupted  # cut where the caller spoke over it
    assert first_answer.heard_text and len(first_answer.heard_text) < len(standin.reply)
    latencies = [e for e in events.events if isinstance(e, TurnLatency)]
    assert latencies[0].speculated
    chats = sum(1 for r in standin.requests if r.path.endswith("/chat/completions"))
    llm = [e for e in events.events if isinstance(e, UsageCost) and e.kind == "llm"]
    assert len(llm) == chats  # every request on the bill, the cut one included
