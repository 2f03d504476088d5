"""What every configuration section shares: typos fail loudly, errors have one type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A typo in config.toml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """config.toml is missing, unreadable or invalid."""
