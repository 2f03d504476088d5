"""What a simulated call records: each line the caller said (with the delay to the answer),
and the call's result — what it heard, frames and marks both ways, how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.audio.wav import write_ulaw_wav


@dataclass
class SaidLine:
    text: str
    started_at: float
    ended_at: float
    barge_in: bool
    first_reply_at: float | None = None  # first agent frame that arrived after the line

    @property
    def reply_latency_s(self) -> float | None:
        if self.first_reply_at is None:
            return None
        return self.first_reply_at - self.ended_at


@dataclass
class CallResult:
    call_sid: str
    stream_sid: str
    twiml: str = ""
    stream_url: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    frames_sent: int = 0
    frames_received: int = 0
    # Gaps inside the agent's speech: playout ran dry and audio came again within
    # UNDERRUN_WINDOW_S (an audible break, as a phone would play it).
    underruns: int = 0
    bad_frames_received: list[str] = field(default_factory=list)
    marks_received: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    clears_received: int = 0
    heard: bytearray = field(default_factory=bytearray)  # playout timeline, 8 kHz mu-law
    agent_audio: bytearray = field(default_factory=bytearray)  # frames received, in order
    arrivals: list[float] = field(default_factory=list)  # monotonic arrival per frame
    lines: list[SaidLine] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)  # TwiML the engine sent by REST
    twilio_says: list[str] = field(default_factory=list)  # <Say> texts Twilio spoke
    streams: int = 0  # media streams opened (more than one after a <Say> fallback)
    completed_by_rest: bool = False
    ended_by: str = ""  # caller | engine | redirect | rest-completed | error
    close_code: int | None = None
    error: str | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    def write_heard_wav(self, path: str) -> None:
        write_ulaw_wav(path, bytes(self.heard))

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)
