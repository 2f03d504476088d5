"""An async generator of synthesis events that is an object: it can hold state (what a
stream owes so far, `usage`) and close more than the generator (`after_close`: a socket,
an inner stream). The voice's input stream and the cache's sentence store are two."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from engine.providers.base import StreamedSynthesisEvent


class EventStream(AsyncGenerator[StreamedSynthesisEvent, None]):
    def __init__(self, events: AsyncGenerator[StreamedSynthesisEvent, None]) -> None:
        self._events = events

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamedSynthesisEvent:
        return await anext(self._events)

    async def asend(self, value: None) -> StreamedSynthesisEvent:
        return await self._events.asend(value)

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None
                     ) -> StreamedSynthesisEvent:
        return await self._events.athrow(typ, val, tb)

    async def aclose(self) -> None:
        await self._events.aclose()
        await self.after_close()

    async def after_close(self) -> None:
        """What else closes with the stream."""
