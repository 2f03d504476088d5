"""The turns bench's figures for one level: percentiles of every stage the engine timed
(from its TurnLatency events), what lies beyond the stand-ins' nominal latency, how often
speech started before the LLM finished, and what the callers measured; which loop stall
came before each underrun; and the table it prints. What each figure means is in
bench/README.md."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

STAGES = ("endpointing_s", "stt_s", "llm_first_token_s", "tts_first_audio_s",
          "engine_overhead_s", "voice_to_voice_s")
_TOKEN_RE = re.compile(r"\s*\S+")  # how the OpenAI stand-in cuts a reply into tokens


def pcts_ms(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    arr = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(arr, 50)), 1),
            "p95": round(float(np.percentile(arr, 95)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1), "n": len(arr)}


def lag_summary(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {}
    arr = np.asarray(samples_ms)
    return {"p50": round(float(np.percentile(arr, 50)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2), "max": round(float(arr.max()), 2)}


def first_sentence_tokens(reply: str) -> int:
    """Streamed tokens (as the LLM stand-in cuts them) before the engine has a sentence."""
    from engine.providers.sentences import SentenceAggregator

    aggregator = SentenceAggregator()
    tokens = _TOKEN_RE.findall(reply)
    for i, token in enumerate(tokens, 1):
        if aggregator.push(token):
            return i
    return len(tokens)


def summarize_level(calls: int, turns: list[dict[str, Any]], outs: list[dict[str, Any]],
                    cpu_s: float, wall_s: float, nominal_s: float,
                    extra: dict[str, Any]) -> dict[str, Any]:
    stages = {name.removesuffix("_s"): pcts_ms([t[name] for t in turns
                                                if t.get(name) is not None])
              for name in STAGES}
    # LLM time from the first token to the first whole sentence: what the engine
    # subtracted beyond the reported stages.
    stages["llm_to_first_sentence"] = pcts_ms([
        t["voice_to_voice_s"] - sum(t[n] or 0.0 for n in STAGES[:5]) for t in turns
        if t.get("engine_overhead_s") is not None and t.get("llm_first_token_s") is not None])
    # Everything but endpointing and the stand-ins' configured latency: the engine's work
    # plus its event-loop delays inside the stages (which the stage timers count).
    stages["beyond_nominal"] = pcts_ms([t["voice_to_voice_s"] - (t["endpointing_s"] or 0.0)
                                        - nominal_s for t in turns])
    leads = [t["audio_lead_over_llm_s"] for t in turns
             if t.get("audio_lead_over_llm_s") is not None]
    results = [c for o in outs for c in o["calls"]]
    reply = [ln["reply_latency_s"] for c in results for ln in c["lines"]
             if ln["reply_latency_s"] is not None]
    unanswered = sum(1 for c in results for ln in c["lines"] if ln["reply_latency_s"] is None)
    failed = [c for c in results if c["error"] or c["ended_by"] != "caller"]
    lag = [x for o in outs for x in o["loop_lag_ms"]]
    n_turns = len(turns)
    return {
        "calls": calls, "turns": n_turns, "lines_said": sum(len(c["lines"]) for c in results),
        "lines_unanswered": unanswered, "calls_failed": len(failed),
        "underruns": sum(c.get("underruns", 0) for c in results),
        "calls_with_underruns": sum(1 for c in results if c.get("underruns", 0)),
        "failures": sorted({f"{c['ended_by']}: {c['error']}" for c in failed})[:5],
        "stages_ms": stages,
        "audio_before_llm_end": {
            "share": round(sum(1 for x in leads if x > 0) / len(leads), 4) if leads else None,
            "lead_ms": pcts_ms(leads)},
        "caller_reply_latency_ms": pcts_ms(reply),
        "caller_speech_s": outs[0]["speech_s"] if outs else None,
        "engine_cpu_pct_of_core": round(cpu_s / wall_s * 100, 1) if wall_s else None,
        "engine_cpu_ms_per_turn": round(cpu_s * 1000 / n_turns, 2) if n_turns else None,
        "engine_cpu_ms_per_call_s": round(cpu_s * 1000 / (calls * wall_s), 3)
        if wall_s else None,
        "wall_s": round(wall_s, 1),
        "caller_loop_lag_ms": lag_summary(lag),
        **extra,
    }


def underrun_causes(outs: list[dict[str, Any]], engine_stalls: list[float],
                    t0: float) -> dict[str, Any]:
    """Each underrun by the loop stall (over 20 ms) that ended shortly before its audio
    came again: the engine's, the caller process's own (then it is the bench's, not the
    engine's), both, or none seen (a stall the 50 ms lag probe missed, or another cause);
    and when they came (s since the first call, to 0.1 s: count)."""
    causes: dict[str, Any] = {"engine": 0, "caller": 0, "both": 0, "none_seen": 0}
    when: dict[float, int] = {}
    for out in outs:
        own = out.get("stall_times", [])
        for call in out["calls"]:
            for at in call.get("underrun_at", []):
                engine = any(at - 0.5 <= s <= at + 0.05 for s in engine_stalls)
                caller = any(at - 0.5 <= s <= at + 0.05 for s in own)
                key = ("both" if caller else "engine") if engine else \
                    ("caller" if caller else "none_seen")
                causes[key] += 1
                second = round(at - t0, 1)
                when[second] = when.get(second, 0) + 1
    causes["at_s"] = sorted(when.items())[:30]
    return causes


def relative_stalls(extra: dict[str, Any], t0: float) -> None:
    """Loop stalls and GC pauses as seconds since the first call (one clock for all
    processes): whether they came with the ramp or in the steady state."""
    lag, gc = extra["engine_loop_lag_ms"], extra["engine_gc"]
    lag["stalls"] = [(round(at - t0, 2), *rest) for at, *rest in lag.get("stalls", [])]
    gc["longest"] = [(gen, round(at - t0, 2), *rest) for gen, at, *rest in gc.get("longest", [])]


# -- the table ------------------------------------------------------------------------------


def fmt(p: dict[str, Any]) -> str:
    if not p.get("n"):
        return "-"
    return f"{p['p50']:>7} {p['p95']:>7} {p['p99']:>7}"


def print_table(r: dict[str, Any]) -> None:
    p = r["providers"]
    print(f"stand-ins: STT {p['stt_ms']} ms, LLM first token {p['llm_first_token_ms']} ms then "
          f"every {p['llm_token_interval_ms']} ms ({p['reply_words']} words, "
          f"{p['reply_sentences']} sentences), TTS first audio {p['tts_first_audio_ms']} ms")
    for lv in r["levels"]:
        print()
        print(f"== {lv['calls']} concurrent call(s): {lv['turns']} turns "
              f"({lv['turns_per_call']} per call, {lv['lines_unanswered']} unanswered, "
              f"{lv['calls_failed']} calls failed, {lv['underruns']} underruns in "
              f"{lv['calls_with_underruns']} calls), loadavg {lv['loadavg_start']} -> "
              f"{lv['loadavg_end']}")
        print(f"{'stage (ms)':<34} {'p50':>7} {'p95':>7} {'p99':>7}")
        labels = {"endpointing": "endpointing (trailing silence)", "stt": "STT",
                  "llm_first_token": "LLM first token",
                  "tts_first_audio": "TTS first audio",
                  "llm_to_first_sentence": "LLM first token -> first sentence",
                  "engine_overhead": "engine overhead",
                  "voice_to_voice": "voice-to-voice (engine)",
                  "beyond_nominal": "v2v - endpointing - nominal"}
        for key, label in labels.items():
            print(f"{label:<34} {fmt(lv['stages_ms'][key])}")
        print(f"{'reply latency (at caller)':<34} {fmt(lv['caller_reply_latency_ms'])}")
        lead = lv["audio_before_llm_end"]
        print(f"{'first audio before LLM last token':<34} share {lead['share']}, "
              f"lead p50 {lead['lead_ms']['p50']} ms")
        print(f"{'engine CPU':<34} {lv['engine_cpu_pct_of_core']} % of a core "
              f"({lv['engine_event_loop']} loop), "
              f"{lv['engine_cpu_ms_per_turn']} ms per turn, "
              f"{lv['engine_cpu_ms_per_call_s']} ms per call-second")
        ll = lv["engine_loop_lag_ms"]
        print(f"{'engine loop lag p50/p99/max':<34} {ll.get('p50_ms')} / {ll.get('p99_ms')} / "
              f"{ll.get('max_ms')} ms")
        sl, cl = lv["standin_loop_lag_ms"], lv["caller_loop_lag_ms"]
        print(f"{'stand-in / caller loop lag p99/max':<34} {sl.get('p99')} / {sl.get('max')} ms, "
              f"{cl.get('p99')} / {cl.get('max')} ms")
        print(f"{'stand-in / caller CPU % of a core':<34} {lv['standin_cpu_pct_of_core']} / "
              f"{' + '.join(map(str, lv['caller_cpu_pct_of_core']))}")
        print(f"{'underruns after a stall of':<34} {lv['underruns_after_stall']}")
        pacer = lv["engine_pacer"]
        print(f"{'engine pacer ticks / late':<34} {pacer.get('ticks')} / "
              f"{pacer.get('late_ticks')}")
        gc = lv["engine_gc"]
        print(f"{'engine GC gen2 pauses':<34} {gc.get('gen2', {})}")
        print(f"{'engine GC gen0 / gen1 max ms':<34} {gc.get('gen0', {}).get('max_ms')} / "
              f"{gc.get('gen1', {}).get('max_ms')}")
        if lv["failures"]:
            print("failures:", "; ".join(lv["failures"]))
