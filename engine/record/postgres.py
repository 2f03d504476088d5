"""The history's PostgreSQL writer: the fleet's shared record, through asyncpg and a pool.

Same contract as the SQLite writer (writer.py), on the event loop instead of a thread:
one task takes writes and reads in order; writes that queue up together share one
transaction (each in a savepoint of its own, so one bad write never undoes its
neighbours) and a write is acknowledged once committed. While PostgreSQL cannot be
reached (down at start, a dropped connection, the server shutting down, its disk full)
writes go to the journal (spool.py, its file I/O off the loop), fsync'd, and are replayed
from there in order and once (their ids in `applied_writes`, in the replay's
transaction), with a growing pause between attempts. Reads need the server: while it is
unreachable they raise HistoryError.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from engine.log import get_logger
from engine.record.data_dir import DIR_MODE
from engine.record.database import HistoryError
from engine.record.outage import Outage
from engine.record.postgres_schema import init_connection, migrate
from engine.record.spool import Spool
from engine.record.sql import PlanFactory, run_postgres
from engine.record.writer import (
    GROUP_COMMIT_MAX,
    MEMORY_MAX,
    REPLAY_CHUNK,
    HistoryStats,
    Refused,
    Stored,
    spool_stats,
)
from engine.record.writes import Write, applied_check, plan, record_applied

log = get_logger(__name__)

T = TypeVar("T")
_Item = tuple[Write | PlanFactory[Any], "asyncio.Future[Any]"]
# SQLSTATE classes of a server that may take the write later: connection (08), resources
# (53: disk full, too many connections), operator intervention (57: shutdown, cancelled),
# rollback (40: serialization, deadlock), system error (58: I/O).
_TRANSIENT_CLASSES = frozenset({"08", "53", "57", "40", "58"})
_READ_ONLY = "25006"  # a standby, or a server set read-only for maintenance


def transient(exc: BaseException) -> bool:
    """Whether PostgreSQL may take the write later (the server, not the write)."""
    if isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresConnectionError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_CLASSES or state == _READ_ONLY
    # "connection is closed", "connection was closed in the middle of operation", ...
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)


class PostgresWriter:
    """Runs writes and reads on the PostgreSQL history, in order, on one task."""

    def __init__(self, dsn: str, journal: Path, memory_max: int = MEMORY_MAX,
                 pool_max: int = 4, timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self._pool_max = pool_max
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._spool = Spool(journal, memory_max)
        self._found_version = 0
        self._outage = Outage(self._spool.journal, "postgres")

    @property
    def running(self) -> bool:
        return self._task is not None

    def stats(self) -> HistoryStats:
        return spool_stats(self._spool, self._outage.failed, self._outage.last_error, "postgres")

    def pending(self) -> list[Write]:
        """The backlog, oldest first."""
        return list(self._spool.pending)

    async def open(self) -> int:
        """Load the journal, connect and migrate (an unreachable server is retried later:
        writes go to the journal meanwhile), replay, start the task; the schema version
        found (0 while the server is unreachable)."""
        self._closed = False
        journal = self._spool.journal
        await asyncio.to_thread(journal.parent.mkdir, mode=DIR_MODE, parents=True,
                                exist_ok=True)
        # Whether a journaled write was applied is asked at replay, write by write.
        waiting = await asyncio.to_thread(self._spool.load, lambda _write_id: False)
        await asyncio.to_thread(self._spool.reserve)
        try:
            await self._connect()
        except HistoryError:
            self._spool.close()
            raise
        except Exception as exc:
            if not transient(exc):
                self._spool.close()
                raise HistoryError(f"cannot open the PostgreSQL history: {exc}") from exc
            self._outage.failed_now(exc, 0)
        if waiting:
            log.warning("history.journal_found", journal=str(journal), writes=waiting)
            if self._pool is not None:
                await self._replay()
        self._task = asyncio.create_task(self._serve(), name="history-postgres")
        return self._found_version

    async def aclose(self) -> None:
        """Run every queued job, try the backlog a last time, then close the pool."""
        task = self._task
        if task is None or self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        await asyncio.shield(task)
        self._task = None

    async def write(self, write: Write) -> tuple[Stored, Any]:
        return await self._submit(write)

    async def read(self, job: PlanFactory[T]) -> T:
        """Run the plan `job` makes, after every write queued before it."""
        return await self._submit(job)

    async def _submit(self, item: Write | PlanFactory[Any]) -> Any:
        if self._task is None or self._closed:
            raise HistoryError("history is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        # Shielded: a cancelled caller (call torn down) must not drop a queued write.
        return await asyncio.shield(fut)

    # --- on the writer task ---

    async def _connect(self) -> asyncpg.Pool:
        """The pool, made (and the schema migrated) if there is none yet."""
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self._pool_max, timeout=self._timeout_s,
                command_timeout=self._timeout_s * 6, init=init_connection)
            try:
                async with pool.acquire() as conn:
                    self._found_version = await migrate(conn)
            except BaseException:
                await pool.close()
                raise
            log.info("history.postgres_connected", found_version=self._found_version)
            self._pool = pool
        return self._pool

    async def _serve(self) -> None:
        try:
            while True:
                timeout = (max(self._outage.retry_at - time.monotonic(), 0.0)
                           if self._spool.pending else None)
                try:
                    first = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    await self._replay()
                    continue
                if first is None:
                    break
                batch, stop = [first], False
                # Group commit: whatever queued up while we were busy shares one commit.
                while len(batch) < GROUP_COMMIT_MAX and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                try:
                    await self._run_batch(batch)
                except Exception as exc:  # a bug: no waiter may hang, and the task goes on
                    log.exception("history.batch_crashed")
                    for _, fut in batch:
                        _resolve(fut, None, exc)
                if stop:
                    break
            if self._spool.pending:
                await self._replay()
            self._spool.report_left_behind()
        finally:
            self._spool.close()
            if self._pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._pool.close(), self._timeout_s)
                self._pool = None

    async def _run_batch(self, batch: list[_Item]) -> None:
        writes: list[tuple[Write, asyncio.Future[Any]]] = []
        for item, fut in batch:
            if isinstance(item, Write):
                writes.append((item, fut))
                continue
            await self._store(writes)  # the writes queued before this read come first
            writes = []
            try:
                pool = await self._connect()
                async with pool.acquire(timeout=self._timeout_s) as conn:
                    _resolve(fut, await run_postgres(conn, item()), None)
            except Exception as exc:
                error = HistoryError(f"cannot read the history: {exc}") if transient(exc) \
                    else exc
                _resolve(fut, None, error)
        await self._store(writes)

    async def _store(self, writes: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        if not writes:
            return
        if self._spool.pending and time.monotonic() >= self._outage.retry_at:
            await self._replay()
        if self._spool.pending:  # behind a backlog: the order holds
            await self._spool_writes(writes)
            return
        results: list[Any] = []
        try:
            try:  # savepoints cost a round trip each: only once a write is refused
                results = await self._commit([write for write, _ in writes], isolate=False)
            except _WriteRefused:
                results = await self._commit([write for write, _ in writes], isolate=True)
        except Exception as exc:  # unreachable, dropped, or refusing writes
            if not transient(exc):
                log.exception("history.batch_refused")
            self._outage.failed_now(exc, len(writes))
            refused = {i: r.error for i, r in enumerate(results) if isinstance(r, Refused)}
            for i, error in refused.items():
                _resolve(writes[i][1], None, error)
            await self._spool_writes([w for i, w in enumerate(writes) if i not in refused])
            return
        for (_, fut), result in zip(writes, results, strict=True):
            if isinstance(result, Refused):
                self._outage.failed += 1
                _resolve(fut, None, result.error)
            else:
                _resolve(fut, ("committed", result), None)

    async def _commit(self, writes: list[Write], isolate: bool) -> list[Any]:
        """Apply `writes` in one transaction; their results. Isolated: each in a savepoint
        (a refused one is Refused, its neighbours stand); else a refusal raises
        _WriteRefused and nothing is applied."""
        pool = await self._connect()
        results: list[Any] = []
        async with pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            for write in writes:
                if isolate:
                    results.append(await _apply_one(conn, write))
                    continue
                try:
                    results.append(await run_postgres(conn, plan(write)))
                except Exception as exc:
                    if transient(exc):
                        raise
                    raise _WriteRefused from exc
        return results

    async def _spool_writes(self, writes: list[tuple[Write, asyncio.Future[Any]]]) -> None:
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
        journaled, kept = await asyncio.to_thread(self._spool.add,
                                                  [write for write, _ in storable])
        for n, (_, fut) in enumerate(storable):
            outcome: Stored = "lost" if n >= kept else "journaled" if journaled else "held"
            _resolve(fut, (outcome, None), None)

    async def _replay(self) -> None:
        """Apply the backlog in order, in chunks, each write once; empty the journal when
        all of it is in. On a refusal, the next attempt waits a little longer."""
        spool = self._spool
        replayed = 0
        try:
            pool = await self._connect()
            while spool.pending:
                chunk = list(itertools.islice(spool.pending, REPLAY_CHUNK))
                refused = []
                async with pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
                    for write in chunk:
                        if await run_postgres(conn, applied_check(write.id)):
                            continue
                        result = await _apply_one(conn, write, record_id=True)
                        if isinstance(result, Refused):
                            refused.append((write, result.error))
                spool.applied(len(chunk))
                replayed += len(chunk)
                for write, error in refused:
                    await asyncio.to_thread(spool.reject, write, error)
        except Exception as exc:
            self._outage.failed_now(exc, 0)
            return
        await asyncio.to_thread(spool.clear_journal)
        self._outage.recovered(replayed)


class _WriteRefused(Exception):
    """A write of a batch run without savepoints was refused: run it again isolated."""


async def _apply_one(conn: Any, write: Write, record_id: bool = False) -> Any:
    """`write` in a savepoint of its own; its result, or Refused. A transient error is
    raised: the whole transaction is retried later."""
    try:
        async with conn.transaction():
            result = await run_postgres(conn, plan(write))
            if record_id:
                await run_postgres(conn, record_applied(write.id))
        return result
    except Exception as exc:
        if transient(exc):
            raise
        return Refused(exc)


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return  # cancelled by its waiter; the write itself still happened
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)
