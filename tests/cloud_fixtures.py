"""Shared helpers for the cloud-provider tests (the providers run against local stand-ins).

The stand-ins are async context managers (`async with OpenAIStandin() as server:`), so
each test states its own server behaviour next to its assertions.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import numpy as np

from engine.sim.standins.server import speech_like_pcm

T = TypeVar("T")

OPENAI_KEY = "sk-test"
ELEVENLABS_KEY = "xi-test"


async def collect(events: AsyncIterator[T]) -> list[T]:
    return [event async for event in events]


def speech_pcm16(seconds: float, sample_rate: int) -> bytes:
    """PCM16 little-endian mono of a speech-like signal."""
    return speech_like_pcm(seconds, sample_rate).astype("<i2").tobytes()


def closed_port_url(path: str = "") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


class Stopwatch:
    """Seconds since creation, for bounding how long a failure took to surface."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.size, b.size)
    x = a[:n].astype(np.float64)
    y = b[:n].astype(np.float64)
    return float(np.corrcoef(x, y)[0, 1])
