"""Piper, the neural offline voice: speed, first audio, CPU per second of speech, how many
calls one core can voice, and how well Whisper understands the voices over the phone.

    .venv/bin/python bench/bench_voice.py [--threads 1 2] [--levels 10 15 20 25 30]
                                          [--workers 1] [--seconds 30]
                                          [--skip-recognition] [--json]

1. Sentences: every sentence the FAQ agent and the call policies speak (config.toml),
   synthesized one at a time through `PiperTTS` as the engine does (mu-law 8 kHz out),
   for each `--threads` (onnxruntime threads per sentence): load time and memory, first
   audio, real-time factor (synthesis time / audio time), CPU seconds per second of
   speech.
2. Recognition: the bundled scenarios' caller lines in the neural caller voice, the
   agent's neural voice and espeak's caller voice, through 8 kHz mu-law and back,
   transcribed by Whisper tiny.en (as the engine hears a caller): word error rate.
3. One core: the whole process pinned to one CPU, `--levels` concurrent calls whose agent
   speaks half the time (a reply, sentence by sentence, then silence as long as the reply
   while the caller talks), on `--workers` workers of one thread. Per level: first audio of the
   replies (p50 / p95 / max), gaps (a sentence whose audio came after the previous one had
   finished playing, plus the 80 ms the engine keeps queued at Twilio), and the core's
   use. A level is voiced when no reply had a gap and p95 first audio stayed under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes import cpu_seconds, loadavg, rss_mb  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.log import configure_logging  # noqa: E402
from engine.providers.base import AudioChunk, TextToSpeech  # noqa: E402
from engine.providers.builtin.agent_faq import split_sentences  # noqa: E402
from engine.providers.builtin.tts_espeak import EspeakTTS  # noqa: E402
from engine.providers.builtin.tts_piper import (  # noqa: E402
    PiperSettings,
    PiperTTS,
    build_caller_voice,
)
from engine.sim.caller_voice import speak  # noqa: E402
from engine.sim.scenario import bundled_scenarios_dir  # noqa: E402
from engine.sim.scoring import WordErrors, word_errors  # noqa: E402

LEAD_S = 0.08  # audio the engine keeps queued at Twilio ahead of playback
FIRST_AUDIO_LIMIT_S = 1.0
PID = os.getpid()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def agent_replies() -> list[list[str]]:
    """What the offline agent says, reply by reply, cut into the sentences it speaks."""
    config = load_config(ROOT / "config.toml", env={})
    texts = [config.engine.greeting, *(e.answer for e in config.faq.entries),
             config.faq.unknown_answer, config.policy.not_understood]
    return [split_sentences(text) for text in texts]


def caller_lines() -> list[str]:
    from engine.sim.scenario import Scenario

    return [step.say for path in sorted(bundled_scenarios_dir().glob("*.toml"))
            for step in Scenario.from_file(path).steps if step.say is not None]


# -- 1. sentences ---------------------------------------------------------------------------


async def sentence_figures(threads: int, sentences: list[str]) -> dict[str, Any]:
    tts = PiperTTS(threads=threads, workers=1)
    rss_before, started = rss_mb(PID), time.perf_counter()
    await tts.warm_up()
    load_s, rss_added = time.perf_counter() - started, rss_mb(PID) - rss_before
    for sentence in sentences[:3]:  # onnxruntime sizes its buffers on the first runs
        await speak(tts, sentence)
    first: list[float] = []
    synth_s = audio_s = 0.0
    cpu_before = cpu_seconds(PID)
    for sentence in sentences:
        started = time.perf_counter()
        got = 0
        async for event in tts.synthesize(sentence):
            if isinstance(event, AudioChunk):
                if not got:
                    first.append(time.perf_counter() - started)
                got += len(event.ulaw)
        synth_s += time.perf_counter() - started
        audio_s += got / 8000
    cpu = cpu_seconds(PID) - cpu_before
    await tts.aclose()
    return {"threads": threads, "load_s": load_s, "rss_added_mb": rss_added,
            "sentences": len(sentences), "audio_s": audio_s,
            "first_audio_p50_s": _pct(first, 0.5), "first_audio_p95_s": _pct(first, 0.95),
            "first_audio_max_s": max(first), "real_time_factor": synth_s / audio_s,
            "cpu_s_per_speech_s": cpu / audio_s}


# -- 2. recognition -------------------------------------------------------------------------


async def recognition(lines: list[str]) -> dict[str, Any]:
    from engine.audio.codec import ulaw_to_pcm16
    from engine.providers.builtin.stt_local_whisper import LocalWhisperSTT

    stt = LocalWhisperSTT()
    await stt.warm_up()
    voices: dict[str, TextToSpeech] = {
        "neural caller voice": build_caller_voice(PiperSettings()),
        "neural agent voice": PiperTTS(),
        "espeak caller voice": EspeakTTS(voice="en-us+m3", rate_wpm=165),
    }
    out: dict[str, Any] = {}
    for label, voice in voices.items():
        total = WordErrors(0, 0)
        misheard: list[str] = []
        for line in lines:
            heard = (await stt.transcribe(ulaw_to_pcm16(await speak(voice, line)), 8000)).text
            errors = word_errors(line, heard)
            total += errors
            if errors.errors:
                misheard.append(f"{line!r} -> {heard!r}")
        out[label] = {"wer": total.rate, "words": total.words, "misheard": misheard}
    await stt.aclose()
    return out


# -- 3. one core ----------------------------------------------------------------------------


async def one_core(calls: int, seconds: float, replies: list[list[str]],
                   workers: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tts = PiperTTS(workers=workers, threads=1)
    await tts.warm_up()
    first: list[float] = []
    gaps = 0
    ramp_s = 5.0
    measure_from = loop.time() + ramp_s
    stop_at = measure_from + seconds

    async def reply(sentences: list[str]) -> tuple[float, float]:
        """Speak one reply; (when its audio started, when it ends playing)."""
        nonlocal gaps
        asked = loop.time()
        start = runs_out = 0.0
        for sentence in sentences:
            arrived = 0.0
            got = 0
            async for event in tts.synthesize(sentence):
                if isinstance(event, AudioChunk):
                    arrived = arrived or loop.time()
                    got += len(event.ulaw)
            if not got:
                continue
            if not start:
                start = runs_out = arrived
                if arrived >= measure_from:
                    first.append(arrived - asked)
            elif arrived > runs_out + LEAD_S and arrived >= measure_from:
                gaps += 1  # the previous sentence had finished playing: silence
            runs_out = max(runs_out, arrived) + got / 8000
        return start, runs_out

    async def call(index: int) -> None:
        await asyncio.sleep(ramp_s * index / calls)  # calls start spread over the ramp
        turn = index
        while loop.time() < stop_at:
            start, ends = await reply(replies[turn % len(replies)])
            turn += 1
            await asyncio.sleep(max(0.0, ends - loop.time()))  # the agent speaks …
            await asyncio.sleep(ends - start)  # … then listens as long

    async def core_use() -> float:
        """The core's use over the measured window (after the ramp)."""
        await asyncio.sleep(ramp_s)
        before = cpu_seconds(PID)
        await asyncio.sleep(seconds)
        return (cpu_seconds(PID) - before) / seconds

    busy, *_ = await asyncio.gather(core_use(), *(call(i) for i in range(calls)))
    await tts.aclose()
    return {"calls": calls, "replies": len(first), "first_audio_p50_s": _pct(first, 0.5),
            "first_audio_p95_s": _pct(first, 0.95), "first_audio_max_s": max(first),
            "gaps": gaps, "core_busy": busy,
            "voiced": gaps == 0 and _pct(first, 0.95) <= FIRST_AUDIO_LIMIT_S}


# -- main -----------------------------------------------------------------------------------


def _print_sentences(rows: list[dict[str, Any]]) -> None:
    print("\nSentences (every line the offline agent speaks)")
    print(f"{'threads':>7} {'load':>7} {'memory':>8} {'first audio p50/p95/max':>26} "
          f"{'RTF':>6} {'CPU s per speech s':>19}")
    for r in rows:
        print(f"{r['threads']:>7} {r['load_s']:>6.2f}s {r['rss_added_mb']:>6.0f}MB "
              f"{r['first_audio_p50_s'] * 1000:>9.0f} /{r['first_audio_p95_s'] * 1000:>5.0f} /"
              f"{r['first_audio_max_s'] * 1000:>5.0f} ms {r['real_time_factor']:>6.3f} "
              f"{r['cpu_s_per_speech_s']:>19.3f}")
    print(f"  {rows[0]['sentences']} sentences, {rows[0]['audio_s']:.0f} s of speech")


def _print_recognition(figures: dict[str, Any]) -> None:
    print("\nRecognition by Whisper tiny.en after 8 kHz mu-law (bundled scenario lines)")
    for label, f in figures.items():
        print(f"  {label:<20} WER {f['wer']:6.1%} over {f['words']} words")
        for miss in f["misheard"]:
            print(f"      {miss}")


def _print_levels(levels: list[dict[str, Any]], cpu_per_speech_s: float,
                  workers: int) -> None:
    print(f"\nOne core, agent speaking half the time ({workers} worker(s), 1 thread each)")
    print(f"{'calls':>5} {'replies':>7} {'first audio p50/p95/max':>26} {'gaps':>5} "
          f"{'core busy':>9}  voiced")
    for r in levels:
        print(f"{r['calls']:>5} {r['replies']:>7} {r['first_audio_p50_s'] * 1000:>9.0f} /"
              f"{r['first_audio_p95_s'] * 1000:>5.0f} /{r['first_audio_max_s'] * 1000:>5.0f} ms "
              f"{r['gaps']:>5} {r['core_busy']:>9.0%}  {'yes' if r['voiced'] else 'no'}")
    voiced = [r["calls"] for r in levels if r["voiced"]]
    print(f"  voiced up to {max(voiced) if voiced else 0} calls per core; from CPU alone: "
          f"{1 / (cpu_per_speech_s * 0.5):.0f} (1 / (CPU s per speech s x 0.5))")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    replies = agent_replies()
    sentences = [s for reply in replies for s in reply]
    out: dict[str, Any] = {"load_average_before": loadavg()}
    out["sentences"] = [await sentence_figures(t, sentences) for t in args.threads]
    if not args.skip_recognition:
        out["recognition"] = await recognition(caller_lines())
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # every thread, from now on
    out["one_core"] = [await one_core(n, args.seconds, replies, args.workers)
                       for n in args.levels]
    out["load_average_after"] = loadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="onnxruntime threads per sentence to measure (default 1 2)")
    parser.add_argument("--levels", type=int, nargs="+", default=[10, 15, 20, 25, 30],
                        help="concurrent calls on one core (default 10 15 20 25 30)")
    parser.add_argument("--workers", type=int, default=1,
                        help="synthesis workers sharing the one core (default 1)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="measured seconds per level, after a 5 s ramp (default 30)")
    parser.add_argument("--skip-recognition", action="store_true",
                        help="skip the Whisper part (it loads tiny.en)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    configure_logging("error", "json")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"load average {out['load_average_before']} before, {out['load_average_after']} "
          "after")
    _print_sentences(out["sentences"])
    if "recognition" in out:
        _print_recognition(out["recognition"])
    _print_levels(out["one_core"], out["sentences"][0]["cpu_s_per_speech_s"], args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
