"""The turns bench's figures for one level: percentiles of every stage the engine timed
(from its TurnLatency events), what lies beyond the stand-ins' nominal latency, how often
speech started before the LLM finished, and what the callers measured. What each figure
means is in bench/README.md."""

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
    from engine.session.sentences import SentenceAggregator

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
