"""The engine process of the calls benchmark: the real Engine, audio both ways, no models.

Run by bench/bench_calls.py (not usually by hand):
  .venv/bin/python bench/bench_engine_proc.py --port 8765 --auth-token T [--chunk-s 2]

Each call's conversation plays a pre-built speech-like mu-law buffer over and over through
the session's voice (`Voice.play_ulaw`, a mark after each chunk) and keeps two chunks
queued, so outbound audio flows without a break for the whole call; inbound frames are
only counted. Signature checks stay on. Two bench-only routes are added to the engine's
app (nothing in the engine itself changes):

  POST /bench/quiesce  every call stops queueing audio and forgets what is unsent, so that
                       after a short drain "frames sent" equals "frames the caller got"
  GET  /bench/stats    per-call counters (frames sent/received, marks, backpressure skips),
                       pacer ticks/late ticks, bad messages, event-loop lag

The same stats are printed as one JSON line on stdout when the process gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_process import (
    bench_config,
    engine_parser,
    ready_until_signal,
    run_engine_process,
    serving,
)
from probes import GcPauses, LoopLag, StallWatchdog

from engine.app import Engine, GreetingOnly
from engine.audio.codec import int16_to_ulaw
from engine.config import Config
from engine.session.call_session import CallSession, Conversation
from engine.telephony.outbound import OutboundPlayer, Pacer

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


class ContinuousPlayback(GreetingOnly):
    """The engine's placeholder conversation (it listens, and nobody uses its supervisor
    and barge-in controls here), but instead of a greeting it talks without pause: chunk
    after chunk, two always queued."""

    def __init__(self, session: CallSession, chunk: bytes, quiesced: asyncio.Event,
                 players: dict[str, OutboundPlayer]) -> None:
        super().__init__(session)
        self.chunk = chunk
        self.quiesced = quiesced
        self.players = players
        self.frames_in = 0
        self.chunks_played = 0

    def on_audio(self, ulaw: bytes) -> None:
        self.frames_in += 1

    async def start(self) -> None:
        voice = self.session.voice
        pending: list[str] = []
        try:
            while not self.quiesced.is_set():
                while len(pending) < 2:
                    pending.append(await voice.play_ulaw(self.chunk, prefix="b"))
                heard = asyncio.ensure_future(voice.wait_mark(pending[0]))
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
        player = self.players.get(self.session.call_sid)
        if player is not None:
            player.drop_queued()


class TimedPacer(Pacer):
    """The engine's Pacer, noting when each media frame went to the socket: jitter as the
    engine produced it, free of the callers' own scheduling delays. It keeps every call's
    player (the last one, after a reconnect) for the counters and the quiesce."""

    def __init__(self, lead_s: float) -> None:
        super().__init__(lead_s)
        self.send_times: dict[str, list[float]] = {}
        self.players: dict[str, OutboundPlayer] = {}

    def create_player(self, call_sid: str, stream_sid: str, ws: web.WebSocketResponse,
                      transport: asyncio.BaseTransport | None) -> OutboundPlayer:
        times = self.send_times.setdefault(call_sid, [])
        send = ws.send_str
        now = time.monotonic

        async def timed_send(text: str) -> None:
            await send(text)
            if text.startswith(_MEDIA_PREFIX):
                times.append(now())

        player = OutboundPlayer(call_sid, stream_sid, timed_send, transport, self)
        self.players[call_sid] = player
        return player


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
        self.lag = LoopLag()
        self.gc = GcPauses()
        self._probes: list[asyncio.Task[None]] = []
        self.started = time.monotonic()

    def _conversation(self, session: CallSession) -> Conversation:
        conv = ContinuousPlayback(session, self.chunk, self.quiesced, self.pacer.players)
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
        self._probes.append(self.lag.start())
        if self.watchdog is not None:
            self._probes.append(self.watchdog.start())

    async def quiesce(self, request: web.Request) -> web.Response:
        self.quiesced.set()
        for player in self.pacer.players.values():
            player.drop_queued()
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
            player = self.pacer.players.get(sid)
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


async def serve(args: argparse.Namespace) -> None:
    engine = {"outbound_lead_ms": args.lead_ms} if args.lead_ms is not None else {}
    config = bench_config(args, ACCOUNT_SID, engine)
    bench = BenchEngine(config, speech_like_ulaw(args.chunk_s), args.watch_stalls)
    async with serving(bench.build_app(), args.port):
        if args.gc_freeze:
            # Everything alive after start-up is never garbage: keep it out of collections.
            gc.collect()
            gc.freeze()
        await ready_until_signal(args.port)
        print(json.dumps({"final_stats": bench.stats()}), flush=True)


def main() -> int:
    parser = engine_parser(__doc__.split("\n")[0], "/tmp/switchboard-bench")
    parser.add_argument("--chunk-s", type=float, default=2.0,
                        help="seconds of audio per queued chunk (each followed by a mark)")
    parser.add_argument("--lead-ms", type=int, default=None,
                        help="override engine.outbound_lead_ms (default: the config's)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after start-up (what a production engine could do)")
    return run_engine_process(serve, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
