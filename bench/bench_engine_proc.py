"""The engine process of the calls benchmark: the real Engine, audio both ways, no models.

Run by bench/bench_calls.py (not usually by hand):
  .venv/bin/python bench/bench_engine_proc.py --port 8765 --auth-token T [--chunk-s 2]

Each call's conversation plays a pre-built speech-like mu-law buffer over and over through
`CallSession.play_ulaw` (a mark after each chunk) and keeps two chunks queued, so outbound
audio flows without a break for the whole call; inbound frames are only counted. Signature
checks stay on. Two bench-only routes are added to the engine's app (nothing in the
engine itself changes):

  POST /bench/quiesce  every call stops queueing audio and forgets what is unsent, so that
                       after a short drain "frames sent" equals "frames the caller got"
  GET  /bench/stats    per-call counters (frames sent/received, marks, backpressure skips),
                       pacer ticks/late ticks, bad messages, event-loop lag

The same stats are printed as one JSON line on stdout when the process gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.app import Engine
from engine.audio.codec import int16_to_ulaw
from engine.config import Config
from engine.log import configure_logging, get_logger
from engine.session.call_session import CallSession, Conversation
from engine.telephony.outbound import OutboundPlayer, Pacer

log = get_logger("bench.engine")

ACCOUNT_SID = "AC" + "b3" * 16
_MEDIA_PREFIX = '{"event":"media"'
RATE = 8000


def speech_like_ulaw(seconds: float) -> bytes:
    """Voiced syllables (a 120 Hz buzz through two formants) at ~4 Hz, as mu-law."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    buzz = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 20))
    formants = 0.6 * np.sin(2 * np.pi * 700 * t) + 0.4 * np.sin(2 * np.pi * 1200 * t)
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    signal_ = buzz * (0.5 + 0.5 * formants) * envelope
    peak = float(np.max(np.abs(signal_))) or 1.0
    pcm = (signal_ / peak * 12000).astype(np.int16)
    return int16_to_ulaw(pcm)


class LoopLagMonitor:
    """How late the event loop wakes a sleeper: the engine's own scheduling delay."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.stalls: list[tuple[float, float]] = []  # (monotonic time, lag ms) over 30 ms
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag_ms = (loop.time() - due) * 1000
            self.samples_ms.append(lag_ms)
            if lag_ms > 30:
                self.stalls.append((round(time.monotonic(), 3), round(lag_ms, 1)))

    def summary(self) -> dict[str, Any]:
        if not self.samples_ms:
            return {}
        arr = np.array(self.samples_ms)
        return {"p50_ms": round(float(np.percentile(arr, 50)), 2),
                "p99_ms": round(float(np.percentile(arr, 99)), 2),
                "max_ms": round(float(arr.max()), 2), "samples": len(arr),
                "stalls": self.stalls[-20:]}

    def reset(self) -> None:
        self.samples_ms.clear()
        self.stalls.clear()


class StallWatchdog:
    """Debug aid (--watch-stalls): where the loop was when it stalled, and whether the
    process was running (CPU time) or waiting for a CPU during the stall."""

    def __init__(self, threshold_s: float = 0.04) -> None:
        self.threshold_s = threshold_s
        self.beat = time.monotonic()
        self.reports: list[dict[str, Any]] = []
        self._main = threading.main_thread().ident

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(0.005)

    def watch(self) -> None:
        while True:
            time.sleep(0.01)
            stalled = time.monotonic() - self.beat
            if stalled < self.threshold_s:
                continue
            cpu0, wall0 = time.process_time(), time.monotonic()
            frame = sys._current_frames().get(self._main or 0)
            stack = traceback.format_stack(frame, limit=12) if frame is not None else []
            beat = self.beat
            while self.beat == beat and time.monotonic() - wall0 < 1.0:
                time.sleep(0.002)
            wall = time.monotonic() - wall0
            self.reports.append({"at": round(wall0, 3), "stalled_ms": round(stalled * 1000),
                                 "rest_ms": round(wall * 1000),
                                 "cpu_ms_in_rest": round((time.process_time() - cpu0) * 1000),
                                 "stack": [ln.strip().replace("\n", " | ")
                                           for ln in stack[-6:]]})


class GcPauses:
    """Collector pauses in the engine process (a full collection stops every call)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float, float]] = []  # (gen, at, wall ms, cpu ms)
        self._t0 = 0.0
        self._c0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            self._c0 = time.thread_time()
        else:
            ms = (time.perf_counter() - self._t0) * 1000
            cpu_ms = (time.thread_time() - self._c0) * 1000
            self.pauses.append((int(info["generation"]), round(time.monotonic(), 3),
                                round(ms, 2), round(cpu_ms, 2)))

    def summary(self) -> dict[str, Any]:
        by_gen: dict[str, Any] = {}
        for gen in (0, 1, 2):
            ms = [p[2] for p in self.pauses if p[0] == gen]
            if ms:
                by_gen[f"gen{gen}"] = {"count": len(ms), "max_ms": round(max(ms), 2),
                                       "total_ms": round(sum(ms), 1)}
        by_gen["longest"] = sorted(self.pauses, key=lambda p: -p[2])[:5]
        by_gen["tracked_objects"] = len(gc.get_objects())
        by_gen["frozen_objects"] = gc.get_freeze_count()
        return by_gen

    def reset(self) -> None:
        self.pauses.clear()


class ContinuousPlayback:
    """A Conversation that talks without pause: chunk after chunk, two always queued."""

    def __init__(self, session: CallSession, chunk: bytes, quiesced: asyncio.Event) -> None:
        self.session = session
        self.chunk = chunk
        self.quiesced = quiesced
        self.frames_in = 0
        self.chunks_played = 0

    def on_audio(self, ulaw: bytes) -> None:
        self.frames_in += 1

    def on_dtmf(self, digit: str) -> None:
        pass

    async def start(self) -> None:
        session = self.session
        pending: list[str] = []
        try:
            while not self.quiesced.is_set():
                while len(pending) < 2:
                    pending.append(await session.play_ulaw(self.chunk, prefix="b"))
                heard = asyncio.ensure_future(session.wait_mark(pending[0]))
                stop = asyncio.ensure_future(self.quiesced.wait())
                await asyncio.wait((heard, stop), return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if heard.done():
                    pending.pop(0)
                    self.chunks_played += 1
                else:
                    heard.cancel()
        except ConnectionError:
            return  # the stream closed under us: the call is ending
        if session.player is not None:
            session.player.drop_queued()

    # Supervisor and barge-in controls: nobody uses them in the benchmark.
    def set_listening(self, active: bool) -> None:
        pass

    def take_over(self) -> None:
        pass

    def hand_back(self) -> None:
        pass

    def interrupt(self, reason: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


class TimedPacer(Pacer):
    """The engine's Pacer, noting when each media frame went to the socket: jitter as the
    engine produced it, free of the callers' own scheduling delays."""

    def __init__(self, lead_s: float) -> None:
        super().__init__(lead_s)
        self.send_times: dict[str, list[float]] = {}

    def create_player(self, call_sid: str, stream_sid: str, ws: web.WebSocketResponse,
                      transport: asyncio.BaseTransport | None) -> OutboundPlayer:
        times = self.send_times.setdefault(call_sid, [])
        send = ws.send_str
        now = time.monotonic

        async def timed_send(text: str) -> None:
            await send(text)
            if text.startswith(_MEDIA_PREFIX):
                times.append(now())

        return OutboundPlayer(call_sid, stream_sid, timed_send, transport, self)


class BenchEngine:
    """The Engine plus the bench-only routes and counters."""

    def __init__(self, config: Config, chunk: bytes, watch_stalls: bool = False) -> None:
        self.watchdog = StallWatchdog() if watch_stalls else None
        self.quiesced = asyncio.Event()
        self.chunk = chunk
        self.sessions: dict[str, CallSession] = {}  # kept after the call ends, for stats
        self.conversations: dict[str, ContinuousPlayback] = {}
        self.engine = Engine(config, conversation_factory=self._conversation)
        # Swapped in before the app starts: the handler and the health check share it.
        self.pacer = TimedPacer(self.engine.pacer.lead_s)
        self.engine.pacer = self.engine.media.pacer = self.pacer
        self.lag = LoopLagMonitor()
        self.gc = GcPauses()
        self.started = time.monotonic()

    def _conversation(self, session: CallSession) -> Conversation:
        conv = ContinuousPlayback(session, self.chunk, self.quiesced)
        self.sessions[session.call_sid] = session
        self.conversations[session.call_sid] = conv
        return conv

    def build_app(self) -> web.Application:
        app = self.engine.build_app()
        app.router.add_post("/bench/quiesce", self.quiesce)
        app.router.add_post("/bench/reset-lag", self.reset_lag)
        app.router.add_get("/bench/stats", self.stats_route)
        app.on_startup.append(self._start_monitor)
        return app

    async def _start_monitor(self, app: web.Application) -> None:
        self.lag.start()
        if self.watchdog is not None:
            asyncio.get_running_loop().create_task(self.watchdog.heartbeat())
            threading.Thread(target=self.watchdog.watch, daemon=True).start()

    async def quiesce(self, request: web.Request) -> web.Response:
        self.quiesced.set()
        for session in self.sessions.values():
            if session.player is not None:
                session.player.drop_queued()
        return web.json_response({"quiesced": True})

    async def reset_lag(self, request: web.Request) -> web.Response:
        self.lag.reset()
        return web.json_response({"reset": True})

    async def stats_route(self, request: web.Request) -> web.Response:
        body = self.stats()
        if request.query.get("send_times"):
            body["send_times"] = self.pacer.send_times
        return web.json_response(body)

    def stats(self) -> dict[str, Any]:
        calls: dict[str, dict[str, Any]] = {}
        for sid, session in self.sessions.items():
            player = session.player
            calls[sid] = {
                "frames_sent": player.frames_sent if player else 0,
                "marks_sent": player.marks_sent if player else 0,
                "backpressure_skips": player.backpressure_skips if player else 0,
                "frames_in": session.stats.frames_in,
                "marks_in": session.stats.marks_in,
                "bad_messages": dict(session.stats.bad_messages),
                "state": session.state.value,
                "end_reason": session.end_reason,
            }
        pacer = self.engine.pacer
        return {"calls": calls, "pacer": {"ticks": pacer.ticks, "late_ticks": pacer.late_ticks},
                "bad_messages": dict(self.engine.bad_messages),
                "calls_total": self.engine.calls_total,
                "loop_lag": self.lag.summary(), "gc": self.gc.summary(),
                "uptime_s": round(time.monotonic() - self.started, 2),
                "stall_reports": self.watchdog.reports[-30:] if self.watchdog else []}


def bench_config(port: int, auth_token: str, lead_ms: int | None, data_dir: str) -> Config:
    engine: dict[str, Any] = {"host": "127.0.0.1", "port": port,
                              "public_url": f"http://127.0.0.1:{port}", "data_dir": data_dir,
                              "max_call_seconds": 3600.0}
    if lead_ms is not None:
        engine["outbound_lead_ms"] = lead_ms
    return Config.model_validate({
        "engine": engine,
        # Never called: callers hang up over the stream, not through the REST API.
        "twilio": {"account_sid": ACCOUNT_SID, "auth_token": auth_token,
                   "api_base_url": "http://127.0.0.1:9"},
        "logging": {"format": "json"},
    })


def run_profiled(main: Coroutine[Any, Any, None], profile_path: str | None) -> None:
    """asyncio.run(main), under cProfile when a stats path is given."""
    if not profile_path:
        asyncio.run(main)
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(main)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


async def serve(args: argparse.Namespace) -> None:
    config = bench_config(args.port, args.auth_token, args.lead_ms, args.data_dir)
    bench = BenchEngine(config, speech_like_ulaw(args.chunk_s), args.watch_stalls)
    runner = web.AppRunner(bench.build_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    # Hundreds of callers connect within a second or two: a deep accept backlog.
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    if args.gc_freeze:
        # Everything alive after start-up is never garbage: keep it out of collections.
        gc.collect()
        gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "port": args.port}), flush=True)
    await stop.wait()
    print(json.dumps({"final_stats": bench.stats()}), flush=True)
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth-token", required=True)
    parser.add_argument("--chunk-s", type=float, default=2.0,
                        help="seconds of audio per queued chunk (each followed by a mark)")
    parser.add_argument("--lead-ms", type=int, default=None,
                        help="override engine.outbound_lead_ms (default: the config's)")
    parser.add_argument("--data-dir", default="/tmp/switchboard-bench")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after start-up (what a production engine could do)")
    parser.add_argument("--watch-stalls", action="store_true",
                        help="report the loop's stack and CPU use during stalls over 40 ms")
    parser.add_argument("--cprofile", default=None, help="write cProfile stats to this path")
    args = parser.parse_args()
    configure_logging(args.log_level, "json")
    run_profiled(serve(args), args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
