"""`switchboard demo`: the embedded default in one command.

Starts an engine with local providers and the in-process bus, a local stand-in for
Twilio's REST API, and simulated callers who keep calling through varied scenarios
(FAQ questions, a barge-in, one that asks for a person, one that presses 0, a long call
that runs past its cost cap, one with questions the FAQ does not cover, one who asks
where an order is: the agent looks it up in a small local order service the demo starts,
through the `order_status` tool). The callers speak
with the neural voice at another rate and pitch than the agent's. Opens the console on
it, or with `--headless` prints the conversations and a summary that scores the callers:
recognized as scripted (word error rate), answered right. Log lines go to a file in the
demo's data directory, named at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import sys
from typing import TextIO

from aiohttp import web

from engine.app import Engine
from engine.config import Config, FaqEntry, ToolConfig
from engine.config.experiments import ExperimentConfig
from engine.log import configure_logging, get_logger
from engine.providers.builtin.tts_espeak import espeak_settings
from engine.record.data_dir import prepare_data_dir, private_file
from engine.sim.caller import CallResult, SimulatedCaller
from engine.sim.caller_voice import caller_voice
from engine.sim.order_service import ORDER_STATUS_PARAMETERS, OrderService
from engine.sim.scenario import Scenario, bundled_scenarios_dir
from engine.sim.scoring import AnswerKey
from engine.sim.standins.twilio_api import TwilioApiStandIn
from switchboard.demo_watch import DemoWatcher

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
    if not any(e.enabled for e in cfg.experiments):  # the console's Variant column
        cfg.experiments.append(ExperimentConfig.model_validate(DEMO_EXPERIMENT))
    return cfg


# A small A/B test: one arm waits longer before it takes trailing words as the end.
DEMO_EXPERIMENT = {"name": "demo", "variants": [
    {"name": "usual"}, {"name": "patient", "turns": {"trailing_silence_ms": 1600}}]}


ORDER_TOOL = "order_status"
ORDER_ANSWER = "Order {order_id} is {status}, arriving {eta}."


def with_order_lookup(cfg: Config, url: str) -> None:
    """The demo's order service as the `order_status` tool, and the FAQ's order entry
    (one is added when the FAQ has none) looking orders up with it: a caller who names
    an order number gets its status; one who does not, the entry's plain answer."""
    if not any(tool.name == ORDER_TOOL for tool in cfg.tools):
        cfg.tools.append(ToolConfig(
            name=ORDER_TOOL, description="Look up an order's delivery status and ETA.",
            parameters=ORDER_STATUS_PARAMETERS, url=url, timeout_s=3.0, idempotent=True))
    entry = next((e for e in cfg.faq.entries if e.id == ORDER_TOOL), None)
    if entry is None:
        entry = FaqEntry(id=ORDER_TOOL, questions=["Where is my order?",
                                                   "What is the status of my order?"],
                         answer="Tell me your order number and I will look it up.")
        cfg.faq.entries.append(entry)
    if entry.tool is None:
        entry.tool, entry.tool_argument, entry.tool_answer = \
            ORDER_TOOL, "order_id", ORDER_ANSWER


def load_scenarios() -> list[Scenario]:
    return [Scenario.from_file(p) for p in sorted(bundled_scenarios_dir().glob("*.toml"))]


Run = tuple[Scenario, CallResult]


async def _callers(engine_url: str, config: Config, rest: TwilioApiStandIn,
                   watcher: DemoWatcher, concurrency: int, rounds: int | None,
                   stop: asyncio.Event, runs: list[Run]) -> None:
    scenarios = load_scenarios()
    # One voice and one recording per line for every caller: each line is synthesized once.
    voice = caller_voice(config, espeak_voice=espeak_settings(config).caller_voice)
    await voice.warm_up()
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
                                     config.twilio.account_sid, rest=rest, speech=voice,
                                     speech_cache=speech)
            runs.append((scenario, caller.result))  # scored even if cut short by --duration
            result = await caller.run(scenario)
            if result.error:
                log.warning("demo.call_failed", call_sid=result.call_sid, error=result.error)
            await asyncio.sleep(1.0)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


class _LogFile:
    """The demo's log lines, engine and libraries alike, in a file in the data directory:
    the terminal shows the conversations (or the console) only."""

    def __init__(self, cfg: Config) -> None:
        self.path = cfg.data_path() / "demo-engine.log"
        prepare_data_dir(self.path.parent)
        private_file(self.path)  # log lines name calls: only the owner reads them
        # Opened once before anything runs; closed by `close` at the end.
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        configure_logging(cfg.logging.level, "json", stream=self._file,
                          redact=cfg.logging.redact)
        self._handler = logging.StreamHandler(self._file)
        logging.getLogger().addHandler(self._handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        self._file.close()


async def _headless(callers: asyncio.Task[None], stop: asyncio.Event, engine: Engine,
                    watcher: DemoWatcher, runs: list[Run], duration_s: float | None,
                    cfg: Config, out: TextIO) -> int:
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
    scores = watcher.score(runs, AnswerKey(cfg), cfg.policy.cost_cap_line)
    print(watcher.summary(scores), file=out, flush=True)
    return 1 if any(result.error for _, result in runs) else 0


async def _with_console(cfg: Config, engine: Engine) -> int:
    from console.cli import run_console_on

    api = engine.supervisor_api
    return await run_console_on(f"ws://{cfg.console_api.host}:{api.port}", api.tokens.full)


async def run_demo(config: Config, headless: bool = False, calls: int = 3,
                   duration_s: float | None = None, out: TextIO | None = None,
                   configure_logs: bool = True) -> int:
    from engine.wiring import build_engine

    cfg = demo_config(config)
    log_file = _LogFile(cfg) if configure_logs else None
    out = out or sys.stdout
    rest = TwilioApiStandIn(cfg.twilio.account_sid, cfg.twilio.auth_token.get_secret_value())
    cfg.twilio.api_base_url = await rest.start()
    orders = OrderService()
    with_order_lookup(cfg, await orders.start())
    engine = await build_engine(cfg)
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    await web.TCPSite(runner, cfg.engine.host, cfg.engine.port).start()
    engine_url = f"http://{cfg.engine.host}:{cfg.engine.port}"
    watcher = DemoWatcher(out if headless else None, cfg.tool_use.filler_lines)
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
    runs: list[Run] = []
    callers = asyncio.create_task(_callers(engine_url, cfg, rest, watcher, calls, rounds,
                                           stop, runs))
    try:
        if headless:
            return await _headless(callers, stop, engine, watcher, runs, duration_s, cfg, out)
        return await _with_console(cfg, engine)
    finally:
        stop.set()
        callers.cancel()
        watch_task.cancel()
        await asyncio.gather(callers, watch_task, return_exceptions=True)
        await runner.cleanup()
        await rest.stop()
        await orders.stop()
        if log_file is not None:
            log_file.close()
            print(f"Log lines of this demo: {log_file.path}", file=out, flush=True)
