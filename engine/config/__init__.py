"""Typed configuration: `config.toml` for settings, the environment for secrets.

Every price, model id, timeout and threshold lives here (with the defaults documented in
`config.toml`), never in code. Secrets are read only from the environment. One file per
part: `sections.py` (engine, edge, turns, FAQ, policy, cache, bus, console API, ...),
`providers.py` (chains and provider tables), `money.py` (prices, budget).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import Field

from engine.config.base import ConfigError, Section
from engine.config.experiments import Experiments
from engine.config.fleet import FleetConfig
from engine.config.knowledge import KnowledgeConfig
from engine.config.money import BudgetConfig, PricesConfig
from engine.config.providers import ProvidersConfig
from engine.config.sections import (
    BusConfig,
    CacheConfig,
    ConsoleApiConfig,
    EngineConfig,
    FaqConfig,
    FaqEntry,
    HistoryConfig,
    LoggingConfig,
    MetricsConfig,
    PolicyConfig,
    RedisConfig,
    TransferConfig,
    TransferDestination,
    TurnConfig,
    TwilioConfig,
)
from engine.config.tools import ToolConfig, Tools, ToolUseConfig

__all__ = [
    "BudgetConfig", "BusConfig", "CacheConfig", "Config", "ConfigError", "ConsoleApiConfig",
    "EngineConfig", "FaqConfig", "FaqEntry", "FleetConfig", "HistoryConfig", "KnowledgeConfig",
    "LoggingConfig", "MetricsConfig",
    "PolicyConfig", "PricesConfig", "ProvidersConfig", "RedisConfig", "ToolConfig",
    "ToolUseConfig", "TransferConfig", "TransferDestination", "TurnConfig", "TwilioConfig",
    "load_config",
]


class Config(Section):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    twilio: TwilioConfig = Field(default_factory=TwilioConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    turns: TurnConfig = Field(default_factory=TurnConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    faq: FaqConfig = Field(default_factory=FaqConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    console_api: ConsoleApiConfig = Field(default_factory=ConsoleApiConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    prices: PricesConfig = Field(default_factory=PricesConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tools: Tools = Field(default_factory=list)
    tool_use: ToolUseConfig = Field(default_factory=ToolUseConfig)
    experiments: Experiments = Field(default_factory=list)

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

    def sqlite_history_path(self) -> Path:
        """This engine's SQLite history file (history.backend = "sqlite")."""
        return self.data_path() / "history.sqlite3"

    def report_dsn(self, given: str = "") -> str:
        """The PostgreSQL history a report reads: `given` (--dsn), else history.dsn when
        the backend is postgres; "" means this engine's SQLite file."""
        return given or (self.history.dsn if self.history.backend == "postgres" else "")


# Environment variables that override config values (secrets live only here).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "TWILIO_ACCOUNT_SID": ("twilio", "account_sid"),
    "TWILIO_AUTH_TOKEN": ("twilio", "auth_token"),
    "SWITCHBOARD_PUBLIC_URL": ("engine", "public_url"),
    "SWITCHBOARD_CONSOLE_TOKEN": ("console_api", "token"),
    "SWITCHBOARD_CONSOLE_READONLY_TOKEN": ("console_api", "readonly_token"),
    "SWITCHBOARD_DATA_DIR": ("engine", "data_dir"),
    "REDIS_URL": ("redis", "url"),
    "DATABASE_URL": ("history", "dsn"),
}


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
        config = Config.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: show the field paths
        raise ConfigError(f"invalid configuration: {exc}") from exc
    config.knowledge.anchor(Path(path).parent if path is not None else Path.cwd())
    return config


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
