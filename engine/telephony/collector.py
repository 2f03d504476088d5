"""Full garbage collections at the pacer's safe point, not inside any allocation.

CPython collects its oldest generation when enough objects were promoted into it, from
whatever allocation tips the count: at 250 calls that traversed ~90,000 live objects
(sessions, sockets, tasks) and stopped the event loop for 40-50 ms at a random moment,
long enough for the pacer's 80 ms lead to run out on every call (an audible gap each).

Here the automatic full collection is off (its threshold out of reach; the young
generations are still collected as usual) and `FullCollections` runs it itself:

- right after a pacer tick (`Pacer.after_tick`): every playing stream holds its 80 ms
  lead then, which covers a short pause (up to `headroom_above` objects to traverse,
  ~30 ms on a slow core). For a longer one (a sweep; a collection that found more
  waiting) every playing stream is first sent `headroom_s` (200 ms) more than its lead
  of the audio it has queued, so the pause eats into audio buffered at Twilio, not into
  playback (at 250 calls a full collection took 40-80 ms); the next ticks send nothing
  until the lead is back to normal. Twilio only holds the audio longer: marks still come
  back when it is played, and a barge-in's `clear` empties Twilio's buffer as before. A reply
  whose first audio has only just come cannot be sent ahead: while one holds less than
  the lead plus half the headroom, the collection waits for a later tick (1 s at most);
- every `interval_s` (30 s), and only when objects were promoted since the last one;
  sooner when more than `max_pending` objects (10,000, about 10 ms of traversal) are
  waiting in the oldest generation, so calls arriving together (250 in 10 s bring
  ~90,000 objects) are traversed in several short pauses instead of one of 40-85 ms.
  Counting them means listing them (`gc.get_objects(2)`, ~20 ns an object), so it is
  looked at no more than once a `probe_every_s` and only after a young collection
  promoted something. A timer does it when no audio is playing (the pacer is asleep).

Start-up objects (modules, config, providers) are frozen first (`gc.freeze()`): no
collection traverses them again. Cyclic garbage now waits up to `interval_s` to be
freed: at 250 calls a few MB.

Each collection then freezes what it left alive (`freeze_survivors`): the next one
traverses only what was promoted in the last `interval_s`, not every live call's
objects again, so its pause no longer grows with the calls held (a call's sockets,
tasks and loggers are traversed once, in the collection after they were made). What
was frozen and later becomes cyclic garbage (a call that ended, a request in flight at
the freeze) is found by a sweep, a collection of everything (`gc.unfreeze()` first),
every `sweep_interval_s`, at the same safe point with `sweep_headroom_s` sent ahead;
`swept` counts what sweeps found (what waited for them).
"""

from __future__ import annotations

import asyncio
import gc
import time

from engine.log import get_logger
from engine.telephony.outbound import Pacer

log = get_logger(__name__)

# An oldest-generation threshold no run reaches: automatic full collections are off.
_NEVER = 1 << 30
# Past its time by this much, a collection is taken even with a reply just starting.
_MAX_WAIT_S = 1.0
# Past that, a collection no tick took is the timer's (ticks are 20 ms).
_GRACE_S = _MAX_WAIT_S + 0.1
# The quiet timer's period at most: it also counts what is pending when no tick does.
_TIMER_S = 1.0


class _Process:
    """The collector's settings are the process's: several engines in one process (tests,
    a bench) share them. The first to start saves CPython's threshold, the last to stop
    puts it back and unfreezes."""

    active = 0
    saved: tuple[int, int, int] | None = None

    @classmethod
    def take(cls) -> None:
        if cls.active == 0:
            cls.saved = gc.get_threshold()
            young, middle, _ = cls.saved
            gc.set_threshold(young, middle, _NEVER)
        cls.active += 1

    @classmethod
    def release(cls) -> None:
        cls.active -= 1
        if cls.active == 0 and cls.saved is not None:
            gc.set_threshold(*cls.saved)
            cls.saved = None
            gc.unfreeze()  # what the engines froze is the process's again


class FullCollections:
    """The process's full collections, taken at the pacer's safe point (module doc)."""

    def __init__(self, pacer: Pacer, interval_s: float = 30.0,
                 headroom_s: float = 0.2, freeze_survivors: bool = True,
                 sweep_interval_s: float = 1800.0, sweep_headroom_s: float = 0.6,
                 max_pending: int = 10_000, probe_every_s: float = 1.0,
                 headroom_above: int = 30_000) -> None:
        self.pacer = pacer
        self.headroom_above = headroom_above
        self.interval_s = interval_s
        self.max_pending = max_pending
        self.probe_every_s = probe_every_s
        self.headroom_s = headroom_s
        self.freeze_survivors = freeze_survivors
        self.sweep_interval_s = sweep_interval_s
        self.sweep_headroom_s = sweep_headroom_s
        self.collections = 0
        self.early = 0  # collections taken before `interval_s` for `max_pending`
        self.sweeps = 0
        self.swept = 0  # cyclic garbage only a sweep found
        self.longest_ms = 0.0
        self.longest_sweep_ms = 0.0
        self._due = 0.0
        self._sweep_due = 0.0
        self._probe_at = 0.0
        self._early_due = False
        self._taken = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Freeze what start-up built, take full collections over (call in the loop)."""
        gc.collect()
        gc.freeze()
        if not self._taken:
            self._taken = True
            _Process.take()
        self._due = time.monotonic() + self.interval_s
        self._sweep_due = time.monotonic() + self.sweep_interval_s
        self.pacer.after_tick = self.after_tick
        self._arm()

    def stop(self) -> None:
        """Hand full collections back to CPython."""
        if self.pacer.after_tick == self.after_tick:
            self.pacer.after_tick = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._taken:
            self._taken = False
            _Process.release()

    async def after_tick(self, tick_at: float) -> None:
        """The pacer has just topped every stream up: the time for a pause, if one is due
        (each stream is sent `headroom_s` more first)."""
        now = time.monotonic()
        if now < self._due and not self._too_many_pending(now):
            return
        pacer = self.pacer
        if self._sweep_is_due(now):
            headroom = self.sweep_headroom_s
        elif len(gc.get_objects(generation=2)) <= self.headroom_above:
            # A short pause (~1 us an object): the lead this tick topped up covers it, and
            # sending every stream more first would itself stall the loop (a burst of
            # 10 frames a stream).
            self.collect(now)
            return
        else:
            headroom = self.headroom_s
        await pacer.pump_all(tick_at, pacer.lead_s + headroom)
        if now < self._due + _MAX_WAIT_S and pacer.short_streams(
                tick_at, pacer.lead_s + headroom / 2):
            return  # a reply just starting: the next tick, when it has more queued
        self._due = now + self.interval_s  # not the quiet timer's while the sends await
        self.collect(time.monotonic())

    def sweep_now(self) -> None:
        """A sweep at once, wherever the loop is (benchmarks: what waited for it)."""
        self._sweep_due = 0.0
        self.collect(time.monotonic())

    def stats(self) -> dict[str, float]:
        return {"collections": self.collections, "early": self.early,
                "longest_ms": round(self.longest_ms, 1),
                "sweeps": self.sweeps, "swept": self.swept,
                "longest_sweep_ms": round(self.longest_sweep_ms, 1)}

    def _too_many_pending(self, now: float) -> bool:
        """More than `max_pending` objects wait in the oldest generation: the collection
        is due now (it stays due until taken)."""
        if now < self._probe_at or gc.get_count()[2] == 0:
            return False  # looked lately, or no young collection promoted anything since
        self._probe_at = now + self.probe_every_s
        if len(gc.get_objects(generation=2)) < self.max_pending:
            return False
        self._due = now
        self._early_due = True
        return True

    def _sweep_is_due(self, now: float) -> bool:
        return self.freeze_survivors and now >= self._sweep_due

    def collect(self, now: float) -> None:
        self._due = now + self.interval_s
        early, self._early_due = self._early_due, False
        sweep = self._sweep_is_due(now)
        if not sweep and gc.get_count()[2] == 0:  # nothing promoted since: nothing to find
            return
        started = time.perf_counter()
        if sweep:
            self._sweep_due = now + self.sweep_interval_s
            gc.unfreeze()
        found = gc.collect(2)
        if self.freeze_survivors:
            gc.freeze()
        ms = (time.perf_counter() - started) * 1000
        if sweep:
            self.sweeps += 1
            self.swept += found
            self.longest_sweep_ms = max(self.longest_sweep_ms, ms)
        else:
            self.collections += 1
            self.early += early
            self.longest_ms = max(self.longest_ms, ms)
        log.debug("gc.full_collection", ms=round(ms, 1), garbage=found, sweep=sweep)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(min(self.interval_s, _TIMER_S), self._quiet_check)

    def _quiet_check(self) -> None:
        """No tick took the collection (no audio playing): take it now."""
        now = time.monotonic()
        if self.pacer.asleep:
            self._too_many_pending(now)
        if now >= self._due and (self.pacer.asleep or now >= self._due + _GRACE_S):
            self.collect(now)
        self._arm()
