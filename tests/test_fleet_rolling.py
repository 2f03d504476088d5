"""Rolling restarts lose no call: two engines (local speech models, one Redis, the fleet
on) are drained and restarted one after the other while simulated callers keep calling
through a "load balancer" that retries a refused call on the other engine. And the real
process: `switchboard serve` drains on SIGTERM and exits 0."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from engine.sim.call_result import CallResult
from engine.sim.caller import SimulatedCaller
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.twilio_api import TwilioApiStandIn
from tests.harness import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    ROOT,
    RunningEngine,
    base_sections,
    free_port,
    make_local_engine,
    running_engine,
)

pytestmark = pytest.mark.slow

QUESTIONS = ["What are your opening hours?", "Where are you located?"]


class Fleet:
    """Engines by name, each restartable; the load balancer in front of them."""

    def __init__(self, tmp_path: Path, sections: dict) -> None:
        self.tmp_path = tmp_path
        self.sections = sections
        self.runs: dict[str, RunningEngine] = {}
        self._stacks: dict[str, AsyncExitStack] = {}
        self._starts = itertools.count()
        self.refused = 0  # webhooks answered 503 (or no engine listening): retried
        self.answered: list[tuple[str, CallResult]] = []
        self.declared_dead: list[str] = []
        self.engine_ids: list[str] = []
        self.probes: list[asyncio.Task[None]] = []
        self._speech: dict[tuple[str, str], bytes] = {}

    async def start(self, name: str) -> None:
        stack = AsyncExitStack()
        run = await stack.enter_async_context(running_engine(
            self.tmp_path / f"{name}{next(self._starts)}", make_engine=make_local_engine,
            **self.sections))
        self._stacks[name], self.runs[name] = stack, run
        self.engine_ids.append(run.engine.hub.engine_id)

    async def restart(self, name: str) -> None:
        """Drain (what SIGTERM does), wait for the exit, start a new engine."""
        run = self.runs[name]
        run.engine.drainer.start("rolling restart")
        # A call that rings this engine now is refused and goes to the other one.
        probe = asyncio.create_task(self.call(99, next(self._starts), prefer=name))
        await asyncio.wait_for(run.engine.drainer.exit_requested.wait(), 90)
        self.probes.append(probe)
        assert run.engine.drainer.goodbyes == 0  # every call finished on its own
        self._note_watcher(run)
        del self.runs[name]
        # Bounded: a stop or start that hangs fails here, naming it, instead of hanging CI.
        await asyncio.wait_for(self._stacks.pop(name).aclose(), 60)
        await asyncio.wait_for(self.start(name), 60)

    def _note_watcher(self, run: RunningEngine) -> None:
        fleet = run.engine.fleet
        assert fleet is not None and fleet.watcher is not None
        self.declared_dead += fleet.watcher.declared

    async def close(self) -> None:
        for name, stack in list(self._stacks.items()):
            self._note_watcher(self.runs[name])
            await asyncio.wait_for(stack.aclose(), 60)

    async def call(self, line: int, n: int, prefer: str | None = None) -> None:
        """One call through the load balancer: engines in turn until one answers
        (`prefer` first)."""
        scenario = Scenario(name=f"line{line}-{n}", from_number=f"+1555010{line:02d}{n:02d}",
                            steps=[Step(say=QUESTIONS[n % len(QUESTIONS)])])
        for attempt in range(200):
            names = sorted(self.runs)
            if not names:
                await asyncio.sleep(0.1)
                continue
            name = names[(line + n + attempt) % len(names)]
            if attempt == 0 and prefer in self.runs:
                name = prefer
            run = self.runs[name]
            caller = SimulatedCaller(run.url, AUTH_TOKEN, ACCOUNT_SID, rest=run.rest,
                                     public_url=run.config.engine.public_url,
                                     speech_cache=self._speech)
            result = await asyncio.wait_for(caller.run(scenario), 60)
            if result.error is not None and result.streams == 0:
                self.refused += 1  # 503, or the engine had gone: the next one
                assert "answered 503" in result.error or "Connect" in result.error, \
                    result.error
                await asyncio.sleep(0.05)
                continue
            self.answered.append((name, result))
            return
        raise AssertionError(f"{scenario.name}: no engine took the call")


@pytest.mark.redis
async def test_two_engines_restarted_one_after_the_other_lose_no_call(
        tmp_path: Path, redis_url: str) -> None:
    sections = base_sections()
    sections["redis"] = {"url": redis_url, "key_prefix": f"roll-{uuid.uuid4().hex[:8]}"}
    sections["fleet"] = {"enabled": True, "heartbeat_s": 0.5, "dead_after_s": 2.0,
                         "drain_deadline_s": 90.0}
    fleet = Fleet(tmp_path, sections)
    await fleet.start("a")
    await fleet.start("b")
    stop = asyncio.Event()

    async def phone_line(line: int) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            await fleet.call(line, n)

    lines = [asyncio.create_task(phone_line(i)) for i in range(3)]
    try:
        await asyncio.sleep(4.0)  # calls in progress on both engines
        await fleet.restart("a")
        await asyncio.sleep(2.0)
        await fleet.restart("b")
        await asyncio.sleep(4.0)  # the new engines take calls
        stop.set()
        await asyncio.wait_for(asyncio.gather(*lines, *fleet.probes), 120)
    finally:
        stop.set()
        for task in lines + fleet.probes:
            task.cancel()
        await asyncio.gather(*lines, *fleet.probes, return_exceptions=True)
        await fleet.close()
    assert fleet.refused >= 2  # each draining engine sent calls elsewhere
    assert len(fleet.answered) >= 6
    for name, result in fleet.answered:
        assert result.error is None, (name, result.error)
        assert result.ended_by == "caller" and not result.completed_by_rest, name
        assert all(line.reply_latency_s is not None for line in result.lines), name
    assert fleet.declared_dead == []  # drained engines left the fleet, none died
    assert len(fleet.engine_ids) == 4


def _serve(config_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "switchboard", "--config", str(config_path),
                             "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def _healthz(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url + "/healthz") as resp:
            return resp.status
    except aiohttp.ClientError:
        return None


async def test_switchboard_serve_drains_on_sigterm_then_exits_0(tmp_path: Path) -> None:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    rest_url = await rest.start()
    port, api_port = free_port(), free_port()
    text = (ROOT / "config.toml").read_text()
    text = text.replace("port = 8080", f"port = {port}", 1)
    text = text.replace("port = 8081", f"port = {api_port}", 1)
    text = text.replace('data_dir = "~/.local/share/switchboard"',
                        f'data_dir = "{tmp_path / "data"}"')
    text = text.replace('api_base_url = "https://api.twilio.com"',
                        f'api_base_url = "{rest_url}"')
    config_path = tmp_path / "config.toml"
    config_path.write_text(text)
    env = dict(os.environ, TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_AUTH_TOKEN=AUTH_TOKEN)
    proc = _serve(config_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 90
            while await _healthz(http, url) != 200:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "engine did not start"
                await asyncio.sleep(0.2)
            first = SimulatedCaller(url, AUTH_TOKEN, ACCOUNT_SID, rest=rest)
            call = asyncio.create_task(first.run(Scenario(name="in progress",
                                                          steps=[Step(pause=3.0)])))
            while first.result.streams == 0:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            while await _healthz(http, url) != 503:
                await asyncio.sleep(0.05)
            refused = await SimulatedCaller(url, AUTH_TOKEN, ACCOUNT_SID, rest=rest).run(
                Scenario(name="new", steps=[]))
            result = await asyncio.wait_for(call, 60)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await rest.stop()
    assert refused.error is not None and "answered 503" in refused.error
    assert result.error is None and result.ended_by == "caller"
    assert not result.completed_by_rest
    assert code == 0
