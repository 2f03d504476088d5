"""One engine of the fleet benchmark: the real pipeline on the fleet's backends.

Run by bench/bench_fleet.py (not usually by hand):
  .venv/bin/python bench/fleet_engine.py --port 8765 --auth-token T --name fleet-a \
      --redis-url redis://127.0.0.1:P/0 --key-prefix K --dsn postgresql://…/db \
      --stt-url … --llm-url … --tts-url … --openai-key K1 --elevenlabs-key K2

The engine is built by `engine.wiring.build_engine` as `switchboard serve` builds it, with
`bus.backend = "redis"`, `[fleet] enabled = true` (its default heartbeat and dead-engine
deadline) and `history.backend = "postgres"`; STT, agent and TTS are the cloud providers
pointed at the coordinator's stand-ins (no speech models in this process). With
--console-port the supervisor API serves the fleet's calls there (--console-token), and
its commands reach the owning engine through Redis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_process import (
    bench_config,
    engine_parser,
    ready_until_signal,
    run_engine_process,
    serving,
)

from engine.config import Config
from engine.wiring import build_engine

ACCOUNT_SID = "AC" + "e6" * 16


def fleet_config(args: argparse.Namespace) -> Config:
    sections: dict[str, Any] = {
        "providers": {
            "stt": ["openai_realtime", "openai"], "agent": ["openai"], "tts": ["elevenlabs"],
            "openai": {"api_key": args.openai_key, "base_url": args.llm_url,
                       "stt_base_url": args.stt_url},
            "openai_realtime": {"base_url": args.stt_url},
            "elevenlabs": {"api_key": args.elevenlabs_key, "base_url": args.tts_url},
        },
        # Every turn reaches the providers and the record; no cost-cap handoff.
        "cache": {"backend": "off"},
        "policy": {"call_cost_cap_usd": 0.0},
        "redis": {"url": args.redis_url, "key_prefix": args.key_prefix},
        "bus": {"backend": "redis"},
        "fleet": {"enabled": True},
        "history": {"backend": "postgres", "dsn": args.dsn},
        "console_api": {"port": args.console_port or 0, "token": args.console_token},
    }
    return bench_config(args, ACCOUNT_SID, {"engine_id": args.name}, **sections)


async def serve(args: argparse.Namespace) -> None:
    engine = await build_engine(fleet_config(args), supervisor_api=bool(args.console_port))
    async with serving(engine.build_app(), args.port):
        await ready_until_signal(args.port)


def main() -> int:
    parser = engine_parser(__doc__.split("\n")[0], "/tmp/switchboard-bench-fleet")
    parser.add_argument("--name", required=True, help="engine.engine_id (stable name)")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key-prefix", required=True)
    parser.add_argument("--dsn", required=True, help="the fleet's PostgreSQL database")
    parser.add_argument("--console-port", type=int, default=0,
                        help="serve the supervisor API on this port (0: none)")
    parser.add_argument("--console-token", default="", help="the API's full-access token")
    parser.add_argument("--stt-url", required=True, help="OpenAI-style base URL for STT")
    parser.add_argument("--llm-url", required=True, help="OpenAI-style base URL for chat")
    parser.add_argument("--tts-url", required=True, help="ElevenLabs-style base URL")
    parser.add_argument("--openai-key", required=True)
    parser.add_argument("--elevenlabs-key", required=True)
    return run_engine_process(serve, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
