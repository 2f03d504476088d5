"""Draining for rolling restarts, on a real engine with simulated callers: new calls get
503 while the call in progress finishes; at the deadline the caller hears the goodbye and
is hung up; SIGTERM drains and a second one stops; `switchboard drain` asks through the
supervisor API with a full token."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from engine.app import Engine
from engine.bus.events import CallEnded, TranscriptLine
from engine.config import Config
from engine.fleet.drain import DRAIN_REASON
from engine.sim.scenario import Scenario, Step
from engine.supervision.server import SupervisorApi
from switchboard import cli
from tests.harness import EventLog, RunningEngine, running_engine

READONLY = "readonly-token-" + "r" * 32


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def streaming(run: RunningEngine) -> bool:
    """One call is live and its media stream has started."""
    live = run.engine.registry.live()
    return len(live) == 1 and live[0].stream_sid is not None


async def healthz(run: RunningEngine) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as resp:
        return resp.status, await resp.json()


async def test_draining_refuses_new_calls_while_the_call_in_progress_finishes(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, fleet={"drain_deadline_s": 30.0}) as run:
        drainer = run.engine.drainer
        first = asyncio.create_task(run.caller().run(
            Scenario(name="in progress", steps=[Step(pause=2.0)])))
        await wait_for(lambda: streaming(run), 10)
        status, body = await healthz(run)
        assert status == 200 and body["drain"]["draining"] is False
        assert drainer.start("test") is True
        assert drainer.start("test again") is False  # once
        refused = await run.caller().run(Scenario(name="new", steps=[]))
        status, body = await healthz(run)
        result = await first
        await asyncio.wait_for(drainer.exit_requested.wait(), 5)
    assert refused.error is not None and "answered 503" in refused.error
    assert status == 503 and body["status"] == "draining"
    assert body["drain"]["draining"] is True and body["drain"]["active_calls"] == 1
    assert result.error is None and result.ended_by == "caller"
    assert not result.completed_by_rest and drainer.goodbyes == 0


async def test_at_the_deadline_each_call_hears_the_goodbye_and_is_hung_up(
        tmp_path: Path) -> None:
    goodbye = "We are closing this line now. Goodbye."
    async with running_engine(tmp_path, fleet={"drain_deadline_s": 0.5,
                                               "drain_goodbye": goodbye}) as run:
        events = EventLog(run)
        caller = run.caller()
        call = asyncio.create_task(caller.run(Scenario(name="long",
                                                       steps=[Step(pause=60.0)])))
        await wait_for(lambda: streaming(run), 10)
        await caller.wait_agent_done(timeout=20)  # the greeting is over
        heard_before = caller.result.frames_received
        began = time.monotonic()
        run.engine.drainer.start("test")
        result = await asyncio.wait_for(call, 30)
        took = time.monotonic() - began
        await asyncio.wait_for(run.engine.drainer.exit_requested.wait(), 5)
        await asyncio.sleep(0.2)
        await events.close()
    said = [e.text for e in events.events if isinstance(e, TranscriptLine)
            and e.speaker == "system"]
    ended = [e for e in events.events if isinstance(e, CallEnded)]
    assert said == [goodbye]
    assert result.frames_received - heard_before > 50  # the goodbye, heard (> 1 s)
    assert result.completed_by_rest and result.error is None
    assert [e.reason for e in ended] == [DRAIN_REASON]
    assert took < 20 and run.engine.drainer.goodbyes == 1


async def test_sigterm_drains_and_a_second_one_stops_at_once(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        drainer = run.engine.drainer
        loop = asyncio.get_running_loop()
        call = asyncio.create_task(run.caller().run(
            Scenario(name="in progress", steps=[Step(pause=30.0)])))
        await wait_for(lambda: streaming(run), 10)
        drainer.install_signal_handlers(loop)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_for(lambda: drainer.draining, 2)
            await asyncio.sleep(0.3)
            assert not drainer.exit_requested.is_set()  # the call goes on
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(drainer.exit_requested.wait(), 2)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
        assert drainer.requested_by == "SIGTERM"
        assert len(run.engine.registry) == 1  # stopping at once is the shutdown's job
    result = await asyncio.wait_for(call, 10)  # the engine's shutdown ended it
    assert result.ended_by != "caller"


async def test_sigint_stops_at_once(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as run:
        drainer = run.engine.drainer
        loop = asyncio.get_running_loop()
        drainer.install_signal_handlers(loop)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(drainer.exit_requested.wait(), 2)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
        assert not drainer.draining


def supervised(config: Config) -> Engine:
    config.console_api.readonly_token = type(config.console_api.readonly_token)(READONLY)
    engine = Engine(config)
    api = SupervisorApi(config, engine.hub)
    engine.supervisor_api = api
    engine.on_started.append(api.start)
    engine.on_stopping.insert(0, api.stop)
    return engine


async def test_switchboard_drain_asks_the_engine_through_its_supervisor_api(
        tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=supervised) as run:
        api = run.engine.supervisor_api
        url = f"http://127.0.0.1:{api.port}"
        config_file = tmp_path / "config.toml"
        config_file.write_text(f'[engine]\ndata_dir = "{run.config.engine.data_dir}"\n'
                               f'[logging]\nformat = "json"\n')
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/engine/drain") as resp:
                no_token = resp.status
            async with http.post(url + "/engine/drain",
                                 headers={"Authorization": f"Bearer {READONLY}"}) as resp:
                readonly = resp.status
        assert not run.engine.drainer.draining
        argv = ["--config", str(config_file), "drain", "--url", f"ws://127.0.0.1:{api.port}"]
        code = await asyncio.to_thread(cli.main, argv)
        assert run.engine.drainer.draining
        assert run.engine.drainer.requested_by == "supervisor console"
        await asyncio.wait_for(run.engine.drainer.exit_requested.wait(), 5)  # no calls
        wrong = tmp_path / "wrong_token"
        wrong.write_text("not-the-token\n")
        refused = await asyncio.to_thread(
            cli.main, ["--config", str(config_file), "drain", "--url", url,
                       "--token-file", str(wrong)])
    assert (no_token, readonly) == (401, 403)
    assert code == 0 and refused == 1


@pytest.mark.parametrize("given", ["ws://h:9/console/ws", "http://h:9/", "h:9"])
def test_drain_url_accepts_what_consoles_are_given(given: str) -> None:
    from engine.config import Config as Cfg
    from switchboard.drain_client import drain_url

    assert drain_url(Cfg(), given) == "http://h:9/engine/drain"
