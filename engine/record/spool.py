"""The history's spool: writes the database refused, in order, until it takes them.

They go to the journal, an append-only file beside the database (one JSON line per
write, fsync'd before the write is acknowledged), and stay in memory as the backlog the
writer replays. When even the journal cannot be written (the disk is full for it too) a
write is held in memory only, at most `memory_max` of them, and that is logged as an
error: such writes are not acknowledged, and beyond the bound they are lost (counted).
A write that can never be applied (a bug, not the disk) is moved to the rejected file
beside the journal. Used by the writer thread only.

A full disk refuses the journal as it refuses the database, so the journal keeps room of
its own: `RESERVE_BYTES` allocated past its end (fallocate KEEP_SIZE, where the system
has it: Linux), taken at start and again each time it is emptied. Appends land there
while nothing else can be written, so the writes of an outage stay acknowledged; only
beyond the reserve are they held in memory. A line torn by a crash mid-append is copied
to the rejected file at start and ended there, so no later line is glued to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.log import get_logger
from engine.record.data_dir import FILE_MODE
from engine.record.writes import Write

log = get_logger(__name__)

_LOUD_EVERY = 1000  # while writes are lost, one error line per this many
# Room the journal keeps past its end for an outage (~10,000 writes of a call).
RESERVE_BYTES = 4 << 20
_FALLOC_FL_KEEP_SIZE = 1  # allocate without changing the file's size (linux/falloc.h)


class Spool:
    def __init__(self, journal: Path, memory_max: int) -> None:
        self.journal = journal
        self.rejected_path = journal.with_suffix(".rejected")
        self.memory_max = memory_max
        self.pending: deque[Write] = deque()  # oldest first; none applied yet
        self.unjournaled = 0  # the newest `unjournaled` of `pending` are in memory only
        self.spooled = 0  # writes that went to the spool since start
        self.lost = 0  # writes dropped (memory bound) or rejected since start
        self.journal_error: str | None = None
        self._fd: int | None = None

    def load(self, applied: Callable[[str], bool]) -> int:
        """The journal's writes not yet `applied`, as the backlog; how many there are.
        A journal with none left is emptied; a torn last line (copied to the rejected
        file) is ended, so the next append starts a line of its own."""
        try:
            raw = self.journal.read_bytes()
        except FileNotFoundError:
            return 0
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                write = Write.decode(line)
            except ValueError as exc:
                # A torn last line (a crash mid-append) or damage: keep it for a person.
                log.error("history.journal_line_unreadable", journal=str(self.journal),
                          line=number, error=str(exc), kept_in=str(self.rejected_path))
                self._append_rejected(line)
                continue
            if not applied(write.id):
                self.pending.append(write)
        if not self.pending:
            self._cut(0)
        elif not raw.endswith(b"\n"):
            # Ended, not cut off: cutting would give the reserve back to the disk.
            self._append_newline()
        return len(self.pending)

    def reserve(self) -> None:
        """Keep `RESERVE_BYTES` allocated past the journal's end (best effort)."""
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
        except OSError as exc:
            log.warning("history.journal_unopenable", journal=str(self.journal), error=str(exc))
            return
        error = _reserve(fd, size, RESERVE_BYTES)
        if error:
            log.warning("history.journal_reserve_failed", journal=str(self.journal),
                        bytes=RESERVE_BYTES, error=error,
                        detail="a full disk will hold writes in memory only")

    def add(self, writes: list[Write]) -> tuple[bool, int]:
        """Queue `writes` after the backlog: whether they are in the journal (durable),
        and how many of them were kept; the memory bound drops the newest (counted)."""
        self.pending.extend(writes)
        self.spooled += len(writes)
        self.unjournaled += len(writes)
        try:
            self._append(itertools.islice(self.pending, len(self.pending) - self.unjournaled,
                                          None))
        except OSError as exc:
            dropped = self._journal_failed(exc)
            return False, len(writes) - dropped
        self.unjournaled = 0
        if self.journal_error is not None:
            log.info("history.journal_writable_again", journal=str(self.journal))
            self.journal_error = None
        return True, len(writes)

    def applied(self, count: int) -> None:
        """The oldest `count` writes of the backlog reached the database."""
        for _ in range(count):
            self.pending.popleft()
        self.unjournaled = min(self.unjournaled, len(self.pending))

    def reject(self, write: Write, error: BaseException) -> None:
        """`write` can never be applied: kept in the rejected file, counted as lost."""
        self.lost += 1
        log.error("history.write_rejected", what=write.op, call_sid=write.call_sid,
                  error=str(error), kept_in=str(self.rejected_path))
        self._append_rejected(write.encode())

    def clear_journal(self) -> None:
        """Empty the journal once the whole backlog is in the database."""
        assert not self.pending
        self.journal_error = None  # nothing is held any more
        if self._cut(0):  # truncating gave the reserve back: take it again
            self.reserve()

    def report_left_behind(self) -> None:
        """At a writer's close: count and log what did not reach the database (writes
        only in memory are lost; journaled ones are replayed at the next start)."""
        if self.unjournaled:
            self.lost += self.unjournaled
            log.error("history.closed_with_writes_in_memory", lost=self.unjournaled,
                      error=self.journal_error)
        if len(self.pending) > self.unjournaled:
            log.warning("history.closed_with_journal",
                        writes=len(self.pending) - self.unjournaled,
                        journal=str(self.journal), detail="replayed at the next start")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- the journal file ---

    def _cut(self, size: int) -> bool:
        """Truncate the journal to `size` bytes; whether it was longer."""
        try:
            fd = self._open()
            if os.fstat(fd).st_size <= size:
                return False
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:  # its writes are applied: a later replay skips them
            log.warning("history.journal_not_truncated", journal=str(self.journal),
                        error=str(exc))
            return False
        return True

    def _append_newline(self) -> None:
        try:
            fd = self._open()
            os.write(fd, b"\n")
            os.fsync(fd)
        except OSError as exc:  # the line stays unterminated: the next append is glued
            log.error("history.journal_unterminated", journal=str(self.journal),
                      error=str(exc))

    def _open(self) -> int:
        if self._fd is None:
            created = not self.journal.exists()
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            if created:  # the new name itself must survive a power cut
                _fsync_dir(self.journal.parent)
        return self._fd

    def _append(self, writes: Iterable[Write]) -> None:
        data = b"".join(write.encode() + b"\n" for write in writes)
        fd = self._open()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # No torn line is left behind: shrinking needs no space.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise

    def _journal_failed(self, exc: OSError) -> int:
        """Keep what the memory bound allows; how many of the newest were dropped."""
        over = max(self.unjournaled - self.memory_max, 0)
        for _ in range(over):  # the newest go: the backlog keeps its order
            self.pending.pop()
        self.unjournaled -= over
        if over:
            before, self.lost = self.lost, self.lost + over
            if before == 0 or before // _LOUD_EVERY != self.lost // _LOUD_EVERY:
                log.error("history.writes_lost", lost=self.lost, held=self.unjournaled,
                          journal=str(self.journal), error=str(exc))
        if self.journal_error is None:
            log.error("history.journal_write_failed", journal=str(self.journal),
                      error=str(exc), held_in_memory=self.unjournaled,
                      memory_max=self.memory_max)
        self.journal_error = str(exc)
        if self._fd is not None:  # reopened next time (the file may have gone)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        return over

    def _append_rejected(self, line: bytes) -> None:
        try:
            fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, line + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("history.rejected_file_unwritable", path=str(self.rejected_path),
                      error=str(exc))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate, where there is one (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if function is None:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


def _reserve(fd: int, offset: int, length: int) -> str | None:
    """Allocate `length` bytes from `offset` without growing the file; an error or None."""
    function = _fallocate()
    if function is None:
        return "fallocate is not available on this system"
    if function(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        return os.strerror(ctypes.get_errno())
    return None
