"""Endpointing that knows a finished sentence: false cut-offs and how soon a turn ends.

    .venv/bin/python bench/bench_endpointing.py [--concurrency 3] [--llm-ms 300] [--json-only]

The offline engine of the shipped config.toml (local Whisper, the FAQ agent, the neural
voice) answers one call per line, in the neural caller voice:

- every caller line of the bundled scenarios (engine/sim/scenarios), said whole;
- lines with a pause inside (0.7 s where " / " is): a number read out, a thought that
  trails off, a list — the pauses that a fixed silence threshold cuts.

Each line is run with semantic endpointing on (the default) and off (every turn ends
after `turns.endpoint_silence_ms` of silence). A false cut-off is a line the engine
heard as more than one caller turn. Also per setting: the silence that ended the turns
(endpointing) and voice-to-voice, p50 / p95, from the engine's own TurnLatency events.

With `--llm-ms`, the agent is the OpenAI stand-in through the SDK (first token after that
many ms, then 50 tokens/s) instead of the FAQ agent, and semantic endpointing runs with
and without the speculative reply (`turns.speculative_reply`): also the turns answered
from a speculation, the LLM requests per answered turn (the extra ones were thrown away
when the caller went on) and the LLM spend per line.
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

from engine.bus.events import TranscriptLine, TurnLatency, UsageCost  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.log import configure_logging  # noqa: E402
from engine.sim.caller import SimulatedCaller  # noqa: E402
from engine.sim.caller_voice import caller_voice  # noqa: E402
from engine.sim.scenario import Scenario, Step, bundled_scenarios_dir  # noqa: E402
from engine.sim.standins.openai_api import OpenAIStandin  # noqa: E402
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
        self.llm: list[UsageCost] = []

    async def read(self, bus: Any) -> None:
        async for _, event in bus.subscribe():
            if isinstance(event, TranscriptLine) and event.speaker == "caller" \
                    and event.final and event.text:
                self.turns.setdefault(event.call_sid, []).append(event.text)
            elif isinstance(event, TurnLatency):
                self.latencies.append(event)
            elif isinstance(event, UsageCost) and event.kind == "llm":
                self.llm.append(event)


async def run_setting(semantic: bool, lines: list[str], concurrency: int, tmp: Path,
                      llm_url: str | None = None, speculate: bool = False
                      ) -> dict[str, Any]:
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    port = free_port()
    raw = load_config(ROOT / "config.toml", env={}).model_dump(mode="json")
    raw["engine"].update(host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}",
                         data_dir=str(tmp / f"data-{semantic}-{speculate}"))
    raw["twilio"].update(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                         api_base_url=await rest.start())
    raw["turns"]["semantic_endpointing"] = semantic
    raw["turns"]["speculative_reply"] = speculate
    if llm_url is not None:
        raw["providers"]["agent"] = ["openai", "faq"]
        raw["providers"]["openai"].update(api_key="sk-bench", base_url=llm_url)
    raw["console_api"]["port"] = 0
    config = Config.model_validate(raw)
    engine = await build_engine(config, history=False, supervisor_api=False)
    events = EngineEvents()
    speech: dict[tuple[str, str], bytes] = {}
    gate = asyncio.Semaphore(concurrency)
    heard: list[tuple[str, list[str]]] = []
    calls: dict[str, str] = {}  # call sid -> the line said

    async def one(line: str) -> None:
        async with gate:
            caller = SimulatedCaller(f"http://127.0.0.1:{port}", AUTH_TOKEN, ACCOUNT_SID,
                                     speech=caller_voice(config), rest=rest,
                                     speech_cache=speech)
            await caller.run(Scenario(name="line", steps=[Step(say=line)]))
            await asyncio.sleep(0.3)
            heard.append((line, events.turns.get(caller.call_sid, [])))
            calls[caller.call_sid] = line

    try:
        async with serving(engine.build_app(), port):
            reader = asyncio.create_task(events.read(engine.hub.bus))
            await asyncio.gather(*(one(line) for line in lines))
            reader.cancel()
    finally:
        await rest.stop()
    return {"semantic_endpointing": semantic, "speculative_reply": speculate,
            **_outcome(lines, heard, calls, events)}


def _outcome(lines: list[str], heard: list[tuple[str, list[str]]], calls: dict[str, str],
             events: EngineEvents) -> dict[str, Any]:
    """One setting's figures: cut-offs, endpointing, voice-to-voice, the agent's requests."""
    cut = [(line, turns) for line, turns in heard if len(turns) > 1]
    paused = {line for line in lines if " / " in line}
    answered = len(events.latencies)
    return {
        "lines": len(heard),
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
        # Each line's last turn: voice-to-voice, and whether it was answered from a
        # speculation (compared line by line between the settings).
        "last_turns": {calls[t.call_sid]: [t.voice_to_voice_s, t.speculated]
                       for t in events.latencies if t.call_sid in calls},
        "speculated_turns": sum(1 for t in events.latencies if t.speculated),
        "answered_turns": answered,
        "llm_requests": len(events.llm),
        "llm_usd_per_line": round(sum(u.cost_usd for u in events.llm) / max(len(heard), 1),
                                  6),
    }


def speculation_gain(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """The lines answered from a speculation: their voice-to-voice without and with it."""
    lines = [line for line, (_, speculated) in on["last_turns"].items()
             if speculated and line in off["last_turns"]]
    return {"lines": lines,
            "without_ms": [round(off["last_turns"][line][0] * 1000) for line in lines],
            "with_ms": [round(on["last_turns"][line][0] * 1000) for line in lines],
            "thrown_away": on["llm_requests"] - on["answered_turns"]}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'setting':<22} {'lines':>5} {'cut (paused/whole)':>19} {'unheard':>8} "
          f"{'endpointing p50/p95':>20} {'voice-to-voice p50/p95':>23}")
    for row in result["settings"]:
        name = "semantic" if row["semantic_endpointing"] else "fixed silence"
        if row["speculative_reply"]:
            name += " + speculative"
        cut = (f"{row['false_cutoffs']} ({row['false_cutoffs_in_paused_lines']}/"
               f"{row['false_cutoffs_in_whole_lines']})")
        ep, v2v = row["endpointing_ms"], row["voice_to_voice_ms"]
        print(f"{name:<22} {row['lines']:>5} {cut:>19} {row['unheard_lines']:>8} "
              f"{ep['p50']!s:>9} / {ep['p95']!s:<8} {v2v['p50']!s:>10} / {v2v['p95']!s:<10}")
        for example in row["cut_examples"]:
            print(f"    cut: {example['said']!r} -> {example['heard']}")
        if row["llm_requests"]:
            print(f"    {row['speculated_turns']} of {row['answered_turns']} turns answered "
                  f"from a speculation; {row['llm_requests']} LLM requests; LLM "
                  f"${row['llm_usd_per_line']:.6f} a line")
    gain = result.get("speculation_gain")
    if gain:
        print(f"speculation thrown away (billed): {gain['thrown_away']}; lines answered "
              "from one, voice-to-voice without -> with (ms):")
        for line, off, on in zip(gain["lines"], gain["without_ms"], gain["with_ms"],
                                 strict=True):
            print(f"    {off:>5} -> {on:>5}  {line!r}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("error", "json")
    lines = caller_lines() + PAUSED_LINES
    llm = None
    if args.llm_ms is not None:
        llm = OpenAIStandin(api_key="sk-bench")
        llm.latency_s = args.llm_ms / 1000
        llm.token_interval_s = 0.02
        llm.reply = "Sure, I can help with that. Our team will take care of it today."
    with tempfile.TemporaryDirectory(prefix="bench-endpointing-") as tmp:
        if llm is None:
            settings = [await run_setting(semantic, lines, args.concurrency, Path(tmp))
                        for semantic in (True, False)]
        else:
            url = await llm.start()
            try:
                settings = [await run_setting(True, lines, args.concurrency, Path(tmp),
                                              url, speculate)
                            for speculate in (False, True)]
            finally:
                await llm.stop()
    result = {"bench": "endpointing", "paused_lines": len(PAUSED_LINES),
              "scenario_lines": len(lines) - len(PAUSED_LINES), "llm_ms": args.llm_ms,
              "settings": settings}
    if llm is not None:
        result["speculation_gain"] = speculation_gain(*settings)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=3, help="calls at a time")
    parser.add_argument("--llm-ms", type=float, default=None,
                        help="the agent is the OpenAI stand-in, first token after this; "
                             "compares the speculative reply off and on")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    return report(asyncio.run(run(args)), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
