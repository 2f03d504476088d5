"""Endpointing that knows a finished sentence: false cut-offs and how soon a turn ends.

    .venv/bin/python bench/bench_endpointing.py [--concurrency 3] [--json-only]

The offline engine of the shipped config.toml (local Whisper, the FAQ agent, the neural
voice) answers one call per line, in the neural caller voice:

- every caller line of the bundled scenarios (engine/sim/scenarios), said whole;
- lines with a pause inside (0.7 s where " / " is): a number read out, a thought that
  trails off, a list — the pauses that a fixed silence threshold cuts.

Each line is run with semantic endpointing on (the default) and off (every turn ends
after `turns.endpoint_silence_ms` of silence). A false cut-off is a line the engine
heard as more than one caller turn. Also per setting: the silence that ended the turns
(endpointing) and voice-to-voice, p50 / p95, from the engine's own TurnLatency events.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_process import serving  # noqa: E402
from load_run import free_port, report  # noqa: E402

from engine.bus.events import TranscriptLine, TurnLatency  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.log import configure_logging  # noqa: E402
from engine.sim.caller import SimulatedCaller  # noqa: E402
from engine.sim.caller_voice import caller_voice  # noqa: E402
from engine.sim.scenario import Scenario, Step, bundled_scenarios_dir  # noqa: E402
from engine.sim.standins.twilio_api import TwilioApiStandIn  # noqa: E402
from engine.wiring import build_engine  # noqa: E402

ACCOUNT_SID = "AC" + "b3" * 16
AUTH_TOKEN = "bench-endpointing-token-2f6a9c"
# Pauses inside a sentence, where a caller is not done.
PAUSED_LINES = [
    "My phone number is four one five / five five five zero one zero zero.",
    "My order number is seven seven / three one two.",
    "I would like to ask about / the premium plan.",
    "I was wondering if / you are open on Sunday.",
    "Can you tell me / where your store is?",
    "I need to return a phone and / get my money back.",
    "The basic plan, the premium plan, and / the family plan.",
    "Um / how much is the basic plan?",
    "I think that / I want to cancel my subscription.",
    "It is for my account / under the name Smith.",
]


def caller_lines() -> list[str]:
    return [step.say for path in sorted(bundled_scenarios_dir().glob("*.toml"))
            for step in Scenario.from_file(path).steps if step.say is not None]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)


class EngineEvents:
    """The engine's caller turns and latencies, per call."""

    def __init__(self) -> None:
        self.turns: dict[str, list[str]] = {}
        self.latencies: list[TurnLatency] = []

    async def read(self, bus: Any) -> None:
        async for _, event in bus.subscribe():
            if isinstance(event, TranscriptLine) and event.speaker == "caller" \
                    and event.final and event.text:
                self.turns.setdefault(event.call_sid, []).append(event.text)
            elif isinstance(event, TurnLatency):
                self.latencies.append(event)


async def run_setting(semantic: bool, lines: list[str], concurrency: int,
                      tmp: Path) -> dict[str, Any]:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    port = free_port()
    raw = load_config(ROOT / "config.toml", env={}).model_dump(mode="json")
    raw["engine"].update(host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}",
                         data_dir=str(tmp / f"data-{semantic}"))
    raw["twilio"].update(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                         api_base_url=await rest.start())
    raw["turns"]["semantic_endpointing"] = semantic
    raw["console_api"]["port"] = 0
    config = Config.model_validate(raw)
    engine = await build_engine(config, history=False, supervisor_api=False)
    events = EngineEvents()
    speech: dict[tuple[str, str], bytes] = {}
    gate = asyncio.Semaphore(concurrency)
    heard: list[tuple[str, list[str]]] = []

    async def one(line: str) -> None:
        async with gate:
            caller = SimulatedCaller(f"http://127.0.0.1:{port}", AUTH_TOKEN, ACCOUNT_SID,
                                     speech=caller_voice(config), rest=rest,
                                     speech_cache=speech)
            await caller.run(Scenario(name="line", steps=[Step(say=line)]))
            await asyncio.sleep(0.3)
            heard.append((line, events.turns.get(caller.call_sid, [])))

    try:
        async with serving(engine.build_app(), port):
            reader = asyncio.create_task(events.read(engine.hub.bus))
            await asyncio.gather(*(one(line) for line in lines))
            reader.cancel()
    finally:
        await rest.stop()
    cut = [(line, turns) for line, turns in heard if len(turns) > 1]
    paused = {line for line in lines if " / " in line}
    return {
        "semantic_endpointing": semantic, "lines": len(heard),
        "false_cutoffs": len(cut),
        "false_cutoffs_in_paused_lines": sum(1 for line, _ in cut if line in paused),
        "false_cutoffs_in_whole_lines": sum(1 for line, _ in cut if line not in paused),
        "unheard_lines": sum(1 for _, turns in heard if not turns),
        "cut_examples": [{"said": line, "heard": turns} for line, turns in cut[:6]],
        "endpointing_ms": {"p50": _pct([t.endpointing_s for t in events.latencies
                                        if t.endpointing_s is not None], 0.5),
                           "p95": _pct([t.endpointing_s for t in events.latencies
                                        if t.endpointing_s is not None], 0.95)},
        "voice_to_voice_ms": {"p50": _pct([t.voice_to_voice_s for t in events.latencies], 0.5),
                              "p95": _pct([t.voice_to_voice_s for t in events.latencies],
                                          0.95)},
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'setting':<22} {'lines':>5} {'cut (paused/whole)':>19} {'unheard':>8} "
          f"{'endpointing p50/p95':>20} {'voice-to-voice p50/p95':>23}")
    for row in result["settings"]:
        name = "semantic" if row["semantic_endpointing"] else "fixed silence"
        cut = (f"{row['false_cutoffs']} ({row['false_cutoffs_in_paused_lines']}/"
               f"{row['false_cutoffs_in_whole_lines']})")
        ep, v2v = row["endpointing_ms"], row["voice_to_voice_ms"]
        print(f"{name:<22} {row['lines']:>5} {cut:>19} {row['unheard_lines']:>8} "
              f"{ep['p50']!s:>9} / {ep['p95']!s:<8} {v2v['p50']!s:>10} / {v2v['p95']!s:<10}")
        for example in row["cut_examples"]:
            print(f"    cut: {example['said']!r} -> {example['heard']}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("error", "json")
    lines = caller_lines() + PAUSED_LINES
    with tempfile.TemporaryDirectory(prefix="bench-endpointing-") as tmp:
        settings = [await run_setting(semantic, lines, args.concurrency, Path(tmp))
                    for semantic in (True, False)]
    return {"bench": "endpointing", "paused_lines": len(PAUSED_LINES),
            "scenario_lines": len(lines) - len(PAUSED_LINES), "settings": settings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=3, help="calls at a time")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    return report(asyncio.run(run(args)), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
