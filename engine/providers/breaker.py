"""Circuit breaker for one provider: stop calling it for a while after repeated failures.

closed --N consecutive failures--> open --reset_after_s--> half-open (one trial call)
half-open --success--> closed; half-open --failure--> open again.

A provider that is down costs every caller a timeout; the breaker turns that into an
immediate skip to the next provider in the chain until the trial call shows it is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from engine.providers.base import ProviderHealth, ProviderKind


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker; `clock` is injectable (monotonic seconds) for tests."""

    def __init__(self, failures_to_open: int, reset_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures_to_open < 1:
            raise ValueError(f"failures_to_open must be >= 1, got {failures_to_open}")
        if reset_after_s < 0:
            raise ValueError(f"reset_after_s must be >= 0, got {reset_after_s}")
        self.failures_to_open = failures_to_open
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._trial_started_at: float | None = None
        self._last_error: str | None = None

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose wait is over reads as half-open."""
        if (self._state is BreakerState.OPEN
                and self._clock() >= self._opened_at + self.reset_after_s):
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def allow(self) -> bool:
        """May the provider be called now? In half-open, only one trial call at a time."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self.reset_after_s:
                return False
            self._state = BreakerState.HALF_OPEN
            self._trial_started_at = now
            return True
        # Half-open: a trial is in flight. If its caller vanished without reporting
        # (cancelled mid-call), allow a new trial after another wait rather than never.
        if self._trial_started_at is None or now >= self._trial_started_at + self.reset_after_s:
            self._trial_started_at = now
            return True
        return False

    def release(self) -> None:
        """The allowed call was abandoned (e.g. cancelled) without an outcome."""
        if self._state is BreakerState.HALF_OPEN:
            self._trial_started_at = None

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._trial_started_at = None

    def record_failure(self, error: BaseException | str) -> None:
        self._consecutive_failures += 1
        self._last_error = str(error) or type(error).__name__
        if (self._state is BreakerState.HALF_OPEN
                or self._consecutive_failures >= self.failures_to_open):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_started_at = None

    def health(self, name: str, kind: ProviderKind) -> ProviderHealth:
        state = self.state
        return ProviderHealth(
            name=name,
            kind=kind,
            healthy=state is BreakerState.CLOSED,
            consecutive_failures=self._consecutive_failures,
            last_error=self._last_error,
            open_until=(self._opened_at + self.reset_after_s
                        if self._state is not BreakerState.CLOSED else None),
            extra={"state": state.value},
        )
