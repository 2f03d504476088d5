"""Wire format of the supervisor API (`/console/ws`), shared by the engine and the console.

Like `events.py`, this module imports only the standard library, pydantic and the event
schema: the console depends on these two modules and nothing else of the engine.

Protocol (JSON text frames):
- The client connects with `Authorization: Bearer <token>`; `?after=<cursor>` resumes
  after the last event id it saw (no snapshot then, unless events were lost: the server
  sends a fresh snapshot when the cursor is gone).
- Server -> client: `Hello`, then `Snapshot` (all live and recently ended calls, spend
  totals; its `cursor` is the id of the last event it includes), then one `EventFrame`
  per event, and a `Reply` for every `Command`. `ErrorFrame` for frames it cannot read.
- Client -> server: `Command` with a client-chosen `id`, echoed in its `Reply`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from engine.bus.events import (
    SCHEMA_VERSION,
    BudgetState,
    CallState,
    Event,
    JsonScalar,
    Speaker,
    ToolOutcome,
)

API_VERSION = 1

CommandName = Literal["take_over", "hand_back", "say", "transfer", "escalate", "hang_up",
                      "pause_variant", "resume_variant"]
ACTING_COMMANDS: frozenset[str] = frozenset(
    {"take_over", "hand_back", "say", "transfer", "escalate", "hang_up",
     "pause_variant", "resume_variant"})


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TranscriptEntry(_Frame):
    line_id: str
    speaker: Speaker
    text: str
    final: bool = True
    interrupted: bool = False
    ts: float = 0.0


class ToolCallEntry(_Frame):
    """A tool the agent called earlier in the call (as its `ToolCalled` event said), so
    a supervisor who joins or takes over sees what was already looked up."""

    call_id: str = ""
    turn: int = 0
    name: str
    arguments: dict[str, JsonScalar] = Field(default_factory=dict)  # redacted
    outcome: ToolOutcome = "ok"
    summary: str = ""
    latency_s: float = 0.0
    ts: float = 0.0


class CallSnapshot(_Frame):
    call_sid: str
    from_number: str = ""
    to_number: str = ""
    state: CallState = CallState.CONNECTED
    started_at: float = 0.0  # unix seconds
    ended_at: float | None = None
    end_reason: str | None = None
    cost_usd: float = 0.0
    cost_cap_usd: float = 0.0
    turns: int = 0
    voice_to_voice_s: list[float] = Field(default_factory=list)  # recent turns, oldest first
    transcript: list[TranscriptEntry] = Field(default_factory=list)  # recent lines
    alerts: list[str] = Field(default_factory=list)  # alert kinds raised on this call
    tool_calls: list[ToolCallEntry] = Field(default_factory=list)  # recent, oldest first
    unpriced: bool = False  # part of cost_usd had no price (engine.allow_unpriced_models)
    engine_id: str = ""  # the engine that owns the call (a fleet: any engine's calls)
    variant: str = ""  # "experiment/variant" of an A/B experiment ("" none)


class SpendTotals(_Frame):
    """Spend today and this month (the fleet's when the budget is shared through Redis)."""

    today_usd: float = 0.0
    daily_budget_usd: float = 0.0
    month_to_date_usd: float = 0.0
    monthly_projection_usd: float = 0.0
    monthly_budget_usd: float = 0.0
    p95_voice_to_voice_s: float | None = None
    # The budget's state and the limit that decides it ("" while ok); whose totals
    # (events.BudgetStateChanged); later changes arrive as BudgetStateChanged events.
    budget_state: BudgetState = "ok"
    budget_limit: str = ""
    budget_totals: str = "local"


class Hello(_Frame):
    type: Literal["hello"] = "hello"
    api_version: int = API_VERSION
    schema_version: int = SCHEMA_VERSION
    engine_id: str = ""
    readonly: bool = False
    transfer_destinations: list[tuple[str, str]] = Field(default_factory=list)  # (name, number)
    default_transfer_number: str = ""
    # True: this engine serves the whole fleet's calls, and commands reach their owner.
    fleet: bool = False


class Snapshot(_Frame):
    type: Literal["snapshot"] = "snapshot"
    cursor: str = ""
    server_time: float = 0.0
    calls: list[CallSnapshot] = Field(default_factory=list)
    totals: SpendTotals = Field(default_factory=SpendTotals)


class EventFrame(_Frame):
    type: Literal["event"] = "event"
    id: str
    event: Event


class Reply(_Frame):
    type: Literal["reply"] = "reply"
    id: str
    ok: bool
    error: str | None = None
    engine_id: str = ""  # the engine that ran it (a fleet: the call's owner); "" unknown


class ErrorFrame(_Frame):
    type: Literal["error"] = "error"
    message: str


class Command(_Frame):
    type: Literal["command"] = "command"
    id: str = Field(min_length=1, max_length=64)
    command: CommandName
    call_sid: str = Field(min_length=1, max_length=64)
    # say: the line; pause_variant / resume_variant: "experiment/variant" (call_sid: a
    # call it was seen on, for the audit trail).
    text: str | None = Field(default=None, max_length=1000)
    number: str | None = Field(default=None, max_length=32)  # transfer


ServerFrame = Annotated[Hello | Snapshot | EventFrame | Reply | ErrorFrame,
                        Field(discriminator="type")]
SERVER_FRAME = TypeAdapter(ServerFrame)
COMMAND = TypeAdapter(Command)
