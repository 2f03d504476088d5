"""Builds an Engine from configuration: which providers, which backends."""

from __future__ import annotations

from engine.app import Engine
from engine.config import Config


async def build_engine(config: Config) -> Engine:
    """The engine the configuration describes (providers are warmed up here)."""
    return Engine(config)
