"""The operations plane on a real engine: supervisor commands reach the caller, the
ledger equals the price table applied to what providers reported, history survives
`kill -9` and `switchboard report` reads it, /metrics and /healthz speak."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.bus.events import CallEnded, StateChanged, TurnLatency, UsageCost
from engine.config import Config
from engine.money.prices import PriceTable
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.sim.standins.twilio_api import TwilioApiStandIn
from engine.supervision.api_schema import SERVER_FRAME, EventFrame, Reply, Snapshot
from engine.wiring import build_engine
from tests.harness import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    ROOT,
    EventLog,
    RunningEngine,
    base_sections,
    free_port,
    heard_text,
    make_local_engine,
    running_engine,
)

pytestmark = pytest.mark.slow

TOKEN = "console-test-token-0123456789abcdef"
READONLY = "console-readonly-token-0123456789"


def ops_sections() -> dict[str, dict[str, Any]]:
    sections = base_sections()
    sections["console_api"] = {"port": 0, "token": TOKEN, "readonly_token": READONLY}
    sections["transfer"] = {"number": "+15550100999",
                            "destinations": [{"name": "Billing", "number": "+15550100901"}]}
    return sections


async def supervised_engine(config: Config):  # type: ignore[no-untyped-def]
    return await make_local_engine(config, history=True, supervisor_api=True)


class Console:
    """A minimal supervisor client speaking the api_schema protocol."""

    def __init__(self, run: RunningEngine, token: str = TOKEN) -> None:
        self.url = f"http://127.0.0.1:{run.engine.supervisor_api.port}/console/ws"
        self.token = token
        self.http = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.frames: list[Any] = []
        self.replies: dict[str, Reply] = {}
        self._n = 0
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(
            self.url, headers={"Authorization": f"Bearer {self.token}",
                               "X-Switchboard-Actor": "dana"})
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            frame = SERVER_FRAME.validate_json(msg.data)
            self.frames.append(frame)
            if isinstance(frame, Reply):
                self.replies[frame.id] = frame

    async def command(self, command: str, call_sid: str, **kw: str) -> Reply:
        assert self.ws is not None
        self._n += 1
        cid = f"c{self._n}"
        await self.ws.send_str(json.dumps({"type": "command", "id": cid, "command": command,
                                           "call_sid": call_sid, **kw}))
        async with asyncio.timeout(20):
            while cid not in self.replies:
                await asyncio.sleep(0.02)
        return self.replies[cid]

    def events(self, kind: type) -> list[Any]:
        return [f.event for f in self.frames
                if isinstance(f, EventFrame) and isinstance(f.event, kind)]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.http.close()


async def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_take_over_makes_the_caller_hear_the_supervisor(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=supervised_engine,
                              **ops_sections()) as run:
        caller = run.caller()
        call = asyncio.create_task(caller.run(Scenario(
            name="hold", hangup_at_end=False, steps=[])))
        await wait_for(lambda: run.engine.registry.get(caller.call_sid) is not None)
        console = Console(run)
        await console.connect()
        await wait_for(lambda: any(isinstance(f, Snapshot) for f in console.frames))
        snapshot = next(f for f in console.frames if isinstance(f, Snapshot))
        assert caller.call_sid in [c.call_sid for c in snapshot.calls]
        await caller.wait_agent_done(timeout=20)  # the greeting played

        assert (await console.command("hand_back", caller.call_sid)).error == \
            "not allowed in state ai"
        assert (await console.command("take_over", caller.call_sid)).ok
        mark = len(caller.result.heard)
        reply = await console.command("say", caller.call_sid,
                                      text="Hello, a manager will call you back tomorrow "
                                           "morning.")
        assert reply.ok, reply.error
        await caller.wait_agent_done(timeout=20)
        said = await heard_text(bytes(caller.result.heard[mark:]))
        assert "manager" in said or "tomorrow" in said, said
        assert (await console.command("hand_back", caller.call_sid)).ok
        states = [e.new for e in console.events(StateChanged) if e.call_sid == caller.call_sid]
        assert "human_takeover" in states and states[-1] == "ai"
        assert (await console.command("hang_up", caller.call_sid)).ok
        result = await asyncio.wait_for(call, 10)
        assert result.completed_by_rest
        # Commands on a finished call and an unknown one are refused and change nothing.
        ended = await console.command("say", caller.call_sid, text="hello?")
        assert ended.error == "call already ended"
        unknown = await console.command("hang_up", "CA" + "0" * 32)
        assert unknown.error == "unknown call"
        await console.close()
        await run.engine.hub.drain()
        history = run.engine.hub.history
        assert history is not None
        stored = await history.actions(caller.call_sid)
    actions = [(a.actor, a.action, a.ok) for a in stored]
    # The token's owner acted ("console": the configured token); the header only claims.
    assert ("console", "take_over", True) in actions
    assert ("console", "say", True) in actions
    assert ("console", "hand_back", False) in actions


async def test_readonly_console_watches_but_cannot_act(tmp_path: Path) -> None:
    async with running_engine(tmp_path, make_engine=supervised_engine,
                              **ops_sections()) as run:
        caller = run.caller()
        call = asyncio.create_task(caller.run(Scenario(name="hold", hangup_at_end=False,
                                                       steps=[])))
        await wait_for(lambda: run.engine.registry.get(caller.call_sid) is not None)
        watcher = Console(run, READONLY)
        await watcher.connect()
        reply = await watcher.command("hang_up", caller.call_sid)
        assert not reply.ok and "read-only" in (reply.error or "")
        session = run.engine.registry.get(caller.call_sid)
        assert session is not None and not session.ended
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(watcher.url, headers={"Authorization": "Bearer nope"})
            assert info.value.status == 401
        await watcher.close()
        await caller.hang_up()
        await asyncio.wait_for(call, 10)


async def test_ledger_equals_price_table_applied_to_reported_usage(tmp_path: Path) -> None:
    openai = OpenAIStandin(api_key="sk-test")
    eleven = ElevenLabsStandin(api_key="xi-test")
    oa_url, el_url = await openai.start(), await eleven.start()
    openai.transcript = "How much does the premium plan cost?"
    openai.reply = "Premium is 45 dollars a month. It includes unlimited data."
    sections = ops_sections()
    sections["providers"] = {
        "stt": ["openai"], "agent": ["openai"], "tts": ["elevenlabs"],
        "openai": {"api_key": "sk-test", "base_url": oa_url, "stt_model": "whisper-1"},
        "elevenlabs": {"api_key": "xi-test", "base_url": el_url}}
    sections["cache"] = {"backend": "off"}

    async def make(config: Config):  # type: ignore[no-untyped-def]
        return await build_engine(config, history=False, supervisor_api=False)

    try:
        async with running_engine(tmp_path, make_engine=make, **sections) as run:
            events = EventLog(run)
            caller = run.caller()
            result = await caller.run(Scenario(name="bill", steps=[
                Step(say="How much does the premium plan cost?"),
                Step(say="And the basic plan?")]))
            await run.engine.hub.drain()
            await asyncio.sleep(0.2)
            await events.close()
    finally:
        await openai.stop()
        await eleven.stop()
    assert result.error is None
    prices = run.config.prices
    table = PriceTable(prices)
    # What the vendors bill by their own logs, priced by the configured list prices.
    expected = sum((table.cost_decimal(u)[0] for u in openai.bill() + eleven.bill()),
                   Decimal(0))
    # Characters the voice was sent: whole sentences over HTTP, the reply's text as it was
    # written over the input stream.
    chars = sum(len(r.json["text"]) for r in eleven.requests if r.json) + sum(
        session.characters for session in eleven.stream_inputs if not session.refused)
    minutes = -(-int(result.duration_s * 1000) // 60000)  # Twilio bills started minutes
    ended = [e for e in events.events if isinstance(e, CallEnded)]
    # The phone leg and the media stream, each per started minute.
    phone = (Decimal(str(prices.twilio_per_minute))
             + Decimal(str(prices.twilio_media_streams_per_minute))) * max(1, minutes)
    assert len(openai.usage_log) >= 4 and chars > 50
    assert sum(u.characters for u in eleven.bill()) == chars
    total = Decimal(str(ended[0].cost_usd))
    assert abs(total - (expected + phone)) < Decimal("0.005"), (total, expected, phone)
    assert abs(total - (expected + phone)) < Decimal("1e-9")
    usage_events = [e for e in events.events if isinstance(e, UsageCost) and e.kind != "telephony"]
    assert abs(sum(Decimal(str(e.cost_usd)) for e in usage_events) - expected) < Decimal("1e-9")
    latencies = [e for e in events.events if isinstance(e, TurnLatency)]
    assert latencies and all(e.stt_s is not None and e.llm_first_token_s is not None
                             for e in latencies)


def _serve(config_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "switchboard", "--config", str(config_path),
                             "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def test_kill_9_mid_call_leaves_a_history_report_can_read(tmp_path: Path) -> None:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    rest_url = await rest.start()
    port, api_port = free_port(), free_port()
    data = tmp_path / "data"
    config_text = (ROOT / "config.toml").read_text()
    config_text = config_text.replace('port = 8080', f'port = {port}', 1)
    config_text = config_text.replace('port = 8081', f'port = {api_port}', 1)
    config_text = config_text.replace('data_dir = "~/.local/share/switchboard"',
                                      f'data_dir = "{data}"')
    config_text = config_text.replace('api_base_url = "https://api.twilio.com"',
                                      f'api_base_url = "{rest_url}"')
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_text)
    env = dict(os.environ, TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_AUTH_TOKEN=AUTH_TOKEN,
               SWITCHBOARD_CONSOLE_TOKEN=TOKEN)
    proc = _serve(config_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "engine did not start"
                await asyncio.sleep(0.2)
        from engine.sim.caller import SimulatedCaller

        caller = SimulatedCaller(url, AUTH_TOKEN, ACCOUNT_SID, rest=rest, voice="en-us+m3")
        call = asyncio.create_task(caller.run(Scenario(name="crash", hangup_at_end=False, steps=[
            Step(say="How much does the premium plan cost?"), Step(pause=30)])))
        await wait_for(lambda: len(caller.result.lines) == 1
                       and caller.result.lines[0].first_reply_at is not None, 60)
        await caller.wait_agent_done(timeout=30)
        await asyncio.sleep(0.5)  # the turn is written as it completes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await asyncio.wait_for(call, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        await rest.stop()
    report = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "--config", str(config_path),
                         "report", "--since", "1d", "--format", "json"],
        env=env, capture_output=True, timeout=60)
    assert report.returncode == 0, report.stderr.decode()[-2000:]
    figures = json.loads(report.stdout)
    assert figures["calls"] == 1
    assert figures["avg_voice_to_voice_s"] is not None
    # A restarted engine closes the call the crash left open, consistently.
    proc = _serve(config_path, env)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    again = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "--config", str(config_path),
                         "report", "--since", "1d", "--format", "json"],
        env=env, capture_output=True, timeout=60)
    after = json.loads(again.stdout)
    assert after["calls"] == 1 and after["calls_ended_unexpectedly"] == 1


async def test_metrics_and_health_endpoints(tmp_path: Path) -> None:
    sections = ops_sections()
    # Not a test of deadlines: a busy machine must not make the local voice miss its
    # first-audio deadline (it would fall back, and /healthz rightly say so).
    sections["providers"] = {"tts_first_audio_timeout_s": 10.0, "stt_timeout_s": 10.0}
    async with running_engine(tmp_path, make_engine=supervised_engine, **sections) as run:
        result = await run.caller().run(Scenario(name="q", steps=[
            Step(say="Where are you located?")]))
        assert result.error is None
        async with aiohttp.ClientSession() as http:
            async with http.get(run.url + "/metrics") as resp:
                text = await resp.text()
                assert resp.status == 200
            async with http.get(run.url + "/healthz") as resp:
                health = await resp.json()
    assert "switchboard_stage_latency_seconds_bucket" in text
    assert 'stage="voice_to_voice"' in text
    assert "switchboard_calls_total 1.0" in text
    assert health["status"] == "ok" and health["calls_total"] == 1, health["degraded"]


async def test_an_engine_that_stops_leaves_shared_voices_working(tmp_path: Path) -> None:
    """Providers passed to build_engine are the caller's (shared by several engines): an
    engine that stops must not close them (it once shut the shared voice's workers)."""
    from engine.providers.base import AudioChunk
    from tests.harness import local_providers

    async with running_engine(tmp_path, make_engine=supervised_engine, **ops_sections()):
        pass
    config = Config()
    voice = local_providers(config).tts[0]
    chunks = [e async for e in voice.synthesize("Still here.") if isinstance(e, AudioChunk)]
    assert sum(len(c.ulaw) for c in chunks) > 1600
