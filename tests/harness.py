"""Test harness: a real engine on loopback, the Twilio REST stand-in, simulated callers."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.app import Engine
from engine.audio.codec import ulaw_to_int16
from engine.bus.events import Event, TranscriptLine
from engine.config import Config, ProvidersConfig, load_config
from engine.providers.builtin.agent_faq import build as build_faq_agent
from engine.providers.builtin.stt_local_whisper import LocalWhisperSTT
from engine.providers.builtin.tts_espeak import espeak_settings
from engine.providers.registry import NoSettings
from engine.sim.caller import SimulatedCaller
from engine.sim.standins.twilio_api import TwilioApiStandIn
from engine.wiring import Providers, build_engine, build_providers

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "test-auth-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(tmp_path: Path, port: int, rest_url: str = "http://127.0.0.1:9",
                public_url: str | None = None, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "engine": {"host": "127.0.0.1", "port": port,
                   "public_url": public_url or f"http://127.0.0.1:{port}",
                   "data_dir": str(tmp_path / "data")},
        "twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                   "api_base_url": rest_url},
        "transfer": {"number": "+15550100999"},
        # A free port for the supervisor API, so engines in tests never collide.
        "console_api": {"port": 0},
        "logging": {"format": "json"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.model_validate(raw)


@dataclass
class RunningEngine:
    engine: Engine
    url: str
    config: Config
    rest: TwilioApiStandIn

    def caller(self, **kwargs: Any) -> SimulatedCaller:
        kwargs.setdefault("voice", espeak_settings(self.config).caller_voice)
        return SimulatedCaller(self.url, AUTH_TOKEN, ACCOUNT_SID,
                               public_url=self.config.engine.public_url, rest=self.rest,
                               **kwargs)


@asynccontextmanager
async def running_engine(tmp_path: Path,
                         make_engine: Callable[[Config], Engine | Awaitable[Engine]]
                         | None = None,
                         public_url: str | None = None,
                         **sections: dict[str, Any]) -> AsyncIterator[RunningEngine]:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    rest_url = await rest.start()
    port = free_port()
    config = make_config(tmp_path, port, rest_url, public_url, **sections)
    made = make_engine(config) if make_engine else Engine(config)
    engine = await made if inspect.isawaitable(made) else made
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield RunningEngine(engine, f"http://127.0.0.1:{port}", config, rest)
    finally:
        await runner.cleanup()
        await rest.stop()


# -- end-to-end helpers (local speech models) ------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
_PROVIDERS: dict[str, Providers] = {}


def base_sections() -> dict[str, dict[str, Any]]:
    """The shipped config.toml's FAQ, turn and policy settings."""
    shipped = load_config(ROOT / "config.toml")
    return {"faq": shipped.faq.model_dump(), "turns": shipped.turns.model_dump()}


def local_providers(config: Config) -> Providers:
    """The offline providers (Whisper, the FAQ agent, piper and espeak), whatever chains `config`
    names: models load once per test session; each engine gets its own chains around them,
    and a FAQ agent of its own config's entries (cheap to build: no model)."""
    if "local" not in _PROVIDERS:
        offline = config.model_copy(update={"providers": ProvidersConfig()})
        _PROVIDERS["local"] = build_providers(offline)
    shared = _PROVIDERS["local"]
    agents = [build_faq_agent(NoSettings(), config) if agent.name == "faq" else agent
              for agent in shared.agents]
    return Providers(shared.stt, agents, shared.tts)


async def make_local_engine(config: Config, history: bool = False,
                            supervisor_api: bool = False) -> Engine:
    return await build_engine(config, history=history, providers=local_providers(config),
                              supervisor_api=supervisor_api)


async def heard_text(audio: bytes) -> str:
    """Transcribe what the caller heard (8 kHz mu-law) with the local model."""
    stt = _PROVIDERS["local"].stt[0]
    assert isinstance(stt, LocalWhisperSTT)
    pcm = ulaw_to_int16(audio).astype("<i2").tobytes()
    return (await stt.transcribe(pcm, 8000)).text.lower()


class EventLog:
    def __init__(self, run: RunningEngine) -> None:
        self.events: list[Event] = []
        self._task = asyncio.create_task(self._read(run))

    async def _read(self, run: RunningEngine) -> None:
        async for _, event in run.engine.hub.bus.subscribe():
            self.events.append(event)

    def lines(self, call_sid: str, speaker: str) -> list[TranscriptLine]:
        return [e for e in self.events if isinstance(e, TranscriptLine)
                and e.call_sid == call_sid and e.speaker == speaker and e.final]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


