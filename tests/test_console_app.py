"""The console app driven by Textual's pilot against a supervisor-API stand-in.

The stand-in is a small aiohttp server speaking our own api_schema protocol: token auth,
Hello + Snapshot, events with ids, `?after=` resume, and a Reply for every Command (it
records them; chosen commands fail).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from textual.pilot import Pilot
from textual.widgets import Input, Static

from console.app import SupervisorConsole
from console.bars import TakeoverBar
from console.calls_table import CallsTable
from console.cli import resolve_token, run_console
from console.client import ConnectionChanged, SourceItem, SupervisorClient, console_ws_url
from console.redis_source import RedisEventSource
from console.screens import ConfirmScreen, HelpScreen, TransferScreen
from console.transcript import TranscriptPanel
from engine.bus.events import (
    Alert,
    BudgetStateChanged,
    BusGap,
    CallEnded,
    CallStarted,
    EventBase,
    StateChanged,
    TranscriptLine,
    TurnLatency,
    UsageCost,
    encode_event,
)
from engine.supervision.api_schema import (
    COMMAND,
    CallSnapshot,
    Command,
    CommandName,
    EventFrame,
    Hello,
    Reply,
    Snapshot,
    SpendTotals,
    TranscriptEntry,
)
from tests import redis_server as redis_helpers

redis_url = redis_helpers.redis_url

T0 = 1_700_000_000.0
TOKEN = "test-token"
READONLY_TOKEN = "readonly-token"
DESTINATIONS = [("Billing", "+15550100001"), ("Sales", "+15550100002")]


def frozen_clock() -> float:
    return T0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_snapshot() -> Snapshot:
    return Snapshot(server_time=T0, calls=[
        CallSnapshot(call_sid="CA-A", from_number="+15550000001", state="ai",
                     started_at=T0 - 125, cost_usd=0.042, cost_cap_usd=0.5, turns=4,
                     voice_to_voice_s=[0.8, 1.1, 0.9, 1.3],
                     transcript=[
                         TranscriptEntry(line_id="a1", speaker="caller",
                                         text="Hi, what are your opening hours?"),
                         TranscriptEntry(line_id="a2", speaker="agent",
                                         text="We are open nine to five, Monday to Friday."),
                     ]),
        CallSnapshot(call_sid="CA-B", from_number="+15550000002", state="ai",
                     started_at=T0 - 40, cost_usd=0.011, cost_cap_usd=0.5, turns=1,
                     voice_to_voice_s=[2.4], alerts=["latency_p95"]),
        CallSnapshot(call_sid="CA-C", from_number="+15550000003", state="human_takeover",
                     started_at=T0 - 300, cost_usd=0.31, cost_cap_usd=0.5, turns=9,
                     alerts=["handoff_requested"]),
    ], totals=SpendTotals(today_usd=4.2, daily_budget_usd=20, month_to_date_usd=61,
                          monthly_projection_usd=180, monthly_budget_usd=500,
                          p95_voice_to_voice_s=1.3))


class ApiStandIn:
    """The supervisor API's wire protocol, enough to drive the console."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot or base_snapshot()
        self.log: list[EventFrame] = []  # every event ever published, ids "1", "2", ...
        self.commands: list[Command] = []
        self.afters: list[str | None] = []  # the ?after= of each connection
        self.fail: dict[str, str] = {}  # command -> error to reply with
        self.sockets: set[web.WebSocketResponse] = set()
        self.seq = 0
        self.accepting = True
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/console/ws", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.drop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if auth not in (f"Bearer {TOKEN}", f"Bearer {READONLY_TOKEN}"):
            raise web.HTTPUnauthorized()
        if not self.accepting:
            raise web.HTTPServiceUnavailable()
        readonly = auth == f"Bearer {READONLY_TOKEN}"
        after = request.query.get("after")
        self.afters.append(after)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(Hello(engine_id="eng-test", readonly=readonly,
                                transfer_destinations=DESTINATIONS,
                                default_transfer_number="+15550100001").model_dump_json())
        if after is None:
            cursor = self.log[-1].id if self.log else ""
            await ws.send_str(self.snapshot.model_copy(update={"cursor": cursor})
                              .model_dump_json())
        else:
            for frame in self.log:
                if int(frame.id) > int(after):
                    await ws.send_str(frame.model_dump_json())
        self.sockets.add(ws)
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                command = COMMAND.validate_json(message.data)
                self.commands.append(command)
                if readonly:
                    reply = Reply(id=command.id, ok=False, error="read-only token")
                elif command.command in self.fail:
                    reply = Reply(id=command.id, ok=False, error=self.fail[command.command])
                else:
                    reply = Reply(id=command.id, ok=True)
                await ws.send_str(reply.model_dump_json())
        finally:
            self.sockets.discard(ws)
        return ws

    async def publish(self, event: EventBase) -> EventFrame:
        self.seq += 1
        stamped = event.model_copy(update={"engine_id": "eng-test", "seq": self.seq,
                                           "ts": event.ts or T0})
        frame = EventFrame.model_validate({"id": str(len(self.log) + 1),
                                           "event": stamped.model_dump()})
        self.log.append(frame)
        for ws in list(self.sockets):
            await ws.send_str(frame.model_dump_json())
        return frame

    async def drop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()


@pytest.fixture
async def server() -> AsyncIterator[ApiStandIn]:
    stand_in = ApiStandIn()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


class MovableClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_app(server: ApiStandIn, *, token: str = TOKEN, readonly: bool = False,
             clock: Callable[[], float] = frozen_clock) -> SupervisorConsole:
    client = SupervisorClient(server.url, token, readonly=readonly, backoff_initial_s=0.05,
                              backoff_max_s=0.2, reply_timeout_s=2.0)
    return SupervisorConsole(client, readonly=readonly, clock=clock, flush_interval_s=0.05,
                             table_interval_s=0.05, watch_terminal=False)


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], within_s: float = 5.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def ready(pilot: Pilot[Any], app: SupervisorConsole) -> None:
    await until(pilot, lambda: app.query_one(CallsTable).row_count == 3, what="rows")


def commands(server: ApiStandIn) -> list[tuple[str, str, str | None, str | None]]:
    return [(c.command, c.call_sid, c.text, c.number) for c in server.commands]


def row_keys(app: SupervisorConsole) -> list[str]:
    table = app.query_one(CallsTable)
    return [str(row.key.value) for row in table.ordered_rows]


async def test_snapshot_fills_table_transcript_and_status(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        # Live calls oldest first.
        assert row_keys(app) == ["CA-C", "CA-A", "CA-B"]
        table = app.query_one(CallsTable)
        assert table.get_cell("CA-A", "dur").plain == "2:05"
        assert table.get_cell("CA-C", "who").plain == "HUMAN"
        assert table.get_cell("CA-B", "alerts").plain == "!L"
        status = str(app.query_one("#status", Static).render())
        assert "connected" in status and "calls 3" in status and "alerts 2" in status


async def test_jk_move_and_enter_focuses_transcript(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert app.selected_sid() == "CA-C"
        await pilot.press("j")
        assert app.selected_sid() == "CA-A"
        await pilot.press("down")
        assert app.selected_sid() == "CA-B"
        await pilot.press("k", "k")
        assert app.selected_sid() == "CA-C"
        await pilot.press("j")
        await pilot.pause()
        body = str(app.query_one("#transcript-body", Static).render())
        assert "CALLER" in body and "opening hours" in body and "AGENT" in body
        await pilot.press("enter")
        assert app.focused is app.query_one(TranscriptPanel).scroller
        await pilot.press("escape")
        assert app.focused is app.query_one(CallsTable)


async def test_live_events_update_rows_and_partial_lines(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j")  # CA-A
        await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller",
                                            text="Can I", line_id="a3", final=False))
        await until(pilot, lambda: "Can I …" in str(
            app.query_one("#transcript-body", Static).render()), what="partial line")
        await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller",
                                            text="Can I pay by card?", line_id="a3"))
        await server.publish(TurnLatency(call_sid="CA-A", turn=5, voice_to_voice_s=0.77))
        await server.publish(UsageCost(call_sid="CA-A", provider="openai", kind="llm",
                                       cost_usd=0.01, call_cost_usd=0.052))
        table = app.query_one(CallsTable)
        await until(pilot, lambda: table.get_cell("CA-A", "cost").plain == "$0.052",
                    what="cost cell")
        assert table.get_cell("CA-A", "v2v").plain == "0.77s"
        body = str(app.query_one("#transcript-body", Static).render())
        assert "Can I pay by card?" in body and "Can I …" not in body
        await server.publish(Alert(call_sid="CA-A", kind="handoff_requested",
                                   severity="warning", message="caller asked for a human"))
        await until(pilot, lambda: table.get_cell("CA-A", "alerts").plain == "!H",
                    what="alert marker")
        # The toast and the table marker come from different redraw ticks: wait for it.
        await until(pilot, lambda: any("caller asked for a human" in str(n.message)
                                       for n in app._notifications), what="alert toast")


async def test_budget_state_and_unpriced_costs_show(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j")  # CA-A
        status = app.query_one("#status", Static)
        table = app.query_one(CallsTable)
        assert "budget" not in str(status.render())  # ok: nothing to say
        await server.publish(BudgetStateChanged(old="warning", new="refusing", limit="daily",
                                                period="2026-11-24", spent_usd=20.0,
                                                limit_usd=20.0, totals="shared"))
        await until(pilot, lambda: "budget REFUSING (daily)" in str(status.render()),
                    what="budget state in the status bar")
        await server.publish(UsageCost(call_sid="CA-A", provider="openai", kind="llm",
                                       model="gpt-9", unpriced=True, cost_usd=0.0,
                                       call_cost_usd=0.052))
        await until(pilot, lambda: table.get_cell("CA-A", "cost").plain == "$0.052?",
                    what="unpriced cost cell")
        await until(pilot, lambda: "unpriced items" in str(
            app.query_one("#meter-call", Static).render()), what="unpriced call meter")
        await server.publish(BudgetStateChanged(old="refusing", new="ok", limit="daily",
                                                period="2026-11-25", limit_usd=20.0))
        await until(pilot, lambda: "budget" not in str(status.render()),
                    what="budget lifted")
        await until(pilot, lambda: any("budget ok again" in str(n.message)
                                       for n in app._notifications), what="lift toast")


async def test_transcript_tail_mode_never_yanks_a_reader(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j")  # CA-A
        for i in range(40):
            await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller",
                                                text=f"line {i}", line_id=f"t{i}"))
        panel = app.query_one(TranscriptPanel)
        scroller = panel.scroller
        await until(pilot, lambda: "line 39" in str(
            app.query_one("#transcript-body", Static).render()), what="lines")
        await until(pilot, lambda: scroller.max_scroll_y > 0
                    and scroller.is_vertical_scroll_end, what="tailing")
        await pilot.press("enter")  # focus the transcript, then read back up
        await pilot.press("k", "k", "k", "k", "k")
        await pilot.pause()
        held_at = scroller.scroll_y
        assert held_at < scroller.max_scroll_y
        for i in range(3):
            await server.publish(TranscriptLine(call_sid="CA-A", speaker="agent",
                                                text=f"new {i}", line_id=f"n{i}"))
        await until(pilot, lambda: panel.pending_lines == 3, what="pending count")
        assert scroller.scroll_y == held_at  # not yanked to the bottom
        assert "3 new lines" in str(app.query_one("#transcript-pending").render())
        await pilot.press("G")
        await until(pilot, lambda: scroller.is_vertical_scroll_end, what="tail again")
        assert panel.pending_lines == 0
        await server.publish(TranscriptLine(call_sid="CA-A", speaker="agent",
                                            text="follows", line_id="f1"))
        await until(pilot, lambda: "follows" in str(
            app.query_one("#transcript-body", Static).render()), what="follow")
        await until(pilot, lambda: scroller.is_vertical_scroll_end, what="still tailing")
        assert panel.pending_lines == 0


async def test_ended_calls_dim_then_drop(server: ApiStandIn) -> None:
    clock = MovableClock()
    app = make_app(server, clock=clock)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await server.publish(CallEnded(call_sid="CA-B", reason="caller_hangup", ts=T0))
        table = app.query_one(CallsTable)
        await until(pilot, lambda: table.get_cell("CA-B", "state").plain == "ended",
                    what="ended row")
        assert "dim" in str(table.get_cell("CA-B", "caller").style)
        assert row_keys(app) == ["CA-C", "CA-A", "CA-B"]  # stays in place
        clock.now += 30
        await pilot.pause(0.2)
        assert table.get_cell("CA-B", "dur").plain == "0:40"  # frozen at the end
        assert "CA-B" in row_keys(app)
        clock.now += 31
        await until(pilot, lambda: "CA-B" not in row_keys(app), what="expired")
        assert row_keys(app) == ["CA-C", "CA-A"]
        assert table.get_cell("CA-A", "dur").plain == "3:06"  # 125 s + 61 s


async def test_hang_up_confirm_yes_and_no(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        screen = app.screen
        assert isinstance(screen, ConfirmScreen)
        assert "+15550000003" in screen.question and "CA-C" in screen.question
        assert app.focused is not None and app.focused.id == "no"  # defaults to No
        await pilot.press("enter")  # Enter on the focused No
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="close")
        await pilot.pause(0.1)
        assert server.commands == []
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: len(app.replies) == 1, what="reply")
        assert commands(server) == [("hang_up", "CA-C", None, None)]
        assert app.replies[0][2].ok
        assert any("hang up" in str(n.message) and "ok" in str(n.message)
                   for n in app._notifications)


async def test_escalate_confirm_and_error_reply_toast(server: ApiStandIn) -> None:
    server.fail["escalate"] = "no human queue configured"
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j", "e")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="close")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: len(app.replies) == 1, what="reply")
        assert commands(server) == [("escalate", "CA-A", None, None)]
        assert not app.replies[0][2].ok
        assert any("no human queue configured" in str(n.message)
                   and n.severity == "error" for n in app._notifications)


async def test_transfer_picker_configured_and_typed(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, TransferScreen), what="picker")
        await pilot.press("down", "enter")  # second configured destination: Sales
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        assert "Sales (+15550100002)" in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("y")
        await until(pilot, lambda: len(server.commands) == 1, what="transfer")
        await pilot.press("j", "x")
        await until(pilot, lambda: isinstance(app.screen, TransferScreen), what="picker")
        app.screen.query_one("#number", Input).focus()
        await pilot.press(*"abc", "enter")  # not a number: stays open with an error
        await pilot.pause()
        assert isinstance(app.screen, TransferScreen)
        app.screen.query_one("#number", Input).value = ""
        await pilot.press(*"+15557654321", "enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: len(server.commands) == 2, what="typed transfer")
        assert commands(server) == [("transfer", "CA-C", None, "+15550100002"),
                                    ("transfer", "CA-A", None, "+15557654321")]


async def test_take_over_say_lines_and_hand_back(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j", "t")
        bar = app.query_one(TakeoverBar)
        await until(pilot, lambda: bool(bar.display), what="takeover bar")
        assert app.focused is app.query_one("#takeover-input", Input)
        await pilot.press(*"one moment please", "enter")
        await pilot.press(*"thanks", "enter")  # the t is typed, not a hand back
        await until(pilot, lambda: len(server.commands) == 3, what="say lines")
        await pilot.press("escape")
        await until(pilot, lambda: len(server.commands) == 4, what="hand back")
        assert commands(server) == [("take_over", "CA-A", None, None),
                                    ("say", "CA-A", "one moment please", None),
                                    ("say", "CA-A", "thanks", None),
                                    ("hand_back", "CA-A", None, None)]
        assert not bar.display
        # t on the main screen also hands back.
        await pilot.press("t")
        await until(pilot, lambda: bool(bar.display), what="takeover bar")
        app.query_one(CallsTable).focus()
        await pilot.press("t")
        await until(pilot, lambda: len(server.commands) == 6, what="hand back via t")
        assert server.commands[-1].command == "hand_back"


async def test_key_acts_on_call_captured_at_keypress(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("j")  # CA-A, second row
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        # While the dialog is open, a call that started earlier arrives and re-sorts.
        await server.publish(CallStarted(call_sid="CA-OLD", from_number="+15559999999",
                                         ts=T0 - 1000))
        await until(pilot, lambda: row_keys(app)[0] == "CA-OLD", what="re-sort")
        assert row_keys(app) == ["CA-OLD", "CA-C", "CA-A", "CA-B"]
        # The cursor followed the call, not the row position.
        assert app.selected_sid() == "CA-A"
        # Even if the highlight lands elsewhere meanwhile, the dialog's call is acted on.
        app.query_one(CallsTable).move_cursor(row=0)
        await pilot.press("y")
        await until(pilot, lambda: len(server.commands) == 1, what="hang up")
        assert commands(server) == [("hang_up", "CA-A", None, None)]


async def test_filter_pause_help_quit(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("slash", *"0002")
        await until(pilot, lambda: row_keys(app) == ["CA-B"], what="filtered")
        await pilot.press("enter")
        assert app.focused is app.query_one(CallsTable) and app.filter_text == "0002"
        await pilot.press("escape")
        await until(pilot, lambda: len(row_keys(app)) == 3, what="filter cleared")
        assert app.filter_text == ""
        await pilot.press("p")
        assert app.paused
        await server.publish(UsageCost(call_sid="CA-B", provider="x", kind="llm",
                                       cost_usd=0.1, call_cost_usd=0.2))
        await until(pilot, lambda: app.model.calls["CA-B"].cost_usd == 0.2, what="model")
        await pilot.pause(0.2)
        table = app.query_one(CallsTable)
        assert table.get_cell("CA-B", "cost").plain == "$0.011"  # not applied while paused
        assert "PAUSED" in str(app.query_one("#status", Static).render())
        await pilot.press("p")
        await until(pilot, lambda: table.get_cell("CA-B", "cost").plain == "$0.200",
                    what="resumed")
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        help_text = str(app.screen.query_one("#help-text", Static).render())
        assert "Hang up" in help_text and "Take over" in help_text and "Filter" in help_text
        await pilot.press("q")  # closes help, does not quit
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help closed")
        assert app.is_running
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="quit")


async def test_readonly_hides_and_refuses_acting_keys(server: ApiStandIn) -> None:
    app = make_app(server, token=READONLY_TOKEN, readonly=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        shown = {b.binding.action for b in app.screen.active_bindings.values()}
        assert not shown & {"take_over", "escalate", "transfer", "hang_up"}
        assert "quit" in shown and "help" in shown
        for key in ("h", "e", "x", "t"):
            await pilot.press(key)
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmScreen | TransferScreen)
        assert server.commands == []
        assert "READ-ONLY" in str(app.query_one("#status", Static).render())


async def test_server_readonly_hello_makes_console_readonly(server: ApiStandIn) -> None:
    app = make_app(server, token=READONLY_TOKEN, readonly=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await until(pilot, lambda: app.readonly, what="readonly from Hello")
        await pilot.press("h")
        await pilot.pause(0.1)
        assert server.commands == []
        # Even a command sent directly is refused by the server and shown as such.
        reply = await app.source.send_command("hang_up", "CA-A")
        assert not reply.ok and reply.error == "read-only token"


async def test_reconnect_resumes_after_last_event_without_duplicates(
        server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        for i in range(3):
            await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller",
                                                text=f"before {i}", line_id=f"b{i}"))
        await until(pilot, lambda: app.model.cursor == "3", what="three events")
        server.accepting = False
        await server.drop()
        await until(pilot, lambda: app.connection.state == "reconnecting", what="drop seen")
        # Published while the console is away: must arrive after the resume.
        for i in range(2):
            await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller",
                                                text=f"during {i}", line_id=f"d{i}"))
        await pilot.pause(0.3)  # a few refused reconnects (backoff) meanwhile
        server.accepting = True
        await until(pilot, lambda: app.model.cursor == "5", what="resumed events")
        assert server.afters == [None, "3"]
        await server.publish(StateChanged(call_sid="CA-A", old="ai", new="human_takeover"))
        await until(pilot, lambda: app.model.calls["CA-A"].state == "human_takeover",
                    what="live after resume")
        texts = [line.text for line in app.model.calls["CA-A"].transcript]
        assert texts[2:] == ["before 0", "before 1", "before 2", "during 0", "during 1"]
        assert app.model.events_applied == 6 and app.model.duplicates_dropped == 0
        assert app.connection.state == "connected"


async def test_bus_gap_triggers_a_fresh_snapshot(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await server.publish(TranscriptLine(call_sid="CA-A", speaker="caller", text="x",
                                            line_id="g1"))
        await server.publish(BusGap(missed_after="0", count=12, reason="overrun"))
        await until(pilot, lambda: len(server.afters) == 2, what="resync connection")
        assert server.afters == [None, None]  # no `after`: the server sends a snapshot
        await until(pilot, lambda: app.connection.state == "connected", what="reconnected")
        assert any("12 events lost" in str(n.message) for n in app._notifications)


async def test_bad_token_fails_without_retry_loop(server: ApiStandIn) -> None:
    app = make_app(server, token="wrong")
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.connection.state == "failed", what="auth failure")
        assert "refused the token" in app.connection.detail
        await pilot.pause(0.3)
        assert server.afters == []  # rejected before the handler ran


async def test_commands_when_disconnected_reply_with_error() -> None:
    client = SupervisorClient("ws://127.0.0.1:9", TOKEN)
    reply = await client.send_command("hang_up", "CA-1")
    assert not reply.ok and "not connected" in (reply.error or "")
    bad = await client.send_command("say", "CA-1", text="x" * 2000)
    assert not bad.ok and "invalid command" in (bad.error or "")


def test_ws_url_and_token_resolution(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert console_ws_url("ws://127.0.0.1:8081") == "ws://127.0.0.1:8081/console/ws"
    assert console_ws_url("localhost:9000") == "ws://localhost:9000/console/ws"
    assert console_ws_url("https://ops.example/console/ws") == \
        "wss://ops.example/console/ws"
    with pytest.raises(ValueError):
        console_ws_url("ftp://x")
    token_file = tmp_path / "console_token"
    token_file.write_text("from-file\n")
    assert resolve_token("explicit", {}, token_file) == "explicit"
    assert resolve_token(None, {"SWITCHBOARD_CONSOLE_TOKEN": "from-env"},
                         token_file) == "from-env"
    assert resolve_token(None, {}, token_file) == "from-file"
    assert resolve_token(None, {}, tmp_path / "missing") == ""
    assert run_console(["--engine", "ftp://nope", "--token", "x"]) == 2
    # No token anywhere: a clear error, not a console stuck on "unauthorized".
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SWITCHBOARD_CONSOLE_TOKEN", raising=False)
    assert run_console(["--engine", "ws://127.0.0.1:9"]) == 2


async def test_redis_source_replays_and_follows_the_stream(redis_url: str) -> None:
    prefix = f"console-test-{id(object())}"
    key = f"{prefix}:events"
    writer = aioredis.Redis.from_url(redis_url)
    seq = 0

    async def add(event: EventBase) -> None:
        nonlocal seq
        seq += 1
        stamped = event.model_copy(update={"engine_id": "eng-r", "seq": seq, "ts": T0})
        await writer.xadd(key, {"data": encode_event(stamped)})

    try:
        await add(CallStarted(call_sid="CR1", from_number="+15551110000"))
        await add(TranscriptLine(call_sid="CR1", speaker="caller", text="hello",
                                 line_id="r1"))
        await writer.xadd(key, {"data": b"not an event"})  # skipped, not fatal
        source = RedisEventSource(redis_url, prefix, block_ms=100)
        app = SupervisorConsole(source, clock=frozen_clock, flush_interval_s=0.05,
                                table_interval_s=0.05, watch_terminal=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: row_keys(app) == ["CR1"], what="replayed call")
            assert app.readonly
            await add(UsageCost(call_sid="CR1", provider="p", kind="llm", cost_usd=0.2,
                                call_cost_usd=0.2))
            table = app.query_one(CallsTable)
            await until(pilot, lambda: table.get_cell("CR1", "cost").plain == "$0.200",
                        what="followed event")
            assert app.model.events_applied == 3
            reply = await source.send_command("hang_up", "CR1")
            assert not reply.ok and "read-only" in (reply.error or "")
    finally:
        await writer.delete(key)
        await writer.aclose()


# -- snapshot images -----------------------------------------------------------------------


class ScriptedSource:
    """A FrameSource that replays fixed frames (no network: stable snapshot images)."""

    readonly = False

    def __init__(self, items: list[SourceItem]) -> None:
        self.items = items
        self.sent: list[tuple[str, str]] = []

    async def frames(self) -> AsyncIterator[SourceItem]:
        for item in self.items:
            yield item
        await asyncio.Event().wait()  # stay "connected"

    async def send_command(self, command: CommandName, call_sid: str, *,
                           text: str | None = None, number: str | None = None) -> Reply:
        self.sent.append((command, call_sid))
        return Reply(id="1", ok=True)

    async def close(self) -> None:
        return None


def snapshot_app() -> SupervisorConsole:
    events: list[EventBase] = [
        TranscriptLine(call_sid="CA-A", speaker="agent", line_id="a3", interrupted=True,
                       text="Our address is 12 Main Street, next to the", heard_text="Our "
                       "address is"),
        TranscriptLine(call_sid="CA-A", speaker="supervisor", line_id="a4",
                       text="Hi, this is Dana from the front desk."),
        TranscriptLine(call_sid="CA-A", speaker="caller", line_id="a5", final=False,
                       text="Oh great, I wanted to"),
        CallEnded(call_sid="CA-D", reason="caller_hangup"),
    ]
    items: list[SourceItem] = [
        ConnectionChanged("connected", "eng-test"),
        Hello(engine_id="eng-test", transfer_destinations=DESTINATIONS),
        base_snapshot().model_copy(update={"calls": [*base_snapshot().calls, CallSnapshot(
            call_sid="CA-D", from_number="+15550000004", state="ai", started_at=T0 - 80,
            cost_usd=0.05, cost_cap_usd=0.5)]}),
    ]
    items += [EventFrame.model_validate({"id": str(i), "event": e.model_copy(
        update={"engine_id": "eng-test", "seq": i, "ts": e.ts or T0}).model_dump()})
        for i, e in enumerate(events, 1)]
    return SupervisorConsole(ScriptedSource(items), clock=frozen_clock,
                             flush_interval_s=0.05, watch_terminal=False)


async def _settle(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, SupervisorConsole)
    await until(pilot, lambda: app.query_one(CallsTable).row_count == 4, what="rows")
    await pilot.press("j")  # CA-A: the transcript with every kind of line
    await pilot.pause(0.2)


def test_snapshot_80x24(snap_compare: Any) -> None:
    assert snap_compare(snapshot_app(), terminal_size=(80, 24), run_before=_settle)


def test_snapshot_160x48(snap_compare: Any) -> None:
    assert snap_compare(snapshot_app(), terminal_size=(160, 48), run_before=_settle)


def test_snapshot_confirm_dialog(snap_compare: Any) -> None:
    async def open_confirm(pilot: Pilot[Any]) -> None:
        await _settle(pilot)
        await pilot.press("h")
        await pilot.pause(0.2)

    assert snap_compare(snapshot_app(), terminal_size=(80, 24), run_before=open_confirm)
