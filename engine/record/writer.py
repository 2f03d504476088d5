"""The history's writer thread: it alone holds the SQLite connection; the loop only awaits.

Durability: every write is committed as soon as it is taken from the queue (writes that
arrive together share one commit), so a committed write survives the process being
killed (kill -9); only an OS crash or power loss can lose the last commits. A write runs
in a savepoint of its own: one bad write (a bug) never undoes its neighbours.

No silent loss: when the database refuses a batch (disk full, I/O error, locked too
long), its writes go to the spool (spool.py): the journal, fsync'd, then acknowledged.
From then on every write queues behind that backlog, so the order holds, and the thread
replays the backlog with a growing pause (outage.py: 0.2 s growing to 5 s), at start
too, recording each replayed write's id in the same transaction: a replay cut short
after its commit never applies a write twice. The journal is emptied once all of it is in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from engine.log import get_logger
from engine.record.data_dir import DIR_MODE, private_file
from engine.record.database import HistoryError, connect, migrate
from engine.record.outage import Outage
from engine.record.spool import Spool
from engine.record.sql import PlanFactory, run_sqlite
from engine.record.writes import Write, applied_check, plan, record_applied

log = get_logger(__name__)

T = TypeVar("T")

Read = PlanFactory[Any]
_Item = tuple[Write | Read, "concurrent.futures.Future[Any]"]
HistoryStatus = Literal["ok", "spooling", "failing"]
# What became of a write: committed, in the journal, held in memory only (not durable),
# dropped (memory bound), or refused for good (its exception is raised instead).
Stored = Literal["committed", "journaled", "held", "lost"]

GROUP_COMMIT_MAX = 256
REPLAY_CHUNK = 256  # writes per replay transaction: a long backlog lands in steps
MEMORY_MAX = 10_000  # writes held in memory while the journal cannot be written
# SQLite result codes of a database that may take the write later (full, I/O, busy,
# locked, read-only, cannot open, out of memory, corrupt, lock protocol).
_TRANSIENT_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15})
# Errors that come back however often the write is tried: the write itself is wrong.
_PERMANENT = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError,
              sqlite3.DataError, sqlite3.NotSupportedError)


@dataclass(slots=True, frozen=True)
class HistoryStats:
    """How the history is doing. `status`: "ok", "spooling" (writes wait in the journal,
    nothing at risk) or "failing" (writes held in memory only: the journal is failing
    too). Counts are since the engine started."""

    status: HistoryStatus
    backlog: int  # writes waiting for the database (journal and memory)
    in_memory: int  # of them, those the journal could not take
    failed: int  # writes the database refused (then spooled, or refused for good)
    spooled: int  # writes that went to the spool
    lost: int  # writes dropped (memory bound reached) or rejected on replay
    last_error: str | None  # the database's, while it refuses writes
    journal_error: str | None
    journal: str
    backend: str = "sqlite"  # or "postgres"


def spool_stats(spool: Spool, failed: int, last_error: str | None,
                backend: str = "sqlite") -> HistoryStats:
    """How a writer with this spool is doing (either backend)."""
    backlog, in_memory = len(spool.pending), spool.unjournaled
    status: HistoryStatus = "failing" if in_memory else "spooling" if backlog else "ok"
    return HistoryStats(status, backlog, in_memory, failed, spool.spooled, spool.lost,
                        last_error if backlog else None, spool.journal_error,
                        str(spool.journal), backend)


def transient(exc: BaseException) -> bool:
    """Whether the database may take the write later (the disk, not the write)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, _PERMANENT):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code & 0xFF in _TRANSIENT_CODES


class HistoryWriter:
    """Runs writes and reads on the history database, in order, on one thread."""

    def __init__(self, path: Path, journal: Path, thread_name: str,
                 memory_max: int = MEMORY_MAX) -> None:
        self.path = path
        self._thread_name = thread_name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._spool = Spool(journal, memory_max)
        self._outage = Outage(self._spool.journal)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stats(self) -> HistoryStats:
        """A snapshot; safe from any thread."""
        return spool_stats(self._spool, self._outage.failed, self._outage.last_error)

    async def open(self) -> int:
        """Create/upgrade the database, replay the journal, start the thread; the schema
        version found. A journal the database still refuses stays the backlog."""
        self._closed = False
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=self._thread_name, daemon=True)
        self._thread.start()
        try:
            return await asyncio.wrap_future(ready)
        except BaseException:
            self._thread = None
            raise

    async def aclose(self) -> None:
        """Run every queued job, try the backlog a last time, then close the connection."""
        thread = self._thread
        if thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    async def write(self, write: Write) -> tuple[Stored, Any]:
        """Store `write`; what became of it and its result (when committed). Raises the
        write's own error when it can never be applied."""
        return await self._submit(write)

    async def read(self, job: PlanFactory[T]) -> T:
        """Run the plan `job` makes, after every write queued before it."""
        return await self._submit(job)

    def pending(self) -> list[Write]:
        """The backlog, oldest first. On the writer thread only (inside a read job)."""
        return list(self._spool.pending)

    async def _submit(self, item: Write | Read) -> Any:
        if self._thread is None or self._closed:
            raise HistoryError("history is not open")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((item, fut))
        # Shielded: a cancelled caller (call torn down) must not drop a queued write.
        return await asyncio.shield(asyncio.wrap_future(fut))

    # --- on the writer thread ---

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            private_file(self.path)  # SQLite gives its -wal and -shm the same mode
            conn = connect(self.path, create=True)
            found = migrate(conn)
            waiting = self._spool.load(lambda write_id: _applied(conn, write_id))
            self._spool.reserve()  # room for the journal while the disk is full
        except BaseException as exc:  # reported to open(), which raises it
            self._spool.close()
            ready.set_exception(HistoryError(f"cannot open history {self.path}: {exc}"))
            return
        if waiting:
            log.warning("history.journal_found", journal=str(self._spool.journal),
                        writes=waiting)
            self._replay(conn)
        ready.set_result(found)
        try:
            self._serve(conn)
            if self._spool.pending:
                self._replay(conn)
            self._spool.report_left_behind()
        finally:
            self._spool.close()
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            timeout = (max(self._outage.retry_at - time.monotonic(), 0.0)
                       if self._spool.pending else None)
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._replay(conn)
                continue
            if first is None:
                return
            batch = [first]
            stop = False
            # Group commit: whatever queued up while we were busy shares one commit.
            while len(batch) < GROUP_COMMIT_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._run_batch(conn, batch)
            except Exception as exc:  # a bug: no waiter may hang, and the thread goes on
                log.exception("history.batch_crashed")
                for _, fut in batch:
                    _resolve(fut, None, exc)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        writes: list[tuple[Write, concurrent.futures.Future[Any]]] = []
        for item, fut in batch:
            if isinstance(item, Write):
                writes.append((item, fut))
                continue
            self._store(conn, writes)  # the writes queued before this read come first
            writes = []
            try:
                _resolve(fut, run_sqlite(conn, item()), None)
            except Exception as exc:
                _resolve(fut, None, exc)
        self._store(conn, writes)

    def _store(self, conn: sqlite3.Connection,
               writes: list[tuple[Write, concurrent.futures.Future[Any]]]) -> None:
        if not writes:
            return
        if self._spool.pending and time.monotonic() >= self._outage.retry_at:
            self._replay(conn)
        if self._spool.pending:  # behind a backlog: the order holds
            self._spool_writes(writes)
            return
        results: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write, _ in writes:
                results.append(_apply_one(conn, write))
            conn.execute("COMMIT")
        except Exception as exc:  # the database refuses (disk full, I/O, locked)
            _rollback(conn)
            self._outage.failed_now(exc, len(writes))
            refused = {i: r.error for i, r in enumerate(results) if isinstance(r, Refused)}
            for i, error in refused.items():
                _resolve(writes[i][1], None, error)
            self._spool_writes([w for i, w in enumerate(writes) if i not in refused])
            return
        for (_, fut), result in zip(writes, results, strict=True):
            if isinstance(result, Refused):
                self._outage.failed += 1
                _resolve(fut, None, result.error)
            else:
                _resolve(fut, ("committed", result), None)

    def _spool_writes(self, writes: list[tuple[Write, concurrent.futures.Future[Any]]]) -> None:
        storable = []
        for write, fut in writes:
            try:
                write.encode()
            except (TypeError, ValueError) as exc:  # not JSON: it could never be replayed
                _resolve(fut, None, exc)
                continue
            storable.append((write, fut))
        if not storable:
            return
        writes = storable
        journaled, kept = self._spool.add([write for write, _ in writes])
        for n, (_, fut) in enumerate(writes):
            outcome: Stored = "lost" if n >= kept else "journaled" if journaled else "held"
            _resolve(fut, (outcome, None), None)

    def _replay(self, conn: sqlite3.Connection) -> None:
        """Apply the backlog in order, in chunks, each write once; empty the journal when
        all of it is in. On a refusal, the next attempt waits a little longer."""
        spool = self._spool
        replayed = 0
        try:
            while spool.pending:
                chunk = list(itertools.islice(spool.pending, REPLAY_CHUNK))
                conn.execute("BEGIN IMMEDIATE")
                refused = []
                for write in chunk:
                    if _applied(conn, write.id):
                        continue
                    result = _apply_one(conn, write, record_id=True)
                    if isinstance(result, Refused):
                        refused.append((write, result.error))
                conn.execute("COMMIT")
                spool.applied(len(chunk))
                replayed += len(chunk)
                for write, error in refused:
                    spool.reject(write, error)
        except Exception as exc:
            _rollback(conn)
            self._outage.failed_now(exc, 0)
            return
        spool.clear_journal()
        self._outage.recovered(replayed)


@dataclass(slots=True, frozen=True)
class Refused:
    """A write the database refuses for good (a bug, not the disk)."""

    error: Exception


def _apply_one(conn: sqlite3.Connection, write: Write, record_id: bool = False) -> Any:
    """`write` in a savepoint of its own; its result, or Refused. A transient error is
    raised: the whole transaction is retried later."""
    conn.execute("SAVEPOINT write")
    try:
        result = run_sqlite(conn, plan(write))
        if record_id:
            run_sqlite(conn, record_applied(write.id))
        conn.execute("RELEASE write")
        return result
    except Exception as exc:
        if transient(exc):
            raise
        conn.execute("ROLLBACK TO write")
        conn.execute("RELEASE write")
        return Refused(exc)


def _applied(conn: sqlite3.Connection, write_id: str) -> bool:
    return run_sqlite(conn, applied_check(write_id))


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # SQLite rolled back by itself
            log.debug("history.rollback_failed", error=str(exc))


def _resolve(fut: concurrent.futures.Future[Any], value: Any,
             error: BaseException | None) -> None:
    try:
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its waiter; the write itself still happened
