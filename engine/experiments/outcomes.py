"""What each variant's calls did, read from the history (either backend: plans, sql.py).

A call counts once it has ended, in the window it started in. Its figures: its length,
how it ended (end reasons: "caller said goodbye", "caller hung up"), whether it went to
a person (`calls.escalated`: a transfer or escalation that went through), its cost (the
sum of its cost lines) and its misunderstood caller turns (recorded with its variant at
the end: the engine asked again, or the agent could not answer). Its turns: voice-to-
voice seconds, and whether the caller cut the agent off (`turns.interrupted`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.record.sql import Plan, Stmt

GOODBYE_REASONS = frozenset({"caller said goodbye"})
HUNG_UP_REASONS = frozenset({"caller hung up", "caller hung up before transfer"})


@dataclass(slots=True, frozen=True)
class CallOutcome:
    call_sid: str
    duration_s: float
    end_reason: str
    escalated: bool
    cost_usd: float
    misunderstood_turns: int

    @property
    def goodbye(self) -> bool:
        return self.end_reason in GOODBYE_REASONS

    @property
    def hung_up(self) -> bool:
        return self.end_reason in HUNG_UP_REASONS


@dataclass(slots=True)
class VariantOutcomes:
    """Everything the comparison needs of one variant."""

    variant: str
    calls: list[CallOutcome] = field(default_factory=list)
    v2v_s: list[float] = field(default_factory=list)  # every answered turn's
    answered_turns: int = 0  # turns the agent answered (the caller's answered turns)
    agent_turns: int = 0  # turns where the agent spoke
    interrupted_turns: int = 0  # of those, cut off by the caller

    @property
    def misunderstood_turns(self) -> int:
        return sum(c.misunderstood_turns for c in self.calls)

    @property
    def caller_turns(self) -> int:
        """Caller turns: answered ones and those the engine did not understand."""
        return self.answered_turns + self.misunderstood_turns


_CALLS = (
    "SELECT v.variant, c.call_sid, coalesce(c.duration_s, 0), coalesce(c.end_reason, ''), "
    "c.escalated, (SELECT coalesce(sum(l.amount), 0) FROM cost_lines l "
    "WHERE l.call_sid = c.call_sid), v.misunderstood_turns "
    "FROM call_variants v JOIN calls c ON c.call_sid = v.call_sid "
    "WHERE v.experiment = ? AND c.started_at >= ? AND c.started_at <= ? "
    "AND c.ended_at IS NOT NULL ORDER BY c.started_at, c.call_sid")
_TURNS = (
    "SELECT v.variant, t.voice_to_voice_s, t.interrupted, t.agent_text "
    "FROM turns t JOIN call_variants v ON v.call_sid = t.call_sid "
    "JOIN calls c ON c.call_sid = t.call_sid "
    "WHERE v.experiment = ? AND c.started_at >= ? AND c.started_at <= ? "
    "AND c.ended_at IS NOT NULL ORDER BY c.started_at, t.call_sid, t.idx")


def read_outcomes(experiment: str, start_ts: float, end_ts: float
                  ) -> Plan[dict[str, VariantOutcomes]]:
    """Each variant's outcomes (variants without calls are absent)."""
    found: dict[str, VariantOutcomes] = {}

    def of(variant: str) -> VariantOutcomes:
        return found.setdefault(variant, VariantOutcomes(variant))

    rows = yield Stmt(_CALLS, (experiment, start_ts, end_ts), fetch="rows")
    for variant, sid, duration, reason, escalated, cost, misunderstood in rows:
        of(variant).calls.append(CallOutcome(sid, float(duration), str(reason),
                                             bool(escalated), float(cost or 0.0),
                                             int(misunderstood or 0)))
    rows = yield Stmt(_TURNS, (experiment, start_ts, end_ts), fetch="rows")
    for variant, v2v, interrupted, agent_text in rows:
        outcomes = of(variant)
        outcomes.answered_turns += 1
        if v2v is not None:
            outcomes.v2v_s.append(float(v2v))
        if agent_text:
            outcomes.agent_turns += 1
            outcomes.interrupted_turns += int(bool(interrupted))
    return found


def experiments_in_history(start_ts: float, end_ts: float) -> Plan[list[str]]:
    """The experiments calls in the window were assigned to, by name."""
    rows = yield Stmt("SELECT DISTINCT v.experiment FROM call_variants v JOIN calls c "
                      "ON c.call_sid = v.call_sid WHERE c.started_at >= ? "
                      "AND c.started_at <= ? ORDER BY v.experiment", (start_ts, end_ts),
                      fetch="rows")
    return [row[0] for row in rows]
