"""What the demo prints: the conversations as the engine's events tell them, a summary,
and the score of the scripted callers (recognized as scripted? answered right?)."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from engine.bus.events import (
    Alert,
    CallEnded,
    CallStarted,
    CallState,
    Event,
    StateChanged,
    ToolCalled,
    TranscriptLine,
    TurnLatency,
    UsageCost,
)
from engine.sim.call_result import CallResult
from engine.sim.scenario import OUT_OF_SCOPE, Scenario
from engine.sim.scoring import AnswerKey, WordErrors, word_errors

# A line's transcript comes this long after the line at most (endpointing + STT): a line
# with none, said closer than this to the call's end, was cut short, not misheard.
_HEARING_S = 3.0


@dataclass(frozen=True, slots=True)
class Heard:
    """A final transcript line, when the demo received it (monotonic seconds)."""

    at: float
    speaker: str
    text: str


@dataclass
class CallSummary:
    scenario: str
    from_number: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (speaker, text)
    timeline: list[Heard] = field(default_factory=list)
    cost_usd: float = 0.0
    end_reason: str = ""
    duration_s: float = 0.0
    v2v: list[float] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    tools: list[ToolCalled] = field(default_factory=list)
    ai_until: float = math.inf  # when the agent stopped answering (handed off or ended)


@dataclass(frozen=True, slots=True)
class TurnScore:
    """One scripted line: what the engine heard, and which FAQ entry answered it."""

    scenario: str
    scripted: str
    heard: str
    errors: WordErrors
    expect: str | None  # an FAQ entry id, OUT_OF_SCOPE, or None (not scored)
    answered: str | None  # the FAQ entry the reply came from
    cost_cap: bool  # the reply was the cost cap's handoff, not an answer

    @property
    def right(self) -> bool | None:
        if self.expect is None or self.cost_cap:
            return None
        if self.expect == OUT_OF_SCOPE:
            return self.answered is None
        return self.answered == self.expect


class DemoWatcher:
    """Reads the engine's events and keeps what the summary prints."""

    def __init__(self, out: TextIO | None, fillers: Iterable[str] = ()) -> None:
        self.out = out
        # The agent's filler lines while a tool runs ("Let me check that for you."): not
        # the answer to the caller's question, so the scoring reads past them.
        self.fillers = frozenset(fillers)
        self.calls: dict[str, CallSummary] = {}
        self.scenario_of: dict[str, str] = {}
        self.realtime: dict[str, float] = defaultdict(float)
        self.overhead: list[float] = []

    def handle(self, event: Event) -> None:
        sid = event.call_sid
        if isinstance(event, CallStarted):
            self.calls[sid] = CallSummary(self.scenario_of.get(event.from_number, "?"),
                                          event.from_number)
            self._say(sid, "call", f"started from {event.from_number}")
            return
        call = self.calls.get(sid)
        if call is None:
            return
        if isinstance(event, TranscriptLine) and event.final and event.text:
            text = event.heard_text or event.text if event.interrupted else event.text
            suffix = "  [cut off by the caller]" if event.interrupted else ""
            call.lines.append((event.speaker, text))
            # The planned words say which answer it was, even when cut off.
            if event.text not in self.fillers:
                call.timeline.append(Heard(time.monotonic(), event.speaker, event.text))
            self._say(sid, event.speaker, text + suffix)
        elif isinstance(event, TurnLatency):
            call.v2v.append(event.voice_to_voice_s)
            if event.engine_overhead_s is not None:
                self.overhead.append(event.engine_overhead_s)
        elif isinstance(event, UsageCost):
            call.cost_usd = event.call_cost_usd
            self.realtime[sid] = max(self.realtime[sid], event.realtime_equivalent_usd)
        elif isinstance(event, ToolCalled):
            call.tools.append(event)
            self._say(sid, "tool", tool_text(event))
        elif isinstance(event, Alert):
            call.alerts.append(event.kind)
            self._say(sid, "alert", event.message)
        elif isinstance(event, StateChanged):
            call.states.append(event.new)
            if event.new in (CallState.TRANSFERRING, CallState.HUMAN_TAKEOVER):
                call.ai_until = min(call.ai_until, time.monotonic())
        elif isinstance(event, CallEnded):
            call.ai_until = min(call.ai_until, time.monotonic())
            call.end_reason = event.reason
            call.duration_s = event.duration_s
            call.cost_usd = event.cost_usd
            self._say(sid, "call", f"ended ({event.reason}) after {event.duration_s:.0f} s, "
                                   f"${event.cost_usd:.4f}")

    def _say(self, sid: str, who: str, text: str) -> None:
        if self.out is not None:
            tag = self.calls[sid].scenario if sid in self.calls else sid[:10]
            print(f"[{tag:>16}] {who:>10}: {text}", file=self.out, flush=True)

    def summary(self, scores: list[TurnScore] | None = None) -> str:
        calls = [c for c in self.calls.values() if c.end_reason]
        if not calls:
            return "no call completed"
        v2v = sorted(v for c in calls for v in c.v2v)
        cost = sum(c.cost_usd for c in calls)
        minutes = sum(c.duration_s for c in calls) / 60
        escalated = sum(1 for c in calls if "transferring" in c.states)
        realtime = sum(self.realtime.values())
        lines = ["", "Summary", "-------",
                 f"calls completed        {len(calls)}",
                 f"escalated to a human   {escalated} ({escalated / len(calls):.0%})",
                 f"total cost             ${cost:.4f} (${cost / len(calls):.4f} per call, "
                 f"${cost / max(minutes, 1e-9):.4f} per minute)"]
        if v2v:
            p95 = v2v[min(len(v2v) - 1, int(0.95 * len(v2v)))]
            lines.append(f"voice-to-voice         p50 {statistics.median(v2v):.2f} s, "
                         f"p95 {p95:.2f} s over {len(v2v)} turns")
        if self.overhead:
            lines.append(f"engine overhead        p50 "
                         f"{statistics.median(self.overhead) * 1000:.1f} ms")
        tools = [t for c in calls for t in c.tools]
        if tools:
            ok = sum(1 for t in tools if t.outcome == "ok")
            lines.append(f"tool calls             {len(tools)} ({ok} ok), p50 "
                         f"{statistics.median(t.latency_s for t in tools) * 1000:.0f} ms")
        if realtime:
            lines.append(f"OpenAI Realtime would  ${realtime:.4f} for the same speech "
                         "(speech+AI only; the phone line is paid either way)")
        if scores:
            lines += score_lines(scores)
        lines.append("")
        for c in calls:
            lines.append(f"  {c.scenario:<16} {c.duration_s:5.0f} s  ${c.cost_usd:.4f}  "
                         f"{c.end_reason}")
        return "\n".join(lines)

    def score(self, runs: list[tuple[Scenario, CallResult]], key: AnswerKey,
              cost_cap_line: str) -> list[TurnScore]:
        """Every scripted line the agent was still answering, scored."""
        scores: list[TurnScore] = []
        for scenario, result in runs:
            call = self.calls.get(result.call_sid)
            if call is not None:
                scores += _score_call(call, scenario, result, key, cost_cap_line)
        return scores


def tool_text(event: ToolCalled) -> str:
    """`looked up order_status {order_id: 4471} -> shipped (41 ms)`; failed ones say so."""
    args = ", ".join(f"{k}: {v}" for k, v in event.arguments.items())
    done = f"-> {event.summary or 'done'}" if event.outcome == "ok" \
        else f"FAILED ({event.outcome}){': ' + event.summary if event.summary else ''}"
    return f"looked up {event.name} {{{args}}} {done} ({event.latency_s * 1000:.0f} ms)"


def _score_call(call: CallSummary, scenario: Scenario, result: CallResult, key: AnswerKey,
                cost_cap_line: str) -> list[TurnScore]:
    """Caller lines transcribed while line i was the latest said belong to turn i; its
    answer is the next agent line after the last of them."""
    expected = scenario.expected()
    # A line the call ended (or was handed off) during cannot be scored: the engine had
    # no time to hear it out.
    said = [line for line in result.lines if line.started_at < call.ai_until]
    timeline = call.timeline
    caller_at = [i for i, heard in enumerate(timeline) if heard.speaker == "caller"]
    scores: list[TurnScore] = []
    for n, line in enumerate(said):
        end = said[n + 1].started_at if n + 1 < len(said) else math.inf
        mine = [i for i in caller_at if line.started_at <= timeline[i].at < end]
        if not mine and not line.ended_at + _HEARING_S < call.ai_until:
            continue
        heard = " ".join(timeline[i].text for i in mine)
        after = timeline[mine[-1] + 1] if mine and mine[-1] + 1 < len(timeline) else None
        reply = after.text if after is not None and after.speaker != "caller" else ""
        scores.append(TurnScore(call.scenario, line.text, heard, word_errors(line.text, heard),
                                expected.get(line.text), key.entry(reply) if reply else None,
                                reply == cost_cap_line))
    return scores


def score_lines(scores: list[TurnScore]) -> list[str]:
    """Per turn, then overall: word error rate, and answers against the expected entries."""
    lines = ["", "Caller turns (scripted -> recognized; word error rate; answered by)"]
    for s in scores:
        verdict = {True: "right", False: "WRONG", None: ""}[s.right]
        answer = s.answered or ("cost cap handoff" if s.cost_cap else "no FAQ entry")
        expect = f" (expected {s.expect})" if s.expect else ""
        lines.append(f"  [{s.scenario:>16}] {s.scripted!r} -> {s.heard or '(nothing)'!r}; "
                     f"WER {s.errors.rate:.0%}; {answer}{expect} {verdict}".rstrip())
    total = sum((s.errors for s in scores), WordErrors(0, 0))
    exact = sum(1 for s in scores if s.errors.errors == 0)
    in_scope = [s for s in scores if s.right is not None and s.expect != OUT_OF_SCOPE]
    out_scope = [s for s in scores if s.right is not None and s.expect == OUT_OF_SCOPE]
    right = sum(1 for s in in_scope if s.right)
    wrongly = sum(1 for s in out_scope if not s.right)
    lines += ["",
              f"recognized as scripted {exact} of {len(scores)} caller turns; word error rate "
              f"{total.rate:.1%} over {total.words} words (target <= 10 %)",
              f"in-scope questions     {right} of {len(in_scope)} answered right "
              f"({right / max(len(in_scope), 1):.0%}; target >= 90 %)",
              f"out-of-scope questions {wrongly} of {len(out_scope)} answered with an FAQ "
              "entry (target 0)"]
    capped = sum(1 for s in scores if s.cost_cap)
    if capped:
        lines.append(f"                       {capped} more reached the cost cap "
                     "(handed off, not scored)")
    return lines
