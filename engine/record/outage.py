"""A history writer's outages (either backend): what failed, when to retry, one log line
per outage."""

from __future__ import annotations

import time
from pathlib import Path

from engine.log import get_logger

log = get_logger(__name__)

# The journal's replay is retried with a growing pause between these.
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0


def retry_delay(failures_in_row: int) -> float:
    """The pause before the next replay: growing from _RETRY_MIN_S to _RETRY_MAX_S."""
    return min(_RETRY_MAX_S, _RETRY_MIN_S * 2 ** min(failures_in_row - 1, 10))


class Outage:
    """A writer's failures to reach its database (either backend): writes not stored,
    failures in a row, when to try the journal's replay again (backing off), and the
    error, logged once per outage (the backlog is in /healthz meanwhile)."""

    def __init__(self, journal: Path, backend: str = "sqlite") -> None:
        self.journal = journal
        self.backend = backend
        self.failed = 0
        self.in_row = 0
        self.retry_at = 0.0  # monotonic time of the next replay attempt
        self.last_error: str | None = None

    def failed_now(self, exc: BaseException, writes: int) -> None:
        self.failed += writes
        self.in_row += 1
        delay = retry_delay(self.in_row)
        self.retry_at = time.monotonic() + delay
        if self.last_error is None:
            log.error("history.write_failed", backend=self.backend, error=str(exc),
                      writes=writes, journal=str(self.journal), retry_in_s=round(delay, 2))
        self.last_error = str(exc) or type(exc).__name__

    def recovered(self, replayed: int) -> None:
        if self.in_row or replayed:
            log.info("history.recovered", backend=self.backend, replayed=replayed,
                     after_failures=self.in_row)
        self.in_row = 0
        self.last_error = None
