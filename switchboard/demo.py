"""`switchboard demo`: the embedded default in one command.

Starts an engine with local providers and the in-process bus, a local stand-in for
Twilio's REST API, and simulated callers who keep calling through varied scenarios
(FAQ questions, a barge-in, one that asks for a person, one that presses 0, a long call
that runs past its cost cap). Opens the console on it, or with `--headless` prints the
conversations and a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO

from aiohttp import web

from engine.app import Engine
from engine.bus.events import (
    Alert,
    CallEnded,
    CallStarted,
    Event,
    StateChanged,
    TranscriptLine,
    TurnLatency,
    UsageCost,
)
from engine.config import Config
from engine.log import configure_logging, get_logger
from engine.providers.builtin.tts_espeak import espeak_settings
from engine.sim.caller import CallResult, SimulatedCaller
from engine.sim.scenario import Scenario, bundled_scenarios_dir
from engine.sim.standins.twilio_api import TwilioApiStandIn

log = get_logger(__name__)

DEMO_CALL_CAP_USD = 0.015  # the long call crosses it when its second minute starts
DEMO_QUEUE = "+15550100999"


def _free_port(host: str, preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((host, preferred))
        except OSError:
            sock.bind((host, 0))
        return int(sock.getsockname()[1])


def demo_config(config: Config) -> Config:
    """The configuration for a self-contained demo on this machine."""
    cfg = config.model_copy(deep=True)
    cfg.engine.host = "127.0.0.1"
    cfg.engine.port = _free_port("127.0.0.1", cfg.engine.port)
    cfg.engine.public_url = ""
    cfg.engine.data_dir = str(config.data_path() / "demo")
    cfg.console_api.host = "127.0.0.1"
    cfg.console_api.port = _free_port("127.0.0.1", cfg.console_api.port)
    if not cfg.twilio.account_sid:
        cfg.twilio.account_sid = "AC" + "d3" * 16
    if not cfg.twilio.auth_token.get_secret_value():
        from pydantic import SecretStr

        cfg.twilio.auth_token = SecretStr(secrets.token_hex(16))
    if not cfg.transfer.number:
        cfg.transfer.number = DEMO_QUEUE
    cfg.policy.call_cost_cap_usd = min(cfg.policy.call_cost_cap_usd, DEMO_CALL_CAP_USD)
    return cfg


def load_scenarios() -> list[Scenario]:
    return [Scenario.from_file(p) for p in sorted(bundled_scenarios_dir().glob("*.toml"))]


@dataclass
class CallSummary:
    scenario: str
    from_number: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (speaker, text)
    cost_usd: float = 0.0
    end_reason: str = ""
    duration_s: float = 0.0
    v2v: list[float] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)


class DemoWatcher:
    """Reads the engine's events and keeps what the summary prints."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.calls: dict[str, CallSummary] = {}
        self.scenario_of: dict[str, str] = {}
        self.realtime: dict[str, float] = defaultdict(float)
        self.overhead: list[float] = []

    def handle(self, event: Event) -> None:
        sid = event.call_sid
        if isinstance(event, CallStarted):
            self.calls[sid] = CallSummary(self.scenario_of.get(event.from_number, "?"),
                                          event.from_number)
            self._say(sid, "call", f"started from {event.from_number}")
            return
        call = self.calls.get(sid)
        if call is None:
            return
        if isinstance(event, TranscriptLine) and event.final and event.text:
            text = event.heard_text or event.text if event.interrupted else event.text
            suffix = "  [cut off by the caller]" if event.interrupted else ""
            call.lines.append((event.speaker, text))
            self._say(sid, event.speaker, text + suffix)
        elif isinstance(event, TurnLatency):
            call.v2v.append(event.voice_to_voice_s)
            if event.engine_overhead_s is not None:
                self.overhead.append(event.engine_overhead_s)
        elif isinstance(event, UsageCost):
            call.cost_usd = event.call_cost_usd
            self.realtime[sid] = max(self.realtime[sid], event.realtime_equivalent_usd)
        elif isinstance(event, Alert):
            call.alerts.append(event.kind)
            self._say(sid, "alert", event.message)
        elif isinstance(event, StateChanged):
            call.states.append(event.new)
        elif isinstance(event, CallEnded):
            call.end_reason = event.reason
            call.duration_s = event.duration_s
            call.cost_usd = event.cost_usd
            self._say(sid, "call", f"ended ({event.reason}) after {event.duration_s:.0f} s, "
                                   f"${event.cost_usd:.4f}")

    def _say(self, sid: str, who: str, text: str) -> None:
        if self.out is not None:
            tag = self.calls[sid].scenario if sid in self.calls else sid[:10]
            print(f"[{tag:>16}] {who:>10}: {text}", file=self.out, flush=True)

    def summary(self) -> str:
        calls = [c for c in self.calls.values() if c.end_reason]
        if not calls:
            return "no call completed"
        v2v = sorted(v for c in calls for v in c.v2v)
        cost = sum(c.cost_usd for c in calls)
        minutes = sum(c.duration_s for c in calls) / 60
        escalated = sum(1 for c in calls if "transferring" in c.states)
        realtime = sum(self.realtime.values())
        lines = ["", "Summary", "-------",
                 f"calls completed        {len(calls)}",
                 f"escalated to a human   {escalated} ({escalated / len(calls):.0%})",
                 f"total cost             ${cost:.4f} (${cost / len(calls):.4f} per call, "
                 f"${cost / max(minutes, 1e-9):.4f} per minute)"]
        if v2v:
            p95 = v2v[min(len(v2v) - 1, int(0.95 * len(v2v)))]
            lines.append(f"voice-to-voice         p50 {statistics.median(v2v):.2f} s, "
                         f"p95 {p95:.2f} s over {len(v2v)} turns")
        if self.overhead:
            lines.append(f"engine overhead        p50 "
                         f"{statistics.median(self.overhead) * 1000:.1f} ms")
        if realtime:
            lines.append(f"OpenAI Realtime would  ${realtime:.4f} for the same speech "
                         "(speech+AI only; the phone line is paid either way)")
        for c in calls:
            lines.append(f"  {c.scenario:<16} {c.duration_s:5.0f} s  ${c.cost_usd:.4f}  "
                         f"{c.end_reason}")
        return "\n".join(lines)


async def _callers(engine_url: str, config: Config, rest: TwilioApiStandIn,
                   watcher: DemoWatcher, concurrency: int, rounds: int | None,
                   stop: asyncio.Event, results: list[CallResult]) -> None:
    scenarios = load_scenarios()
    speech: dict[tuple[str, str], bytes] = {}
    order = itertools.cycle(scenarios)
    total = None if rounds is None else rounds * len(scenarios)
    started = 0
    lock = asyncio.Lock()

    async def worker(index: int) -> None:
        nonlocal started
        await asyncio.sleep(index * 2.0)  # stagger, so calls do not all start together
        while not stop.is_set():
            async with lock:
                if total is not None and started >= total:
                    return
                started += 1
                scenario = next(order)
            watcher.scenario_of[scenario.from_number] = scenario.name
            caller = SimulatedCaller(engine_url, config.twilio.auth_token.get_secret_value(),
                                     config.twilio.account_sid, rest=rest,
                                     voice=espeak_settings(config).caller_voice,
                                     speech_cache=speech)
            result = await caller.run(scenario)
            results.append(result)
            if result.error:
                log.warning("demo.call_failed", call_sid=result.call_sid, error=result.error)
            await asyncio.sleep(1.0)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


def _configure_logs(cfg: Config, headless: bool) -> TextIO | None:
    """Headless: warnings to the terminal. With the console, which owns the terminal,
    engine logs go to a file instead (returned, to be closed at the end)."""
    if headless:
        configure_logging("warning", cfg.logging.format)
        return None
    log_path = cfg.data_path() / "demo-engine.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Opened once before anything runs; the caller closes it at the end.
    log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
    configure_logging(cfg.logging.level, "json", stream=log_file)
    return log_file


async def _headless(callers: asyncio.Task[None], stop: asyncio.Event, engine: Engine,
                    watcher: DemoWatcher, results: list[CallResult], duration_s: float | None,
                    out: TextIO) -> int:
    """Let the callers run (one round, or `duration_s`), then print the summary."""
    if duration_s is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(callers), duration_s)
        stop.set()  # no new calls; the ones in progress get a little longer
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(callers), 10.0)
        callers.cancel()  # callers still talking hang up now
    await asyncio.gather(callers, return_exceptions=True)
    await engine.hub.drain()
    await asyncio.sleep(0.3)
    print(watcher.summary(), file=out, flush=True)
    return 1 if any(r.error for r in results) else 0


async def _with_console(cfg: Config, engine: Engine) -> int:
    from console.cli import run_console_on

    api = engine.supervisor_api
    return await run_console_on(f"ws://{cfg.console_api.host}:{api.port}", api.tokens.full)


async def run_demo(config: Config, headless: bool = False, calls: int = 3,
                   duration_s: float | None = None, out: TextIO | None = None,
                   configure_logs: bool = True) -> int:
    from engine.wiring import build_engine

    cfg = demo_config(config)
    log_file = _configure_logs(cfg, headless) if configure_logs else None
    out = out or sys.stdout
    rest = TwilioApiStandIn(cfg.twilio.account_sid, cfg.twilio.auth_token.get_secret_value())
    cfg.twilio.api_base_url = await rest.start()
    engine = await build_engine(cfg)
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    await web.TCPSite(runner, cfg.engine.host, cfg.engine.port).start()
    engine_url = f"http://{cfg.engine.host}:{cfg.engine.port}"
    watcher = DemoWatcher(out if headless else None)
    stop = asyncio.Event()

    async def watch() -> None:
        async for _, event in engine.hub.bus.subscribe():
            watcher.handle(event)

    watch_task = asyncio.create_task(watch())
    if headless:
        print(f"Switchboard demo: engine on {engine_url}, {calls} simulated callers, "
              f"local speech models. Per-call cost cap ${cfg.policy.call_cost_cap_usd} "
              "(lowered for the demo).", file=out, flush=True)
    rounds = 1 if headless and duration_s is None else None
    results: list[CallResult] = []
    callers = asyncio.create_task(_callers(engine_url, cfg, rest, watcher, calls, rounds,
                                           stop, results))
    try:
        if headless:
            return await _headless(callers, stop, engine, watcher, results, duration_s, out)
        return await _with_console(cfg, engine)
    finally:
        stop.set()
        callers.cancel()
        watch_task.cancel()
        await asyncio.gather(callers, watch_task, return_exceptions=True)
        await runner.cleanup()
        await rest.stop()
        if log_file is not None:
            log_file.close()
