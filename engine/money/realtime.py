"""What the OpenAI Realtime API would have cost for the same conversation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from engine.config import PricesConfig
from engine.money.prices import MILLION, SIXTY, ZERO, dec


@dataclass(slots=True)
class RealtimeEstimator:
    """Prices a conversation as the OpenAI Realtime API bills it, turn by turn.

    Caller audio is `realtime_caller_tokens_per_minute` audio tokens in, agent speech
    `realtime_agent_tokens_per_minute` audio tokens out. On every turn the conversation
    so far is sent again and billed at the cached audio-input rate; the turn's new caller
    audio at the full input rate; the reply at the output rate. The system prompt (text
    tokens) is left out, so the estimate understates Realtime and never overstates the
    saving.
    """

    prices: PricesConfig
    context_tokens: Decimal = ZERO
    total: Decimal = ZERO
    turns: int = 0

    def add_turn(self, caller_audio_s: float, agent_audio_s: float) -> Decimal:
        p = self.prices
        caller = dec(max(caller_audio_s, 0.0)) / SIXTY * dec(p.realtime_caller_tokens_per_minute)
        agent = dec(max(agent_audio_s, 0.0)) / SIXTY * dec(p.realtime_agent_tokens_per_minute)
        cost = (self.context_tokens * dec(p.realtime_audio_cached_in)
                + caller * dec(p.realtime_audio_in)
                + agent * dec(p.realtime_audio_out)) / MILLION
        self.context_tokens += caller + agent
        self.total += cost
        self.turns += 1
        return cost


def realtime_conversation_cost(turns: Iterable[tuple[float, float]],
                               prices: PricesConfig) -> float:
    """Realtime API cost of one conversation given (caller_audio_s, agent_audio_s) turns."""
    estimator = RealtimeEstimator(prices)
    for caller_s, agent_s in turns:
        estimator.add_turn(caller_s, agent_s)
    return float(estimator.total)
