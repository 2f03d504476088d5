"""The agent's answer as it is written, for a voice that reads it as it comes.

The reply pushes each piece of text once; every voice that reads it gets a reader from
the beginning, so a fallback voice taking over from a failed one hears the whole answer
so far. `wait_first` lets a chain start its first-audio clock at the first text, not at
the request: a voice cannot be late for text that has not been written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator


class TextFeed:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self._closed = False
        self._changed = asyncio.Event()
        self.first_at: float | None = None  # monotonic time of the first text

    @property
    def text(self) -> str:
        """All the text pushed so far."""
        return "".join(self._parts)

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("text pushed after the feed was closed")
        if text:
            if self.first_at is None:
                self.first_at = time.monotonic()
            self._parts.append(text)
            self._wake()

    def close(self) -> None:
        """No more text: readers end after what they have not read yet."""
        if not self._closed:
            self._closed = True
            self._wake()

    async def wait_first(self) -> None:
        """Until there is text, or the feed closed without any."""
        while not self._parts and not self._closed:
            await self._changed.wait()

    async def reader(self) -> AsyncIterator[str]:
        """Every piece, from the first, as it comes; ends once the feed is closed."""
        index = 0
        while True:
            while index < len(self._parts):
                index += 1
                yield self._parts[index - 1]
            if self._closed:
                return
            await self._changed.wait()

    def _wake(self) -> None:
        # Every waiter wakes and re-checks; a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
