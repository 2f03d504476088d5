"""All calls of this engine: live ones, and recently ended ones kept for late callbacks;
older ended calls are looked up in the record (a replayed webhook must not revive one)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from engine.session.call_session import CallSession

SessionFactory = Callable[[str, str, str], CallSession]  # (call_sid, from, to)
# Whether the record (the call history) says a call has ended.
EndedOnRecord = Callable[[str], Awaitable[bool]]


class CallRegistry:
    def __init__(self, factory: SessionFactory, ended_retention_s: float = 300.0,
                 max_ended: int = 5000, ended_on_record: EndedOnRecord | None = None) -> None:
        self._factory = factory
        self._ended_on_record = ended_on_record
        self._live: dict[str, CallSession] = {}
        self._ended: OrderedDict[str, tuple[float, CallSession]] = OrderedDict()
        self._retention_s = ended_retention_s
        self._max_ended = max_ended

    def create(self, call_sid: str, from_number: str = "", to_number: str = "") -> CallSession:
        """The session for a call (created on its webhook; idempotent on retries). Its
        clocks start now: the duration cap, and the wait for its media stream."""
        session = self._live.get(call_sid)
        if session is None:
            session = self._factory(call_sid, from_number, to_number)
            self._live[call_sid] = session
            session.answered()
        return session

    def get(self, call_sid: str) -> CallSession | None:
        return self._live.get(call_sid)

    def get_any(self, call_sid: str) -> CallSession | None:
        """A live call, or one that ended recently."""
        session = self._live.get(call_sid)
        if session is None and (item := self._ended.get(call_sid)) is not None:
            session = item[1]
        return session

    def is_ended(self, call_sid: str) -> bool:
        """Ended recently (still in memory)."""
        return call_sid in self._ended

    async def has_ended(self, call_sid: str) -> bool:
        """Ended, recently or long ago (then the record knows); a live call has not."""
        self._prune()
        if call_sid in self._ended:
            return True
        if call_sid in self._live or self._ended_on_record is None:
            return False
        return await self._ended_on_record(call_sid)

    def retire(self, session: CallSession) -> None:
        """Move an ended call out of the live set."""
        if self._live.get(session.call_sid) is session:
            del self._live[session.call_sid]
        self._ended[session.call_sid] = (time.monotonic(), session)
        self._ended.move_to_end(session.call_sid)
        self._prune()

    def _prune(self) -> None:
        cutoff = time.monotonic() - self._retention_s
        while self._ended:
            sid, (ended_at, _) = next(iter(self._ended.items()))
            if ended_at >= cutoff and len(self._ended) <= self._max_ended:
                break
            del self._ended[sid]

    def live(self) -> list[CallSession]:
        return list(self._live.values())

    def recently_ended(self) -> list[CallSession]:
        self._prune()
        return [s for _, s in self._ended.values()]

    def __len__(self) -> int:
        return len(self._live)
