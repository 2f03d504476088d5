"""Which project files one caller turn passes through: the question in, the answer out.

    python bench/trace_frame_path.py

Runs a real engine in-process (local speech models, the FAQ agent, espeak) and one
simulated call that asks one question. From the moment the caller starts the question
until the answer has been heard, a profiler hook records every function entered in
`engine/` (the simulator excluded) and prints:
- every project file entered (helpers, reporting and providers included);
- the files on the call stacks where the frame's data changes hands (the endpointer
  gets the caller's audio, speech-to-text the utterance, the agent and the voice their
  text, the outbound queue and the socket the audio): the path a reader follows.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from engine.config import Config, load_config  # noqa: E402
from engine.sim.caller import SimulatedCaller  # noqa: E402
from engine.sim.scenario import Scenario  # noqa: E402
from engine.sim.standins.twilio_api import TwilioApiStandIn  # noqa: E402

ENGINE = ROOT / "engine"
SIM = ENGINE / "sim"
ACCOUNT = "AC" + "b2" * 16
TOKEN = "trace-token-0123456789abcdef"

entered: dict[str, int] = {}
spine: set[str] = set()
recording = False
# Where the frame's data changes hands: the caller's audio reaches the endpointer, the
# utterance speech-to-text, the text the agent and the voice, the audio the outbound queue
# and the socket. The project files on the call stack at those points are the frame's path.
SPINE_POINTS = {"feed", "transcribe", "respond", "synthesize", "enqueue_audio", "media"}


def _profile(frame: Any, event: str, arg: Any) -> None:
    if not recording or event != "call":
        return
    name = frame.f_code.co_filename
    if name.startswith(str(ENGINE)) and not name.startswith(str(SIM)):
        entered[name] = entered.get(name, 0) + 1
        if frame.f_code.co_name in SPINE_POINTS:
            f = frame
            while f is not None:
                fn = f.f_code.co_filename
                if fn.startswith(str(ENGINE)) and not fn.startswith(str(SIM)):
                    spine.add(fn)
                f = f.f_back


def _config(tmp: Path, port: int, rest_url: str) -> Config:
    shipped = load_config(ROOT / "config.toml")
    raw: dict[str, Any] = {
        "engine": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data"),
                   "public_url": f"http://127.0.0.1:{port}"},
        "twilio": {"account_sid": ACCOUNT, "auth_token": TOKEN, "api_base_url": rest_url},
        "faq": shipped.faq.model_dump(), "turns": shipped.turns.model_dump(),
        "console_api": {"port": 0}, "logging": {"format": "json", "level": "error"},
    }
    return Config.model_validate(raw)


async def main() -> None:
    global recording
    from engine.log import configure_logging
    from engine.wiring import build_engine

    configure_logging("error", "json")
    rest = TwilioApiStandIn(ACCOUNT, TOKEN)
    rest_url = await rest.start()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp), port, rest_url)
        engine = await build_engine(config, history=True, supervisor_api=False)
        runner = web.AppRunner(engine.build_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        caller = SimulatedCaller(f"http://127.0.0.1:{port}", TOKEN, ACCOUNT, rest=rest)
        original_say = caller.say
        original_wait = caller.wait_agent_done

        async def say(text: str, barge_in: bool = False) -> Any:
            global recording
            recording = True
            return await original_say(text, barge_in)

        async def wait_agent_done(*args: Any, **kwargs: Any) -> bool:
            global recording
            result = await original_wait(*args, **kwargs)
            if caller.result.lines:
                recording = False
            return result

        caller.say = say  # type: ignore[method-assign]
        caller.wait_agent_done = wait_agent_done  # type: ignore[method-assign]
        sys.setprofile(_profile)
        threading.setprofile(_profile)
        result = await caller.run(Scenario.from_lines(["What are your opening hours?"]))
        sys.setprofile(None)
        threading.setprofile(None)
        await runner.cleanup()
        await rest.stop()
    print(f"call: {len(result.lines)} line(s), heard {result.frames_received} frames, "
          f"error={result.error}")
    files = sorted(str(Path(f).relative_to(ROOT)) for f in entered)
    print(f"{len(files)} project files entered during one caller turn:")
    for f in files:
        print(f"  {f}  ({entered[str(ROOT / f)]} calls)")
    path = sorted(str(Path(f).relative_to(ROOT)) for f in spine)
    print(f"{len(path)} files on the frame's path (call stacks where the data changes hands):")
    for f in path:
        print(f"  {f}")


if __name__ == "__main__":
    asyncio.run(main())
