"""Draining, for rolling restarts: stop taking calls, let the calls in progress finish,
then exit.

SIGTERM (or `switchboard drain`, through the supervisor API) starts it: the voice
webhook answers new calls 503 (Twilio then tries the number's fallback URL, a load
balancer the next engine) and /healthz says "draining"; calls in progress go on.
Whatever is still live at `fleet.drain_deadline_s` hears `fleet.drain_goodbye` and is
hung up; then `exit_requested` is set and the process stops (exit status 0). A second
SIGTERM, or a SIGINT at any time, stops at once (the calls still live are ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from engine.config.fleet import FleetConfig
from engine.log import get_logger
from engine.tasks import stop_task

log = get_logger(__name__)

DRAIN_REASON = "engine draining"
_POLL_S = 0.2  # how often the calls still live are counted


class DrainableCall(Protocol):
    """What draining needs of a call (a CallSession)."""

    call_sid: str

    @property
    def ended(self) -> bool: ...

    async def say_goodbye_and_hang_up(self, line: str, reason: str) -> None: ...

    async def end(self, reason: str) -> None: ...


class Drainer:
    def __init__(self, live_calls: Callable[[], list[Any]], config: FleetConfig) -> None:
        self._live_calls = live_calls
        self.config = config
        self.draining = False
        self.started_at: float | None = None  # monotonic
        self.requested_by = ""
        self.goodbyes = 0  # calls hung up at the deadline
        self.exit_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """For /healthz and the drain endpoint's answer."""
        deadline = None
        if self.started_at is not None:
            deadline = max(0.0, self.started_at + self.config.drain_deadline_s
                           - time.monotonic())
        return {"draining": self.draining, "active_calls": len(self._live_calls()),
                "deadline_in_s": None if deadline is None else round(deadline, 1),
                "requested_by": self.requested_by or None}

    def start(self, requested_by: str) -> bool:
        """Start draining (False: it already was)."""
        if self.draining:
            return False
        self.draining = True
        self.requested_by = requested_by
        self.started_at = time.monotonic()
        log.warning("engine.draining", requested_by=requested_by,
                    calls=len(self._live_calls()),
                    deadline_s=self.config.drain_deadline_s)
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="drain")
        return True

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_deadline_s
        while self._live_calls() and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        remaining: list[DrainableCall] = [c for c in self._live_calls() if not c.ended]
        if remaining:
            log.warning("engine.drain_deadline", calls=len(remaining))
            await asyncio.gather(*(self._goodbye(c) for c in remaining),
                                 return_exceptions=True)
        log.info("engine.drained", goodbyes=self.goodbyes,
                 took_s=round(time.monotonic() - (self.started_at or deadline), 1))
        self.exit_requested.set()

    async def _goodbye(self, call: DrainableCall) -> None:
        self.goodbyes += 1
        try:
            async with asyncio.timeout(self.config.drain_goodbye_timeout_s):
                await call.say_goodbye_and_hang_up(self.config.drain_goodbye, DRAIN_REASON)
        except TimeoutError:
            log.warning("engine.drain_goodbye_timeout", call_sid=call.call_sid)
        if not call.ended:
            await call.end(DRAIN_REASON)

    async def aclose(self) -> None:
        await stop_task(self._task)

    # -- signals ---------------------------------------------------------------------------

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM drains (a second one stops at once); SIGINT stops at once."""
        with contextlib.suppress(NotImplementedError):  # no signal handlers (Windows)
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
            loop.add_signal_handler(signal.SIGINT, self._stop_now, "SIGINT")

    def _on_sigterm(self) -> None:
        if not self.start("SIGTERM"):
            self._stop_now("second SIGTERM")

    def _stop_now(self, why: str) -> None:
        log.warning("engine.stop_now", why=why, calls=len(self._live_calls()))
        self.exit_requested.set()
