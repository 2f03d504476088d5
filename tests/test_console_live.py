"""The supervisor console against a real engine: Textual's pilot drives the keys while
simulated callers hold the line; the take-over line is transcribed from what the caller
heard, transfers and hang-ups are read back from the Twilio REST stand-in. Also: the
console survives an engine restart on the same ports, and runs in a real terminal (tmux).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from textual.pilot import Pilot
from textual.widgets import Input, Static

from console.app import SupervisorConsole
from console.bars import TakeoverBar
from console.calls_table import CallsTable
from console.client import SupervisorClient
from console.screens import ConfirmScreen, HelpScreen, TransferScreen
from engine.app import Engine
from engine.config import Config
from engine.sim.caller import CallResult, SimulatedCaller
from engine.sim.scenario import Scenario
from engine.sim.standins.twilio_api import TwilioApiStandIn
from tests.harness import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    ROOT,
    RunningEngine,
    base_sections,
    free_port,
    heard_text,
    make_config,
    make_local_engine,
    running_engine,
)

pytestmark = pytest.mark.slow

TOKEN = "live-console-token-0123456789abcdef"
DEFAULT_QUEUE = "+15550100999"
BILLING = "+15550100901"



def _seq(cursor: str | None) -> int:
    """The event number in a memory-bus cursor ("<epoch>:<n>")."""
    return int((cursor or "0").rpartition(":")[2])

def sections(api_port: int = 0) -> dict[str, dict[str, Any]]:
    out = base_sections()
    out["console_api"] = {"port": api_port, "token": TOKEN}
    out["transfer"] = {"number": DEFAULT_QUEUE,
                       "destinations": [{"name": "Billing", "number": BILLING}]}
    return out


async def supervised_engine(config: Config) -> Engine:
    return await make_local_engine(config, supervisor_api=True)


def api_url(run: RunningEngine) -> str:
    assert run.engine.supervisor_api is not None
    return f"ws://127.0.0.1:{run.engine.supervisor_api.port}"


def console_for(url: str) -> SupervisorConsole:
    client = SupervisorClient(url, TOKEN, backoff_initial_s=0.05, backoff_max_s=0.3)
    return SupervisorConsole(client, flush_interval_s=0.05, table_interval_s=0.05,
                             watch_terminal=False)


class HeldCall:
    """A simulated caller that stays on the line until someone ends the call."""

    def __init__(self, run: RunningEngine, from_number: str) -> None:
        self.caller: SimulatedCaller = run.caller()
        scenario = Scenario.model_validate({"name": "hold", "from": from_number,
                                            "hangup_at_end": False, "steps": []})
        self.task: asyncio.Task[CallResult] = asyncio.create_task(self.caller.run(scenario))

    @property
    def sid(self) -> str:
        return self.caller.call_sid

    async def end(self) -> CallResult:
        await self.caller.hang_up()
        return await asyncio.wait_for(self.task, 10)


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], within_s: float = 15.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def row_keys(app: SupervisorConsole) -> list[str]:
    return [str(row.key.value) for row in app.query_one(CallsTable).ordered_rows]


def engine_state(run: RunningEngine, sid: str) -> str:
    session = run.engine.registry.get(sid)
    return session.state.value if session is not None else "gone"


def status_line(app: SupervisorConsole) -> str:
    return str(app.query_one("#status", Static).render())


def twiml_updates(run: RunningEngine, sid: str) -> list[str]:
    return [r.form["Twiml"] for r in run.rest.updates_for(sid) if "Twiml" in r.form]


def dials(twiml: str) -> list[str]:
    """The numbers a TwiML document dials."""
    return re.findall(r"<Dial[^>]*>\s*<Number>([^<]+)</Number>", twiml)


async def answered(pilot: Pilot[Any], app: SupervisorConsole, call: HeldCall) -> None:
    """The call is in the table and its greeting has played (the agent is quiet)."""
    await until(pilot, lambda: call.sid in row_keys(app), what="the call's row")
    assert await call.caller.wait_agent_done(timeout=20), "no greeting"


async def confirm_yes(pilot: Pilot[Any], app: SupervisorConsole, replies: int) -> None:
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm dialog")
    await pilot.press("y")
    await until(pilot, lambda: len(app.replies) == replies, what="the engine's reply")


# -- acting keys ---------------------------------------------------------------------------


async def test_take_over_line_reaches_the_caller_and_esc_hands_back(tmp_path: Path) -> None:
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        call = HeldCall(run, "+15550100011")
        app = console_for(api_url(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await answered(pilot, app, call)
            await pilot.press("t")
            await until(pilot, lambda: engine_state(run, call.sid) == "human_takeover",
                        what="engine in human_takeover")
            table = app.query_one(CallsTable)
            await until(pilot, lambda: table.get_cell(call.sid, "who").plain == "HUMAN",
                        what="HUMAN in the row")
            assert app.focused is app.query_one("#takeover-input", Input)
            mark = len(call.caller.result.heard)
            await pilot.press(*"Hello, a manager will call you back tomorrow morning.",
                              "enter")
            await until(pilot, lambda: [c for c, _, _ in app.replies][-1:] == ["say"],
                        what="say reply")
            assert app.replies[-1][2].ok, app.replies[-1][2].error
            assert await call.caller.wait_agent_done(timeout=20), "the line was not played"
            said = await heard_text(bytes(call.caller.result.heard[mark:]))
            assert "manager" in said or "tomorrow" in said, said
            # The supervisor's line is in the transcript panel, marked as theirs.
            await until(pilot, lambda: "a manager will call you back" in str(
                app.query_one("#transcript-body", Static).render()), what="transcript")
            await pilot.press("escape")
            await until(pilot, lambda: engine_state(run, call.sid) == "ai",
                        what="handed back to the AI")
            assert not app.query_one(TakeoverBar).display
            await until(pilot, lambda: table.get_cell(call.sid, "who").plain == "AI",
                        what="AI in the row")
            assert [c for c, _, r in app.replies if r.ok] == ["take_over", "say", "hand_back"]
        result = await call.end()
    assert result.error is None and not result.redirects


async def test_transfer_from_the_picker_reaches_twilio(tmp_path: Path) -> None:
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        call = HeldCall(run, "+15550100012")
        app = console_for(api_url(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await answered(pilot, app, call)
            await pilot.press("x")
            await until(pilot, lambda: isinstance(app.screen, TransferScreen), what="picker")
            await pilot.press("enter")  # the first configured destination: Billing
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
            question = app.screen.question  # type: ignore[attr-defined]
            assert f"Billing ({BILLING})" in question and call.sid in question
            await confirm_yes(pilot, app, 1)
            assert app.replies[0][:2] == ("transfer", call.sid) and app.replies[0][2].ok, \
                app.replies
            updates = twiml_updates(run, call.sid)
            assert len(updates) == 1 and dials(updates[0]) == [BILLING], updates
            result = await asyncio.wait_for(call.task, 10)
            assert result.ended_by == "redirect"
            table = app.query_one(CallsTable)
            # Twilio ended the stream: the row shows the call as handed over / ended.
            await until(pilot, lambda: table.get_cell(call.sid, "who").plain in ("XFER", "-"),
                        what="transfer in the row")


async def test_escalate_goes_to_the_default_queue(tmp_path: Path) -> None:
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        call = HeldCall(run, "+15550100013")
        app = console_for(api_url(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await answered(pilot, app, call)
            await pilot.press("e")
            await confirm_yes(pilot, app, 1)
            assert app.replies[0][:2] == ("escalate", call.sid) and app.replies[0][2].ok, \
                app.replies
            updates = twiml_updates(run, call.sid)
            assert len(updates) == 1 and dials(updates[0]) == [DEFAULT_QUEUE], updates
            await asyncio.wait_for(call.task, 10)


async def test_hang_up_no_sends_nothing_yes_ends_the_call(tmp_path: Path) -> None:
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        call = HeldCall(run, "+15550100014")
        app = console_for(api_url(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await answered(pilot, app, call)
            await pilot.press("h")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen),
                        what="dialog closed")
            await pilot.pause(0.5)
            assert app.replies == [] and run.rest.updates_for(call.sid) == []
            assert engine_state(run, call.sid) == "ai" and not call.task.done()
            await pilot.press("h")
            await confirm_yes(pilot, app, 1)
            assert app.replies[0][:2] == ("hang_up", call.sid) and app.replies[0][2].ok
            forms = [r.form for r in run.rest.updates_for(call.sid)]
            assert forms == [{"Status": "completed"}], forms
            result = await asyncio.wait_for(call.task, 10)
            assert result.completed_by_rest
            table = app.query_one(CallsTable)
            await until(pilot, lambda: table.get_cell(call.sid, "state").plain == "ended",
                        what="ended row")
            assert engine_state(run, call.sid) == "gone"


async def test_navigation_filter_pause_help_quit_with_two_calls(tmp_path: Path) -> None:
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        first = HeldCall(run, "+15550100021")
        await asyncio.sleep(0.3)  # the table lists calls oldest first
        second = HeldCall(run, "+15550100022")
        app = console_for(api_url(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: row_keys(app) == [first.sid, second.sid],
                        what="two rows, oldest first")
            assert app.selected_sid() == first.sid
            await pilot.press("j")
            assert app.selected_sid() == second.sid
            await pilot.press("k")
            assert app.selected_sid() == first.sid
            # The filter narrows to the matching caller number; Esc clears it.
            await pilot.press("slash", *"0022")
            await until(pilot, lambda: row_keys(app) == [second.sid], what="filtered")
            await pilot.press("enter")
            assert app.selected_sid() == second.sid and "filter: 0022" in status_line(app)
            await pilot.press("escape")
            await until(pilot, lambda: len(row_keys(app)) == 2, what="filter cleared")
            # Paused, the screen holds still while the engine goes on.
            await pilot.press("p")
            assert "PAUSED" in status_line(app)
            table = app.query_one(CallsTable)
            await second.end()
            await until(pilot, lambda: app.model.calls[second.sid].ended,
                        what="the model saw the end")
            await pilot.pause(0.3)
            assert table.get_cell(second.sid, "state").plain != "ended"
            await pilot.press("p")
            await until(pilot, lambda: table.get_cell(second.sid, "state").plain == "ended",
                        what="applied after unpause")
            assert "PAUSED" not in status_line(app)
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            help_text = str(app.screen.query_one("#help-text", Static).render())
            assert "Take over" in help_text and "Transfer" in help_text
            await pilot.press("question_mark")
            await until(pilot, lambda: not isinstance(app.screen, HelpScreen),
                        what="help closed")
            assert app.is_running
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, what="quit")
        await first.end()


# -- engine restart ------------------------------------------------------------------------


@asynccontextmanager
async def engine_on(tmp_path: Path, port: int, api_port: int,
                    rest: TwilioApiStandIn) -> AsyncIterator[RunningEngine]:
    """An engine on fixed ports (running_engine picks new ones), sharing the REST stand-in."""
    config = make_config(tmp_path, port, rest.base_url, None, **sections(api_port))
    engine = await supervised_engine(config)
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield RunningEngine(engine, f"http://127.0.0.1:{port}", config, rest)
    finally:
        await runner.cleanup()


async def test_console_reconnects_to_a_restarted_engine(tmp_path: Path) -> None:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    await rest.start()
    port, api_port = free_port(), free_port()
    app = console_for(f"ws://127.0.0.1:{api_port}")
    client = app.source
    assert isinstance(client, SupervisorClient)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            async with engine_on(tmp_path, port, api_port, rest) as run:
                old = HeldCall(run, "+15550100031")
                await until(pilot, lambda: old.sid in row_keys(app), what="the first call")
                await until(pilot, lambda: "● connected" in status_line(app),
                            what="connected in the status bar")
                first_engine = app.hello.engine_id if app.hello else ""
            # Stopped: the engine ended the call and closed the console's socket.
            await asyncio.wait_for(old.task, 10)
            await until(pilot, lambda: "◌ reconnecting" in status_line(app),
                        what="reconnecting in the status bar")
            # Hold the console off for a few seconds, so the new engine's bus is already
            # past the old cursor when it comes back: that cursor then names an
            # unrelated event, and only a fresh snapshot gives a true picture.
            client._backoff_initial_s = client._backoff_max_s = 6.0
            old_cursor = _seq(client.last_event_id)
            await until(pilot, lambda: (app.connection.retry_in_s or 0) >= 3.0,
                        what="a long retry wait")
            async with engine_on(tmp_path, port, api_port, rest) as run:
                numbers = ["+15550100032", "+15550100033", "+15550100034"]
                calls = []
                for number in numbers:
                    calls.append(HeldCall(run, number))
                    await asyncio.sleep(0.2)  # distinct start times: a stable row order
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while _seq(await run.engine.hub.bus.latest_id()) <= old_cursor:
                    assert loop.time() < deadline, "the new engine published too little"
                    await pilot.pause(0.05)
                assert app.connection.state != "connected", "reconnected too early"
                await until(pilot, lambda: app.connection.state == "connected",
                            within_s=10, what="reconnected")
                assert app.hello is not None and app.hello.engine_id != first_engine
                await until(pilot, lambda: "● connected" in status_line(app),
                            what="connected in the status bar")
                # A fresh snapshot replaced the view: the first engine's call is gone and
                # the new calls are there with what only their start told (the number).
                sids = [call.sid for call in calls]
                await until(pilot, lambda: row_keys(app) == sids, what="the new calls")
                table = app.query_one(CallsTable)
                await until(pilot, lambda: [table.get_cell(sid, "caller").plain
                                            for sid in sids] == numbers,
                            what="the new callers' numbers")
                # And it stays live: a call placed now shows up too.
                late = HeldCall(run, "+15550100035")
                await until(pilot, lambda: row_keys(app) == [*sids, late.sid], what="late call")
                for call in [*calls, late]:
                    await call.end()
    finally:
        await rest.stop()


# -- a real terminal -----------------------------------------------------------------------


CONNECTED = re.compile(r"(?<!re)connected")


def _tmux(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-S", str(socket), *args], capture_output=True,
                          text=True, timeout=10)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_console_in_tmux_shows_a_live_call_and_quits(tmp_path: Path) -> None:
    socket = tmp_path / "tmux.sock"
    rc_file = tmp_path / "console.rc"
    async with running_engine(tmp_path, supervised_engine, None, **sections()) as run:
        # `switchboard console …`, as an operator types it (through `python -m switchboard`).
        command = " ".join(shlex.quote(part) for part in [
            sys.executable, "-m", "switchboard", "console", "--engine", api_url(run), "--token",
            TOKEN, "--log-file", str(tmp_path / "console.log")]) + f"; echo $? > {rc_file}"
        env = dict(os.environ, TERM="xterm-256color")
        env.pop("TMUX", None)
        started = await asyncio.to_thread(
            subprocess.run, ["tmux", "-S", str(socket), "new-session", "-d", "-s", "console",
                             "-x", "120", "-y", "40", "-e", "TERM=xterm-256color", command],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=10)
        assert started.returncode == 0, started.stderr
        call: HeldCall | None = None
        try:
            screen = ""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not CONNECTED.search(screen) or "calls 0" not in screen:
                assert loop.time() < deadline, f"console did not connect:\n{screen}"
                await asyncio.sleep(0.2)
                screen = (await asyncio.to_thread(_tmux, socket, "capture-pane", "-p",
                                                  "-t", "console")).stdout
            call = HeldCall(run, "+15550100041")
            deadline = loop.time() + 20
            while "+15550100041" not in screen or " AI " not in screen:
                assert loop.time() < deadline, f"the call never showed:\n{screen}"
                await asyncio.sleep(0.2)
                screen = (await asyncio.to_thread(_tmux, socket, "capture-pane", "-p",
                                                  "-t", "console")).stdout
            assert "calls 1" in screen and "Hang up" in screen  # status bar and footer
            await asyncio.to_thread(_tmux, socket, "send-keys", "-t", "console", "q")
            deadline = loop.time() + 10
            while (await asyncio.to_thread(_tmux, socket, "has-session", "-t",
                                           "console")).returncode == 0:
                assert loop.time() < deadline, "the console did not quit on q"
                await asyncio.sleep(0.2)
            assert rc_file.read_text().strip() == "0"
        finally:
            await asyncio.to_thread(_tmux, socket, "kill-server")
            if call is not None:
                await call.end()


async def test_switchboard_console_passes_its_options_on() -> None:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "console", "--engine",
                         "ws://127.0.0.1:9", "--token", "t", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: switchboard console" in done.stdout
