"""The operations-plane event schema, shared by the engine and the console.

This module is the console's only view of the engine's internals, so it imports nothing
but the standard library and pydantic. Keep it that way.

Wire format: one JSON object per event, `type` selects the model, `schema_version` says
which revision of this schema wrote it. Compatibility rules:
- Adding an optional field (with a default) keeps SCHEMA_VERSION: readers ignore fields
  they do not know (`extra="ignore"`).
- Renaming/removing a field or changing its meaning bumps SCHEMA_VERSION; older readers
  then reject those events with EventDecodeError instead of misreading them.
- Adding an event type or an alert kind keeps SCHEMA_VERSION: an older reader rejects
  just those events with EventDecodeError, and readers skip what they cannot decode.

Stamping: the publisher, not the bus, stamps `engine_id`, `seq` and `ts` through one
`EventStamper` per engine process (`stamper.stamp(CallStarted(...))`). `seq` increases by
exactly one per published event of that engine, so a reader that sees it jump knows events
were lost (a publish that failed, or a stream trimmed under a slow reader); `engine_id`
tells the engines sharing one Redis stream apart (make it unique per process start, see
`new_engine_id`, so a restarted engine's seq restarting at 1 is not mistaken for a jump).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1


class CallState(StrEnum):
    """The states of one call: the session's state machine (moves in
    `engine/session/states.py`) and the values of the events' state fields."""

    CONNECTED = "connected"  # webhook answered, media stream not started yet
    AI = "ai"  # the agent listens and answers
    HUMAN_TAKEOVER = "human_takeover"  # a supervisor speaks; the agent is silent
    TRANSFERRING = "transferring"  # being handed to a human number
    ENDED = "ended"


Speaker = Literal["caller", "agent", "supervisor", "system"]
UsageKind = Literal["stt", "llm", "tts", "telephony"]
ProviderKindName = Literal["stt", "llm", "tts"]
AlertKind = Literal["call_cost_cap", "call_cost_warning", "daily_budget", "monthly_budget",
                    "latency_p95", "low_confidence", "handoff_requested", "provider_failover",
                    "provider_down", "variant_paused"]
# The daily and monthly budget (engine/money/budget.py): ok, warning from a share of a
# limit, then what `budget.on_exhausted` says once a limit is reached.
BudgetState = Literal["ok", "warning", "degraded", "forwarding", "refusing"]
Severity = Literal["info", "warning", "critical"]
# Values allowed in free-form maps (alert data, command arguments): JSON scalars only,
# so every consumer can render them without knowing the producer.
JsonScalar = str | int | float | bool | None


class EventDecodeError(ValueError):
    """Bytes that are not a valid event of this schema version (never a crash)."""

    def __init__(self, message: str, *, event_type: str | None = None,
                 schema_version: int | None = None) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.schema_version = schema_version


class EventBase(BaseModel):
    # Frozen: the in-memory bus hands the same object to every subscriber.
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    call_sid: str = ""  # "" for engine-wide events
    engine_id: str = ""  # publisher; "" when not stamped
    seq: int = 0  # per engine_id, +1 per event; 0 = not stamped
    ts: float = 0.0  # unix seconds, stamped by the publisher


class CallStarted(EventBase):
    type: Literal["call_started"] = "call_started"
    from_number: str = ""
    to_number: str = ""
    stream_sid: str = ""
    direction: Literal["inbound", "outbound"] = "inbound"
    cost_cap_usd: float | None = None  # the call's cost cap (None: not reported)


class CallUpdated(EventBase):
    """Only the fields that changed are set; None means unchanged."""

    type: Literal["call_updated"] = "call_updated"
    twilio_status: str | None = None  # Twilio's CallStatus from a status callback
    duration_s: float | None = None
    turns: int | None = None
    stt_provider: str | None = None  # the provider currently serving in each chain
    agent_provider: str | None = None
    tts_provider: str | None = None
    variant: str | None = None  # "experiment/variant" the call was assigned (A/B tests)
    extra: dict[str, JsonScalar] = Field(default_factory=dict)


class CallEnded(EventBase):
    type: Literal["call_ended"] = "call_ended"
    # e.g. caller_hangup, agent_goodbye, supervisor_hangup, transferred, max_duration,
    # call_cost_cap, stream_error. Free text so new reasons need no schema change.
    reason: str = ""
    duration_s: float = 0.0
    cost_usd: float = 0.0


class StateChanged(EventBase):
    type: Literal["state_changed"] = "state_changed"
    old: CallState
    new: CallState
    reason: str = ""


class TranscriptLine(EventBase):
    """One line of the conversation. A partial line (final=False) is replaced by the
    later event with the same line_id."""

    type: Literal["transcript_line"] = "transcript_line"
    speaker: Speaker
    text: str
    line_id: str
    final: bool = True
    # An agent line cut by barge-in: `text` is what was planned, `heard_text` what the
    # caller actually heard before playback stopped.
    interrupted: bool = False
    heard_text: str = ""
    low_confidence: bool = False


class TurnLatency(EventBase):
    """Where one turn's voice-to-voice time went. None: the stage did not run (an FAQ
    answer has no LLM, a cached answer no TTS)."""

    type: Literal["turn_latency"] = "turn_latency"
    turn: int
    endpointing_s: float | None = None
    stt_s: float | None = None
    llm_first_token_s: float | None = None
    tts_first_audio_s: float | None = None
    engine_overhead_s: float | None = None
    voice_to_voice_s: float
    # > 0 when the first audio left before the agent's last token (streaming works).
    audio_lead_over_llm_s: float | None = None
    llm_first_sentence_s: float | None = None  # first token -> first whole sentence
    # The agent was started at a pause before the turn ended (turns.speculative_reply).
    speculated: bool = False


class UsageCost(EventBase):
    """One priced provider call (or a telephony minute charge) from the ledger."""

    type: Literal["usage_cost"] = "usage_cost"
    provider: str
    kind: UsageKind
    model: str = ""
    audio_seconds: float = 0.0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    characters: int = 0
    call_seconds: float = 0.0  # telephony
    estimated: bool = False  # the provider did not report usage; we estimated it
    # No price in the catalog (engine.allow_unpriced_models): cost_usd counts it as $0.
    unpriced: bool = False
    # Served from the response cache (replayed audio, a cached answer): free, and says so.
    cached: bool = False
    cost_usd: float
    call_cost_usd: float  # running total for this call, this item included
    realtime_equivalent_usd: float = 0.0  # what the Realtime API would have cost so far
    # Engine-wide spend after this item (for live meters without a separate event).
    day_cost_usd: float | None = None
    month_projection_usd: float | None = None


class Alert(EventBase):
    type: Literal["alert"] = "alert"
    kind: AlertKind
    severity: Severity
    message: str
    data: dict[str, JsonScalar] = Field(default_factory=dict)


class BudgetStateChanged(EventBase):
    """The daily/monthly budget moved to another state (engine-wide: `call_sid` is "").

    `limit` is the limit that decides the new state (back to "ok": the one that lifted),
    with its period ("2026-11-24" or "2026-11") and figures; `totals` says whose spend
    they count: this engine's ("local"), the fleet's through Redis ("shared"), or a
    conservative estimate while Redis is unreachable ("offline").

    Schema: every field has a default, so the event could be added without a
    SCHEMA_VERSION bump (older readers skip it as an unknown type). A new state is a
    change of meaning: it bumps SCHEMA_VERSION.
    """

    type: Literal["budget_state_changed"] = "budget_state_changed"
    old: BudgetState = "ok"
    new: BudgetState = "ok"
    limit: Literal["daily", "monthly"] = "daily"
    period: str = ""
    spent_usd: float = 0.0
    limit_usd: float = 0.0
    totals: Literal["local", "shared", "offline"] = "local"


class ProviderHealthChanged(EventBase):
    type: Literal["provider_health_changed"] = "provider_health_changed"
    provider: str
    kind: ProviderKindName
    healthy: bool
    detail: str = ""


class CommandAudit(EventBase):
    """A supervisor command and its outcome (every command is audited, failed ones too)."""

    type: Literal["command_audit"] = "command_audit"
    actor: str
    command: str
    args: dict[str, JsonScalar] = Field(default_factory=dict)
    ok: bool
    error: str = ""


ToolOutcome = Literal["ok", "error", "timeout", "rejected", "discarded"]


class ToolCalled(EventBase):
    """A tool the agent called is over: what it asked, what came back, how long it took.

    `arguments` are as the model gave them, with the configured names redacted ("***")
    and nested values as compact JSON text. `outcome`: ok; error (the endpoint failed or
    answered garbage); timeout; rejected (arguments failed the tool's schema, no request
    was made); discarded (the caller barged in; the result was thrown away). `round` is
    the LLM round of the turn that asked for it.
    """

    type: Literal["tool_called"] = "tool_called"
    turn: int = 0
    call_id: str = ""
    name: str
    arguments: dict[str, JsonScalar] = Field(default_factory=dict)
    outcome: ToolOutcome = "ok"
    summary: str = ""
    latency_s: float = 0.0
    round: int = 1


class BusGap(EventBase):
    """Synthesized by a bus subscription, never published by the engine: events were
    lost between `missed_after` and `missed_until` (bus cursors, exclusive; "" unknown).

    A consumer that keeps state (the console) should refetch a snapshot. `count` is exact
    when known, None when the bus can only tell that events may be missing. `engine_id`
    names the engine whose events are missing ("" = any).
    """

    type: Literal["bus_gap"] = "bus_gap"
    missed_after: str
    missed_until: str = ""
    count: int | None = None
    reason: Literal["overrun", "trimmed", "stream_reset", "seq_jump"] = "overrun"


Event = Annotated[
    Union[  # noqa: UP007 - a discriminated union needs the Union[...] form under Annotated
        CallStarted, CallUpdated, CallEnded, StateChanged, TranscriptLine, TurnLatency,
        UsageCost, Alert, BudgetStateChanged, ProviderHealthChanged, CommandAudit, BusGap,
        ToolCalled,
    ],
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[EventBase]] = {
    cls.model_fields["type"].default: cls
    for cls in (CallStarted, CallUpdated, CallEnded, StateChanged, TranscriptLine,
                TurnLatency, UsageCost, Alert, BudgetStateChanged, ProviderHealthChanged,
                CommandAudit, BusGap, ToolCalled)
}

# Built once: building a TypeAdapter compiles the validator and costs milliseconds.
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode_event(event: EventBase) -> bytes:
    """The event as compact JSON bytes."""
    return event.__pydantic_serializer__.to_json(event)


def decode_event(data: bytes | bytearray | str) -> Event:
    """Parse one encoded event. Raises EventDecodeError for anything that is not a valid
    event of a schema version this code understands."""
    try:
        event = _EVENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise _explain(data, exc) from None
    if event.schema_version > SCHEMA_VERSION:
        raise EventDecodeError(
            f"event schema version {event.schema_version} is newer than the supported "
            f"{SCHEMA_VERSION}; upgrade this reader",
            event_type=event.type, schema_version=event.schema_version)
    return event


def _explain(data: bytes | bytearray | str, exc: ValidationError) -> EventDecodeError:
    # Slow path only: work out a message a human can act on.
    try:
        raw: Any = json.loads(data)
    except (ValueError, TypeError):
        return EventDecodeError(f"not JSON: {_preview(data)}")
    if not isinstance(raw, dict):
        return EventDecodeError(f"an event must be a JSON object, got {type(raw).__name__}")
    event_type = raw.get("type")
    version = raw.get("schema_version")
    version_int = version if isinstance(version, int) else None
    if version_int is not None and version_int > SCHEMA_VERSION:
        return EventDecodeError(
            f"event schema version {version_int} is newer than the supported "
            f"{SCHEMA_VERSION}; upgrade this reader",
            event_type=str(event_type), schema_version=version_int)
    if not isinstance(event_type, str):
        return EventDecodeError("event has no 'type'", schema_version=version_int)
    if event_type not in EVENT_TYPES:
        return EventDecodeError(f"unknown event type {event_type!r}",
                                event_type=event_type, schema_version=version_int)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'][1:]) or '<event>'}: {err['msg']}"
        for err in exc.errors()[:5])
    return EventDecodeError(f"invalid {event_type} event: {problems}",
                            event_type=event_type, schema_version=version_int)


def _preview(data: bytes | bytearray | str, limit: int = 80) -> str:
    text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


E = TypeVar("E", bound=EventBase)


def new_engine_id() -> str:
    """Unique per process start: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class EventStamper:
    """Stamps engine_id, seq (+1 per event) and ts on the events one engine publishes.

    Use one per engine process and stamp every event right before publishing it, so
    seq has no holes unless events are really lost.
    """

    def __init__(self, engine_id: str = "", clock: Callable[[], float] = time.time) -> None:
        self.engine_id = engine_id
        self._clock = clock
        # itertools.count: next() is atomic under the GIL, so threads may stamp too.
        self._counter = itertools.count(1)
        self._last = 0

    @property
    def last_seq(self) -> int:
        return self._last

    def stamp(self, event: E) -> E:
        seq = next(self._counter)
        self._last = seq
        return event.model_copy(
            update={"engine_id": self.engine_id, "seq": seq, "ts": self._clock()})
