"""What a call produces besides audio: one record per turn, with its stage timings.

The session fills these in; the operations side (history, metrics, events) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Stage = Literal["stt", "llm_first_token", "tts_first_audio", "engine_overhead",
                "voice_to_voice", "endpointing"]
STAGES: tuple[Stage, ...] = ("stt", "llm_first_token", "tts_first_audio", "engine_overhead",
                             "voice_to_voice", "endpointing")


@dataclass(slots=True)
class TurnTimings:
    """Seconds spent in each stage of one turn; None when the stage did not run
    (e.g. no LLM for a cached answer)."""

    stt: float | None = None
    llm_first_token: float | None = None
    tts_first_audio: float | None = None
    engine_overhead: float | None = None
    voice_to_voice: float | None = None  # caller stops speaking -> first agent audio out
    endpointing: float | None = None  # caller stops speaking -> turn declared over
    # Not histogram stages: the LLM's first token to its first whole sentence (speech
    # waits for it), and seconds from the first agent audio out to the agent's last
    # token (positive: speech started before the LLM finished).
    audio_lead_over_llm: float | None = None
    llm_first_sentence: float | None = None

    def items(self) -> list[tuple[Stage, float]]:
        values: tuple[float | None, ...] = (
            self.stt, self.llm_first_token, self.tts_first_audio, self.engine_overhead,
            self.voice_to_voice, self.endpointing)
        return [(stage, v) for stage, v in zip(STAGES, values, strict=True) if v is not None]


@dataclass(slots=True)
class TurnRecord:
    """One completed turn as it is stored."""

    idx: int
    caller_text: str = ""
    agent_text: str = ""
    heard_text: str = ""  # what the caller actually heard (cut at a barge-in)
    interrupted: bool = False
    cached: bool = False  # answered from the response cache
    caller_audio_s: float = 0.0  # caller speech length (for the Realtime comparison)
    agent_audio_s: float = 0.0  # agent speech played
    timings: TurnTimings = field(default_factory=TurnTimings)
    # The knowledge passages the agent was given for this turn (their ids), when the
    # knowledge base is retrieved per turn rather than sent whole in the prompt.
    knowledge_ids: tuple[str, ...] = ()
    # The tool calls the agent made while answering (also reported one by one as they end).
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    # The answer was started at a pause, before the turn ended (session/speculation.py).
    speculated: bool = False


ToolOutcome = Literal["ok", "error", "timeout", "rejected", "discarded"]


@dataclass(slots=True)
class ToolCallRecord:
    """One tool the agent called: what it asked, what came back, how long it took.

    `outcome`: ok; error (the endpoint failed or answered garbage); timeout; rejected
    (the model's arguments failed the tool's schema: no request was made); discarded
    (the caller barged in: the result was thrown away, its cost stays booked)."""

    turn: int
    call_id: str  # the model's id for this call (tool_calls[].id)
    name: str
    arguments: dict[str, Any]  # as the model gave them; redacted where they are published
    outcome: ToolOutcome
    summary: str = ""  # a short line for people: "order 4471: shipped"
    latency_s: float = 0.0
    round: int = 1  # which LLM round of the turn asked for it


@dataclass(slots=True)
class StreamStats:
    """What one call's media stream brought in (counted on the frame path)."""

    frames_in: int = 0
    bytes_in: int = 0
    marks_in: int = 0
    dtmf_in: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)
