"""Tool calls seen: the `ToolCalled` event (arguments redacted as configured), the
history's copy, the console's transcript line for it, and the snapshot a console gets
when it attaches, so a supervisor who takes over sees what the agent already looked up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Static

from console.app import SupervisorConsole
from console.calls_table import CallsTable
from console.client import SupervisorClient
from console.model import ConsoleModel
from console.transcript import render_line, render_transcript
from console.view_state import tool_line_view
from engine.bus.events import ToolCalled, decode_event, encode_event
from engine.config import Config
from engine.session.records import ToolCallRecord
from engine.sim.caller import CallResult
from engine.sim.scenario import Scenario
from engine.supervision.api_schema import (
    CallSnapshot,
    Snapshot,
    ToolCallEntry,
    TranscriptEntry,
)
from engine.supervision.tool_calls import published_arguments, tool_called_event
from tests.harness import (
    EventLog,
    RunningEngine,
    base_sections,
    make_local_engine,
    running_engine,
)

T0 = 1_700_000_000.0
TOKEN = "tool-events-token-0123456789abcdef"


def record(call_id: str = "call_a", outcome: str = "ok", summary: str = "shipped",
           **arguments: Any) -> ToolCallRecord:
    return ToolCallRecord(turn=2, call_id=call_id, name="order_status",
                          arguments=arguments or {"order_id": "4471"},
                          outcome=outcome, summary=summary,  # type: ignore[arg-type]
                          latency_s=0.042, round=1)


# -- the event -------------------------------------------------------------------------


def test_published_arguments_are_redacted_at_any_depth_and_flat() -> None:
    args = {"order_id": "4471", "pin": "1234",
            "customer": {"name": "Ann", "pin": "9999"}, "items": [1, 2]}
    out = published_arguments(args, {"pin"})
    assert out["order_id"] == "4471" and out["pin"] == "***"
    # Nested values are compact JSON text, with the same names redacted inside.
    assert out["customer"] == '{"name":"Ann","pin":"***"}'
    assert out["items"] == "[1,2]"
    assert published_arguments(args, ())["pin"] == "1234"  # nothing configured: as given


def test_tool_called_event_carries_the_record_and_round_trips() -> None:
    event = tool_called_event("CA1", record(pin="1234", order_id="4471"), {"pin"})
    assert (event.turn, event.call_id, event.name, event.outcome) == \
        (2, "call_a", "order_status", "ok")
    assert event.arguments == {"pin": "***", "order_id": "4471"}
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, ToolCalled) and decoded == event
    assert b"1234" not in encode_event(event)


# -- the console -----------------------------------------------------------------------


def test_a_tool_call_is_its_own_transcript_line_and_failures_are_marked() -> None:
    ok = render_line(tool_line_view("c1", "order_status", {"order_id": "4471"}, "ok",
                                    "shipped", 0.04, T0)).plain
    assert ok.strip() == "🔧    looked up order_status {order_id: 4471} → shipped"
    timed_out = render_line(tool_line_view("c2", "order_status", {"order_id": "9"},
                                           "timeout", "", 3.0, T0)).plain
    assert "✗ timed out after 3.0 s" in timed_out and "looked up" not in timed_out
    failed = render_line(tool_line_view("c3", "order_status", {"order_id": "9"}, "error",
                                        "HTTP 500", 0.2, T0)).plain
    assert failed.endswith("✗ failed: HTTP 500")


def test_snapshot_puts_earlier_tool_calls_among_the_lines_and_events_do_not_repeat_them(
) -> None:
    model = ConsoleModel(lambda: T0)
    model.apply_snapshot(Snapshot(server_time=T0, calls=[CallSnapshot(
        call_sid="CA1", state="ai", started_at=T0 - 30,
        transcript=[
            TranscriptEntry(line_id="l1", speaker="caller", text="Where is order 4471?",
                            ts=T0 - 20),
            TranscriptEntry(line_id="l2", speaker="agent",
                            text="Order 4471 is shipped, arriving Thursday.", ts=T0 - 18),
        ],
        tool_calls=[ToolCallEntry(call_id="call_a", turn=1, name="order_status",
                                  arguments={"order_id": "4471"}, summary="shipped",
                                  ts=T0 - 19)])]))
    call = model.calls["CA1"]
    assert [ln.line_id for ln in call.transcript] == ["l1", "tool:call_a", "l2"]
    # The same call again as an event (a resume that overlaps) is still one line.
    model.apply_event(tool_called_event("CA1", record(), ()).model_copy(
        update={"engine_id": "e", "seq": 1, "ts": T0 - 19}))
    assert len(call.transcript) == 3
    model.apply_event(tool_called_event("CA1", record("call_b", "timeout", ""), ())
                      .model_copy(update={"engine_id": "e", "seq": 2, "ts": T0}))
    changes = model.take_changes()
    assert changes.transcripts == {"CA1": 1} and "CA1" in changes.transcript_touched
    text = render_transcript(call.transcript).plain
    assert "looked up order_status {order_id: 4471} → shipped" in text
    assert "order_status {order_id: 4471} ✗ timed out" in text.splitlines()[-1]


# -- on a real engine: the event, the snapshot, a console that attaches ----------------


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], within_s: float = 20.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def transcript_text(app: SupervisorConsole) -> str:
    return str(app.query_one("#transcript-body", Static).render())


async def supervised_engine(config: Config):  # type: ignore[no-untyped-def]
    return await make_local_engine(config, history=True, supervisor_api=True)


async def held_call(run: RunningEngine) -> tuple[Any, asyncio.Task[CallResult]]:
    caller = run.caller()
    scenario = Scenario.model_validate({"name": "hold", "from": "+15550100031",
                                        "hangup_at_end": False, "steps": []})
    task = asyncio.create_task(caller.run(scenario))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not caller.call_sid or run.engine.registry.get(caller.call_sid) is None:
        assert loop.time() < deadline, "the call did not start"
        await asyncio.sleep(0.05)
    return caller, task


@pytest.mark.slow
async def test_a_console_that_attaches_later_sees_what_the_agent_looked_up(
        tmp_path: Path) -> None:
    sections = base_sections()
    sections["console_api"] = {"port": 0, "token": TOKEN}
    sections["tool_use"] = {"redact_arguments": ["pin"]}
    async with running_engine(tmp_path, supervised_engine, None, **sections) as run:
        events = EventLog(run)
        caller, task = await held_call(run)
        session = run.engine.registry.get(caller.call_sid)
        assert session is not None
        # What the turn loop reports when a lookup is over (before any console is open).
        run.engine.hub.tool_called(session, record(order_id="4471", pin="1234"))
        await run.engine.hub.drain()
        published = [e for e in events.events if isinstance(e, ToolCalled)]
        assert [(e.name, e.arguments, e.outcome) for e in published] == \
            [("order_status", {"order_id": "4471", "pin": "***"}, "ok")]
        # The history keeps it, redacted as published.
        history = run.engine.hub.history
        assert history is not None
        [kept] = await history.tool_calls(caller.call_sid)
        assert (kept.name, kept.arguments, kept.outcome, kept.summary) == \
            ("order_status", {"order_id": "4471", "pin": "***"}, "ok", "shipped")
        snap = run.engine.hub.snapshot()
        [mine] = [c for c in snap.calls if c.call_sid == caller.call_sid]
        assert [(t.call_id, t.arguments["pin"]) for t in mine.tool_calls] == \
            [("call_a", "***")]

        assert run.engine.supervisor_api is not None
        client = SupervisorClient(f"ws://127.0.0.1:{run.engine.supervisor_api.port}", TOKEN,
                                  backoff_initial_s=0.05, backoff_max_s=0.3)
        app = SupervisorConsole(client, flush_interval_s=0.05, table_interval_s=0.05,
                                watch_terminal=False)
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.query_one(CallsTable)
            await until(pilot, lambda: caller.call_sid in [
                str(r.key.value) for r in table.ordered_rows], what="the call's row")
            await until(pilot, lambda: "looked up order_status" in transcript_text(app),
                        what="the earlier lookup in the transcript")
            assert "{order_id: 4471, pin: ***} → shipped" in transcript_text(app)
            assert "1234" not in transcript_text(app)
            # A lookup after the console attached arrives live; a failed one is marked.
            run.engine.hub.tool_called(session, record("call_b", "timeout", "", order_id="9"))
            await until(pilot, lambda: "✗ timed out" in transcript_text(app),
                        what="the live failed lookup")
            # The supervisor takes over: what was looked up is still in front of them.
            await pilot.press("t")
            await until(pilot, lambda: session.state.value == "human_takeover",
                        what="human takeover")
            await pilot.pause(0.2)
            text = transcript_text(app)
            assert "looked up order_status" in text and "✗ timed out" in text
        await caller.hang_up()
        result = await asyncio.wait_for(task, 10)
        await events.close()
    assert result.error is None
