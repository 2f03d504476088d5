"""Dollars per call-minute, per provider profile: the bundled scenarios through the real
engine, the cloud SDK clients against the stand-ins.

Run: .venv/bin/python bench/bench_cost.py [--profiles default,openai-voice,local-voice]
                                          [--scenarios NAME,...] [--rounds 1] [--quick]
                                          [--json-only]

For each profile an engine is built by `engine.wiring.build_engine` from the shipped
config.toml (its FAQ, turns, policy, prices and cache), with the profile's chains:

- default: OpenAI speech-to-text (gpt-transcribe) and agent (gpt-5.4-mini), ElevenLabs
  voice (eleven_flash_v2_5), the cloud defaults;
- openai-voice: the same with OpenAI's voice (gpt-4o-mini-tts) instead;
- local-voice: cloud speech-to-text and agent, the voice on our own CPU (Piper where it
  is installed, else espeak);
- and, from the default profile's calls, what the OpenAI Realtime API would have cost.

The OpenAI and ElevenLabs SDKs talk to the stand-ins (engine/sim/standins), which answer
with the vendors' wire formats and report usage as the vendors do. The speech-to-text
stand-in hears what the caller has said of its current line since the last upload (by
the clock: a line split by a pause is heard in two parts); the chat stand-in answers a
line with the FAQ answer the scenario expects (the unknown answer out of scope). The
profiles run at once, each its scenarios one call at a time, simulated callers speaking
real audio, every call in the engine's history; the figures are `switchboard report`'s
(engine/record/report.py) over that history. The caches start empty: `--rounds 2` shows
warmed ones.

Token counts are the stand-in's own, not OpenAI's tokenizer: a prompt is 3 tokens plus 4
and a quarter of its characters per message (close to English text's ~4 characters per
token), a reply one token per word (OpenAI's tokenizer gives ~1.3 per word, so output
tokens are undercounted by about a quarter), cached input is emulated in 128-token
steps from 1,024 tokens. Characters (the voices) and audio seconds (transcription,
rounded up per request as the stand-in bills them) are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/ helpers, beside this script
from engine_process import serving  # noqa: E402
from load_run import free_port, report  # noqa: E402

from engine.config import Config, load_config  # noqa: E402
from engine.log import configure_logging  # noqa: E402
from engine.providers.builtin.piper_voice import missing_requirement  # noqa: E402
from engine.providers.builtin.tts_piper import piper_settings  # noqa: E402
from engine.record.report import Report, build_report  # noqa: E402
from engine.sim.caller import SimulatedCaller  # noqa: E402
from engine.sim.caller_voice import caller_voice, speak, voice_key  # noqa: E402
from engine.sim.scenario import OUT_OF_SCOPE, Scenario, bundled_scenarios_dir  # noqa: E402
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin  # noqa: E402
from engine.sim.standins.openai_api import OpenAIStandin  # noqa: E402
from engine.sim.standins.twilio_api import TwilioApiStandIn  # noqa: E402
from engine.wiring import build_engine  # noqa: E402

ACCOUNT_SID = "AC" + "e7" * 16
AUTH_TOKEN = "bench-cost-auth-token-5c1d9e0a7b"
OPENAI_KEY = "sk-bench-cost"
ELEVENLABS_KEY = "xi-bench-cost"
QUEUE = "+15550100999"  # where handoffs (and a reached cost cap) transfer to
TARGETS = {"default": {"ai": 0.01, "all_in": 0.025}, "local-voice": {"all_in": 0.016}}
QUICK_SCENARIO = "opening-hours"


def local_voice(config: Config) -> list[str]:
    return ["piper"] if missing_requirement(piper_settings(config).voice) is None \
        else ["espeak"]


PROFILES: dict[str, Callable[[Config], list[str]]] = {
    "default": lambda config: ["elevenlabs"],
    "openai-voice": lambda config: ["openai"],
    "local-voice": local_voice,
}


# -- what the stand-ins hear and say -------------------------------------------------------


class ScriptedCall:
    """The current call's script. The transcription stand-in hears the words of the
    caller's current line spoken since its last upload (all of them once the line has
    been said), so an utterance split in two is heard in two parts; the chat stand-in
    answers a line, or its last part, with the FAQ answer its scenario expects."""

    def __init__(self, config: Config, lengths: dict[str, float]) -> None:
        self.lengths = lengths
        self.answers = {e.id: e.answer for e in config.faq.entries}
        self.unknown = config.faq.unknown_answer
        self.expected: dict[str, str | None] = {}
        self.caller: SimulatedCaller | None = None
        self.heard_words: dict[int, int] = {}  # line index -> words already transcribed

    def start(self, scenario: Scenario, caller: SimulatedCaller) -> None:
        self.expected = {s.say: s.expect for s in scenario.steps if s.say is not None}
        self.caller, self.heard_words = caller, {}

    def heard(self, seconds: float) -> str:
        lines = self.caller.result.lines if self.caller is not None else []
        if not lines:
            return ""
        index, line = len(lines) - 1, lines[-1]
        words = line.text.split()
        said = 1.0 if line.ended_at else \
            (time.monotonic() - line.started_at) / self.lengths[line.text]
        upto = min(len(words), round(len(words) * said))
        done = self.heard_words.get(index, 0)
        self.heard_words[index] = max(done, upto)
        return " ".join(words[done:upto])

    def reply(self, user_text: str) -> str:
        expect = next((e for line, e in self.expected.items()
                       if user_text and line.endswith(user_text)), "")
        if expect == OUT_OF_SCOPE:
            return self.unknown
        return self.answers.get(expect or "", "Sure, I can help with that. What else?")


# -- one profile ---------------------------------------------------------------------------


@dataclass
class Profile:
    name: str
    voice: list[str]
    scenarios: list[Scenario]
    rounds: int
    tmp: Path


def profile_config(profile: Profile, port: int, rest_url: str, openai_url: str,
                   elevenlabs_url: str) -> Config:
    """The shipped config.toml with this profile's chains, on loopback."""
    raw = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    raw["engine"].update(host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}",
                         data_dir=str(profile.tmp / profile.name))
    raw["twilio"].update(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, api_base_url=rest_url)
    raw["transfer"]["number"] = QUEUE
    providers = raw["providers"]
    providers.update(stt=["openai"], agent=["openai"], tts=profile.voice)
    providers["openai"].update(api_key=OPENAI_KEY, base_url=openai_url)
    providers["elevenlabs"].update(api_key=ELEVENLABS_KEY, base_url=elevenlabs_url)
    return Config.model_validate(raw)


async def run_profile(profile: Profile, speech: dict[tuple[str, str], bytes],
                      lengths: dict[str, float]) -> dict[str, Any]:
    openai, eleven = OpenAIStandin(api_key=OPENAI_KEY), ElevenLabsStandin(api_key=ELEVENLABS_KEY)
    rest = TwilioApiStandIn(ACCOUNT_SID, AUTH_TOKEN)
    port = free_port()
    config = profile_config(profile, port, await rest.start(), await openai.start(),
                            await eleven.start())
    script = ScriptedCall(config, lengths)
    openai.transcript, openai.reply = script.heard, script.reply
    # About what the vendors take: the length of a call is part of its cost per minute.
    openai.latency_s, openai.token_interval_s, eleven.latency_s = 0.2, 0.025, 0.1
    errors: list[str] = []
    try:
        engine = await build_engine(config, supervisor_api=False)
        async with serving(engine.build_app(), port):
            for _ in range(profile.rounds):
                for scenario in profile.scenarios:
                    caller = SimulatedCaller(f"http://127.0.0.1:{port}", AUTH_TOKEN,
                                             ACCOUNT_SID, speech=caller_voice(config),
                                             rest=rest, speech_cache=speech)
                    script.start(scenario, caller)
                    result = await caller.run(scenario)
                    if result.error:
                        errors.append(f"{profile.name}/{scenario.name}: {result.error}")
            deps = engine.deps
            for chain in (deps.stt, deps.agent, deps.tts):
                await chain.settle_abandoned(20.0)
            await engine.hub.drain()
    finally:
        for server in (openai, eleven, rest):
            await server.stop()
    history = config.data_path() / "history.sqlite3"
    return figures(profile, build_report(history, timedelta(days=1), prices=config.prices),
                   errors)


def figures(profile: Profile, r: Report, errors: list[str]) -> dict[str, Any]:
    minutes = r.cost_by_item
    twilio = sum(minutes[item].per_minute_usd or 0.0 for item in ("phone", "media_stream"))
    return {
        "profile": profile.name, "voice": profile.voice[0], "calls": r.calls,
        "call_minutes": round(r.total_minutes, 2), "turns": r.turns,
        "ai_per_minute_usd": r.ai_cost_per_minute_usd,
        "all_in_per_minute_usd": r.cost_per_minute_usd,
        "per_minute_by_item_usd": {item: split.per_minute_usd for item, split in minutes.items()},
        "twilio_per_minute_usd": twilio,
        "turns_from_cache": r.cache_hit_rate,
        "answer_cache": [r.answer_cache_hits, r.agent_requests],
        "audio_cache": [r.audio_cache_hits, r.voice_requests],
        "estimated_usd": r.estimated_usd, "unpriced_lines": r.unpriced_lines,
        "realtime_per_minute_usd": r.realtime_per_minute_usd,
        "errors": errors,
    }


def realtime_row(default: dict[str, Any]) -> dict[str, Any]:
    """The default profile's calls as the Realtime API would bill them (Twilio's minutes
    are paid either way)."""
    ai = default["realtime_per_minute_usd"]
    return {"profile": "realtime", "voice": "Realtime API (estimate)",
            "calls": default["calls"], "call_minutes": default["call_minutes"],
            "ai_per_minute_usd": ai,
            "all_in_per_minute_usd": None if ai is None else ai + default["twilio_per_minute_usd"]}


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of a profile that ran: its figure, and whether it is met."""
    out = []
    for name, limits in TARGETS.items():
        for figure, limit in limits.items():
            if name in rows:
                value = rows[name][f"{figure}_per_minute_usd"]
                out.append({"profile": name, "figure": figure, "limit_usd": limit,
                            "value_usd": value, "met": value is not None and value <= limit})
    return out


# -- the run -------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("error", "json")
    shipped = load_config(ROOT / "config.toml", env={})
    scenarios = [Scenario.from_file(path)
                 for path in sorted(bundled_scenarios_dir().glob("*.toml"))
                 if not args.scenarios or path.stem in args.scenarios]
    # Every line recorded once, before the calls: the callers share the recordings.
    voice = caller_voice(shipped)
    speech: dict[tuple[str, str], bytes] = {}
    lengths: dict[str, float] = {}
    for line in {s.say for sc in scenarios for s in sc.steps if s.say is not None}:
        audio = speech[(voice_key(voice), line)] = await speak(voice, line)
        lengths[line] = len(audio) / 8000
    tmp = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    try:
        profiles = [Profile(name, PROFILES[name](shipped), scenarios, args.rounds, tmp)
                    for name in args.profiles]
        results = await asyncio.gather(*(run_profile(p, speech, lengths) for p in profiles))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = {row["profile"]: row for row in results}
    if "default" in rows:
        rows["realtime"] = realtime_row(rows["default"])
    return {"bench": "cost", "scenarios": [s.name for s in scenarios], "rounds": args.rounds,
            "caller_voice": voice_key(voice), "profiles": list(rows.values()),
            "targets": verdicts(rows), "tmp_dir": str(tmp) if args.keep else None}


def usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def share(pair: list[int] | None) -> str:
    return "-" if not pair else f"{pair[0]}/{pair[1]}"


def print_table(result: dict[str, Any]) -> None:
    print(f"scenarios: {', '.join(result['scenarios'])} x {result['rounds']} round(s); "
          f"caller voice {result['caller_voice']}")
    head = (f"{'profile':<14}{'voice':<24}{'calls':>6}{'minutes':>9}{'AI $/min':>10}"
            f"{'all-in $/min':>14}{'answer cache':>14}{'audio cache':>13}{'turns cached':>14}")
    print(head)
    for row in result["profiles"]:
        cached = row.get("turns_from_cache")
        print(f"{row['profile']:<14}{row['voice']:<24}{row['calls']:>6}"
              f"{row['call_minutes']:>9.2f}{usd(row['ai_per_minute_usd']):>10}"
              f"{usd(row['all_in_per_minute_usd']):>14}{share(row.get('answer_cache')):>14}"
              f"{share(row.get('audio_cache')):>13}"
              f"{'-' if cached is None else f'{cached:.0%}':>14}")
    for row in result["profiles"]:
        split = row.get("per_minute_by_item_usd")
        if split:
            print(f"{row['profile']} per call-minute: "
                  + ", ".join(f"{item} {usd(v)}" for item, v in split.items()))
        for error in row.get("errors", []):
            print(f"  call failed: {error}")
    for t in result["targets"]:
        print(f"target {t['profile']} {t['figure']} <= ${t['limit_usd']}: "
              f"{usd(t['value_usd'])} {'met' if t['met'] else 'NOT met'}")
    print("Token counts are the stand-ins' (about 4 characters a token in, a word a token "
          "out), not OpenAI's tokenizer: see this script's docstring.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default=",".join(PROFILES),
                        help=f"comma separated, of: {', '.join(PROFILES)}")
    parser.add_argument("--scenarios", default="",
                        help="comma separated scenario names (default: every bundled one)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each profile calls through the scenarios")
    parser.add_argument("--quick", action="store_true",
                        help=f"the default profile and the {QUICK_SCENARIO} scenario, once")
    parser.add_argument("--keep", action="store_true", help="keep the histories (temp dir)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if args.quick:
        args.profiles, args.scenarios, args.rounds = ["default"], [QUICK_SCENARIO], 1
    unknown = set(args.profiles) - set(PROFILES)
    if unknown or args.rounds < 1:
        parser.error(f"unknown profile(s) {sorted(unknown)}" if unknown
                     else "--rounds must be at least 1")
    return report(asyncio.run(run_bench(args)), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
