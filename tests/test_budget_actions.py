"""Caps and budgets that act, on a real engine: every budget action through a signed voice
webhook (refuse, forward, forward without a number), degrade answering the next turn with
the cheapest chains, the per-call cap acting when a booking crosses it (transfer, or a
closing line and a hang-up, never a loop), the state as events and in /healthz, its lift
at the next UTC day, its seed from the history, and two engines sharing one budget
through a real redis-server."""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from engine.app import Engine
from engine.bus.events import Alert, BudgetStateChanged, TranscriptLine, UsageCost
from engine.config import Config, ConfigError, load_config
from engine.hub import OpsHub
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.supervision.api_schema import Snapshot
from engine.wiring import NoProviderError, build_cheapest, build_engine, build_providers
from tests.harness import (
    EventLog,
    RunningEngine,
    base_sections,
    local_providers,
    make_config,
    make_local_engine,
    running_engine,
)
from tests.test_budget import Clock
from tests.test_operations import Console, ops_sections, supervised_engine, wait_for
from tests.test_telephony_edge import VOICE_FORM, held_call, post_voice, twilio_signature

# $0.05 per 1K characters in the shipped catalog: 20 characters are $0.001.
VOICE = ("elevenlabs", "eleven_flash_v2_5")
STATE_OF = {"refuse": "refusing", "forward": "forwarding", "degrade": "degraded"}


def usage_costing(run: RunningEngine, usd: str) -> Usage:
    """A voice request that costs exactly `usd` at the configured list price."""
    usage = Usage(VOICE[0], "tts", VOICE[1], characters=1000)
    per_1k = PriceTable(run.config.prices).cost_decimal(usage)[0]
    return Usage(VOICE[0], "tts", VOICE[1], characters=int(Decimal(usd) / per_1k * 1000))


def book(run: RunningEngine, usd: str) -> None:
    """Spend outside any call (a summary, a drained request): it counts all the same."""
    run.engine.hub.usage(None, usage_costing(run, usd))


async def new_call(run: RunningEngine, n: int = 1) -> tuple[int, ET.Element]:
    """A signed voice webhook for a new call; its status and TwiML."""
    form = dict(VOICE_FORM, CallSid="CA" + f"{n:032d}")
    status, _, body = await post_voice(run, twilio_signature(run.url + "/twilio/voice", form),
                                       form)
    return status, ET.fromstring(body)


def refused(root: ET.Element, config: Config) -> bool:
    return [e.tag for e in root] == ["Say", "Hangup"] and \
        root.findtext("Say") == config.budget.refuse_message


def forwarded_to(root: ET.Element) -> str | None:
    return root.findtext("./Dial/Number") if root.find("Connect") is None else None


async def health(run: RunningEngine) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as resp:
        return dict(await resp.json())


def budget_events(events: EventLog) -> list[tuple[str, str, str, str]]:
    return [(e.old, e.new, e.limit, e.period) for e in events.events
            if isinstance(e, BudgetStateChanged)]


def alerts(events: EventLog) -> list[tuple[str, str]]:
    return [(e.kind, e.severity) for e in events.events if isinstance(e, Alert)]


async def settle(run: RunningEngine, events: EventLog) -> None:
    await run.engine.hub.drain()
    await asyncio.sleep(0.05)  # the bus hands the last events to the reader
    await events.close()


# -- the daily and monthly budget, through the voice webhook -----------------------------


async def test_refuse_answers_new_calls_with_a_line_and_a_hang_up(tmp_path: Path) -> None:
    async with running_engine(tmp_path, budget={"daily_usd": 1.0,
                                                "on_exhausted": "refuse"}) as run:
        events = EventLog(run)
        book(run, "0.99")
        status, before = await new_call(run, 1)
        book(run, "0.01")
        status2, after = await new_call(run, 2)
        hub = run.engine.hub
        today = hub.ledger.today_usd
        await settle(run, events)
    assert status == status2 == 200
    assert before.find("./Connect/Stream") is not None  # under the limit: taken
    assert refused(after, run.config)
    assert run.engine.registry.get_any("CA" + f"{2:032d}") is None  # no session made
    assert hub.turned_away == {"refuse": 1}
    # Twilio bills the refused call's first minute: booked, on the day's total.
    phone = [e for e in events.events if isinstance(e, UsageCost) and e.kind == "telephony"]
    assert [e.cost_usd for e in phone] == [run.config.prices.twilio_per_minute]
    assert today == pytest.approx(1.0 + run.config.prices.twilio_per_minute)


async def test_forward_dials_the_human_number(tmp_path: Path) -> None:
    async with running_engine(tmp_path, budget={"daily_usd": 1.0,
                                                "on_exhausted": "forward"}) as run:
        book(run, "1.0")
        status, root = await new_call(run)
        state = run.engine.hub.budget.state()
    assert status == 200 and state == "forwarding"
    assert forwarded_to(root) == run.config.transfer.number == "+15550100999"
    assert root.findtext("Say") == run.config.transfer.announcement
    assert run.engine.hub.turned_away == {"forward": 1}


async def test_forward_without_a_number_says_so_at_start_and_refuses(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_engine(tmp_path, transfer={"number": ""},
                                  budget={"daily_usd": 1.0, "on_exhausted": "forward"}) as run:
            book(run, "1.0")
            _, root = await new_call(run)
            state = run.engine.hub.budget.state()
    assert any(e["event"] == "budget.forward_without_number" and e["log_level"] == "warning"
               for e in logs)
    assert state == "refusing" and refused(root, run.config)


async def test_state_events_alerts_healthz_and_the_lift_at_the_next_utc_day(
        tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 24, 23, 50, tzinfo=UTC))

    def engine(config: Config) -> Engine:
        return Engine(config, hub=OpsHub.from_config(config, clock=clock))

    async with running_engine(tmp_path, make_engine=engine,
                              budget={"daily_usd": 1.0, "monthly_usd": 100.0,
                                      "on_exhausted": "refuse"}) as run:
        events = EventLog(run)
        book(run, "0.8")
        book(run, "0.2")
        exhausted = await health(run)
        _, root = await new_call(run, 1)
        clock.now = datetime(2026, 11, 25, 0, 0, 1, tzinfo=UTC)  # nothing booked since
        _, next_day = await new_call(run, 2)
        lifted = await health(run)
        await settle(run, events)
    assert budget_events(events) == [("ok", "warning", "daily", "2026-11-24"),
                                     ("warning", "refusing", "daily", "2026-11-24"),
                                     ("refusing", "ok", "daily", "2026-11-25")]
    assert alerts(events) == [("daily_budget", "warning"), ("daily_budget", "critical")]
    assert [e.message for e in events.events if isinstance(e, Alert)][-1] == \
        "daily budget refusing: $1.00 of $1 (2026-11-24); new calls are refused"
    assert exhausted["status"] == "degraded"
    assert "budget refusing: daily limit $1.00 reached (2026-11-24)" in exhausted["degraded"]
    assert (exhausted["budget"]["state"], exhausted["budget"]["daily_usd"]) == ("refusing", 1.0)
    assert refused(root, run.config)
    assert next_day.find("./Connect/Stream") is not None
    assert lifted["status"] == "ok" and lifted["budget"]["state"] == "ok"
    # The month goes on: the day's $1 and the refused call's phone minute.
    minute = run.config.prices.twilio_per_minute
    assert lifted["budget"]["monthly_usd"] == pytest.approx(1.0 + minute)


async def test_the_monthly_limit_has_its_own_alert_and_degrade_still_takes_calls(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, budget={"daily_usd": 0.0, "monthly_usd": 1.0,
                                                "on_exhausted": "degrade"}) as run:
        events = EventLog(run)
        book(run, "1.0")
        _, root = await new_call(run)
        snapshot = run.engine.hub.snapshot().totals
        await settle(run, events)
    assert [(new, limit) for _, new, limit, _ in budget_events(events)] == [
        ("degraded", "monthly")]
    assert alerts(events) == [("monthly_budget", "critical")]
    assert root.find("./Connect/Stream") is not None  # degraded calls are still taken
    assert (snapshot.budget_state, snapshot.budget_limit) == ("degraded", "monthly")


async def test_the_console_api_shows_the_budget_state(tmp_path: Path) -> None:
    sections = ops_sections()
    sections["budget"] = {"daily_usd": 1.0, "on_exhausted": "refuse"}
    async with running_engine(tmp_path, make_engine=supervised_engine, **sections) as run:
        watching = Console(run)
        await watching.connect()
        await wait_for(lambda: any(isinstance(f, Snapshot) for f in watching.frames))
        book(run, "1.0")
        await wait_for(lambda: watching.events(BudgetStateChanged))
        joining = Console(run)
        await joining.connect()
        await wait_for(lambda: any(isinstance(f, Snapshot) for f in joining.frames))
        for console in (watching, joining):
            await console.close()
    live = watching.events(BudgetStateChanged)[-1]
    assert (live.old, live.new, live.limit, live.totals) == ("ok", "refusing", "daily", "local")
    totals = next(f for f in joining.frames if isinstance(f, Snapshot)).totals
    assert (totals.budget_state, totals.budget_limit, totals.today_usd) == (
        "refusing", "daily", 1.0)


async def test_the_state_at_start_is_seeded_from_the_history(tmp_path: Path) -> None:
    sections: dict[str, Any] = {"budget": {"daily_usd": 1.0, "on_exhausted": "refuse"}}

    async def engine(config: Config) -> Engine:
        return await build_engine(config, providers=local_providers(config),
                                  supervisor_api=False)

    async with running_engine(tmp_path, make_engine=engine, **sections) as run:
        book(run, "1.0")  # written to the history as it is booked
        await run.engine.hub.drain()
    async with running_engine(tmp_path, make_engine=engine, **sections) as again:
        state = again.engine.hub.budget.state()
        _, root = await new_call(again)
    assert state == "refusing" and refused(root, again.config)


@pytest.mark.redis
@pytest.mark.parametrize("action", ["refuse", "forward"])
async def test_two_engines_sharing_redis_reach_one_budget_and_both_act(
        tmp_path: Path, redis_url: str, action: str) -> None:
    sections: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": f"test-{uuid.uuid4().hex[:8]}"},
        "budget": {"daily_usd": 1.0, "monthly_usd": 100.0, "on_exhausted": action,
                   "refresh_s": 0.05}}

    async def engine(config: Config) -> Engine:
        return await build_engine(config, history=False, providers=local_providers(config),
                                  supervisor_api=False)

    async with running_engine(tmp_path / "a", make_engine=engine, **sections) as a, \
            running_engine(tmp_path / "b", make_engine=engine, **sections) as b:
        budgets = [run.engine.hub.budget for run in (a, b)]
        assert [budget.totals.mode for budget in budgets] == ["shared", "shared"]
        book(a, "0.6")  # each engine alone stays under the limit
        book(b, "0.5")
        async with asyncio.timeout(5):
            while [budget.state() for budget in budgets] != [STATE_OF[action]] * 2:
                await asyncio.sleep(0.02)
        fleet = [budget.reading().daily.spent_usd for budget in budgets]
        answers = [await new_call(run) for run in (a, b)]
    assert fleet == [Decimal("1.1")] * 2  # both count the fleet's spend
    for status, root in answers:
        assert status == 200
        if action == "refuse":
            assert refused(root, a.config)
        else:
            assert forwarded_to(root) == "+15550100999"


# -- degrade: the next turn is answered by the cheapest chains ------------------------------


async def test_degrade_answers_the_next_turn_with_the_cheapest_chains(tmp_path: Path) -> None:
    openai, eleven = OpenAIStandin(api_key="sk-test"), ElevenLabsStandin(api_key="xi-test")
    oa_url, el_url = await openai.start(), await eleven.start()
    question = "How much does the premium plan cost?"
    openai.transcript = question
    openai.reply = "This is the cloud model speaking."
    sections = base_sections()
    # The cloud stand-ins serve; the cheapest chains are the shipped defaults (local).
    sections["providers"] = {
        "stt": ["openai"], "agent": ["openai"], "tts": ["elevenlabs"],
        "openai": {"api_key": "sk-test", "base_url": oa_url},
        "elevenlabs": {"api_key": "xi-test", "base_url": el_url}}
    sections["cache"] = {"backend": "off"}
    sections["budget"] = {"daily_usd": 1.0, "on_exhausted": "degrade"}

    async def engine(config: Config) -> Engine:
        return await build_engine(config, history=False, supervisor_api=False)

    try:
        async with running_engine(tmp_path, make_engine=engine, **sections) as run:
            events = EventLog(run)
            caller = run.caller()
            call = asyncio.create_task(caller.run(Scenario(name="degrade", steps=[
                Step(say=question), Step(pause=1.0), Step(say=question)])))
            async with asyncio.timeout(60):
                while not events.lines(caller.call_sid, "agent")[1:]:  # greeting, answer
                    await asyncio.sleep(0.05)
            cloud = (len(openai.usage_log), len(eleven.requests))
            book(run, "1.0")  # the day's budget is gone: new turns degrade
            result = await asyncio.wait_for(call, 60)
            health_now = await health(run)
            await settle(run, events)
    finally:
        await openai.stop()
        await eleven.stop()
    assert result.error is None, result.error
    answers = [e.text for e in events.lines(caller.call_sid, "agent")]
    faq = {e.id: e.answer for e in run.config.faq.entries}
    assert answers[1] == openai.reply  # before: the cloud agent
    assert answers[2] == faq["pricing"]  # after: the FAQ agent, heard through Whisper
    # Nothing more went to the cloud: no transcription, reply or synthesis.
    assert (len(openai.usage_log), len(eleven.requests)) == cloud
    spoken = [e.provider for e in events.events if isinstance(e, UsageCost)
              and e.kind == "tts" and e.call_sid == caller.call_sid]
    assert spoken[-1] in ("piper", "espeak") and "elevenlabs" in spoken
    assert [new for _, new, _, _ in budget_events(events)] == ["degraded"]
    assert any(r.startswith("budget degraded") for r in health_now["degraded"])


# -- the per-call cap ---------------------------------------------------------------------


def cap_sections(**transfer: str) -> dict[str, dict[str, Any]]:
    sections = base_sections()
    # The first phone and Media Streams minutes ($0.0125, booked as the stream starts)
    # pass the warning share; the booking the test makes passes the cap.
    sections["policy"] = {"call_cost_cap_usd": 0.02, "call_cost_warning_share": 0.5}
    sections["transfer"] = dict(transfer)
    return sections


def said(events: EventLog, sid: str, text: str) -> int:
    return sum(1 for e in events.events if isinstance(e, TranscriptLine) and e.final
               and e.call_sid == sid and e.text == text)


async def test_cap_crossed_while_idle_transfers_at_once(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **cap_sections(number="+15550100999")) as run:
        events = EventLog(run)
        caller, task, session = await held_call(run)
        await caller.wait_agent_done(timeout=20)  # the greeting was heard; all is quiet
        run.engine.hub.usage(session, usage_costing(run, "0.01"))  # $0.0225 > $0.02
        result = await asyncio.wait_for(task, 30)
        await settle(run, events)
    assert result.ended_by == "redirect" and not result.lines  # the caller never spoke
    dial = ET.fromstring(run.rest.updates_for(caller.call_sid)[-1].form["Twiml"])
    assert dial.findtext("./Dial/Number") == "+15550100999"
    assert session.end_reason == "transferred"
    assert said(events, caller.call_sid, run.config.policy.cost_cap_line) == 1
    kinds = [kind for kind, _ in alerts(events)]
    assert kinds.index("call_cost_warning") < kinds.index("call_cost_cap")
    assert "handoff_requested" in kinds


async def test_cap_crossed_mid_sentence_finishes_it_then_says_goodbye_and_hangs_up(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **cap_sections(number="")) as run:
        events = EventLog(run)
        caller = run.caller()
        task = asyncio.create_task(caller.run(Scenario(
            name="cap", wait_for_greeting=False, hangup_at_end=False,
            steps=[Step(pause=15.0), Step(say="Where are you located?")])))
        async with asyncio.timeout(20):  # the greeting is playing
            while caller.result.frames_received < 25:
                await asyncio.sleep(0.01)
        session = run.engine.registry.get(caller.call_sid)
        assert session is not None and caller.agent_speaking
        run.engine.hub.usage(session, usage_costing(run, "0.01"))
        result = await asyncio.wait_for(task, 30)
        await settle(run, events)
    policy = run.config.policy
    assert result.completed_by_rest
    assert run.rest.updates_for(caller.call_sid)[-1].form == {"Status": "completed"}
    assert session.end_reason == "call cost cap reached"
    greeting = [e for e in events.events if isinstance(e, TranscriptLine) and e.final
                and e.text == run.config.engine.greeting]
    assert len(greeting) == 1 and not greeting[0].interrupted  # heard to its end
    assert greeting[0].heard_text == greeting[0].text
    # One closing line, once; no cap line and no answer after it: never a loop.
    assert said(events, caller.call_sid, policy.cost_cap_goodbye) == 1
    assert said(events, caller.call_sid, policy.cost_cap_line) == 0
    lines = [e.text for e in events.events if isinstance(e, TranscriptLine) and e.final
             and e.speaker != "caller" and e.call_sid == caller.call_sid]
    assert lines[-1] == policy.cost_cap_goodbye


async def test_a_failed_transfer_at_the_cap_ends_with_goodbye_not_a_loop(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=make_local_engine,
                              **cap_sections(number="+15550100999")) as run:
        events = EventLog(run)
        caller, task, session = await held_call(run)
        await caller.wait_agent_done(timeout=20)
        run.rest.fail_next.append((500, 20500, "Internal Server Error"))
        run.engine.hub.usage(session, usage_costing(run, "0.01"))
        result = await asyncio.wait_for(task, 30)
        await settle(run, events)
    updates = [u.form for u in run.rest.updates_for(caller.call_sid)]
    assert "Twiml" in updates[0] and updates[-1] == {"Status": "completed"}
    assert result.completed_by_rest and session.end_reason == "call cost cap reached"
    policy = run.config.policy
    assert said(events, caller.call_sid, policy.cost_cap_line) == 1
    assert said(events, caller.call_sid, policy.cost_cap_goodbye) == 1


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "key"), [
    ("[policy]\ncall_cost_warning_share = 0", "policy.call_cost_warning_share"),
    ("[policy]\ncall_cost_warning_share = 1.2", "policy.call_cost_warning_share"),
    ("[policy]\ncall_cost_cap_usd = -0.01", "policy.call_cost_cap_usd"),
    ('[policy]\ncost_cap_goodbye = ""', "policy.cost_cap_goodbye"),
    ('[budget]\nrefuse_message = ""', "budget.refuse_message"),
    ('[providers]\ndegraded_tts = ["espeek"]', "providers.degraded_tts"),
    ("[providers]\ndegraded_agent = []", "providers.degraded_agent"),
])
def test_bad_cap_and_budget_action_settings_stop_config_loading(tmp_path: Path, toml: str,
                                                               key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, env={})


def test_the_cheapest_chains_share_the_usual_instances(tmp_path: Path) -> None:
    config = make_config(tmp_path, 0)  # the shipped chains are the cheapest already
    usual = build_providers(config)
    cheapest, built = build_cheapest(config, usual)
    assert [p.name for p in cheapest.all()] == ["local_whisper", "faq", "piper", "espeak"]
    assert all(any(p is q for q in usual.all()) for p in cheapest.all())
    assert built.all() == []


def test_cheapest_chains_that_cannot_run_stop_the_engine_naming_the_key(
        tmp_path: Path) -> None:
    # The OpenAI speech-to-text without an API key cannot run here.
    config = make_config(tmp_path, 0, providers={"degraded_stt": ["openai"]})
    with pytest.raises(NoProviderError, match=r"providers\.degraded_stt: no usable provider"):
        build_cheapest(config, build_providers(config))
