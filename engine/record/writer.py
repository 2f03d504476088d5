"""The history's writer thread: it alone holds the SQLite connection; the loop only awaits.

Durability: every job is committed as soon as it is taken from the queue (jobs that
arrive together share one commit), so a committed write survives the process being
killed (kill -9); only an OS crash or power loss can lose the last commits. A job runs
in a savepoint of its own: one bad write never undoes its neighbours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.record.database import HistoryError, connect, migrate

T = TypeVar("T")

Job = Callable[[sqlite3.Connection], Any]
_Item = tuple[Job, "concurrent.futures.Future[Any]"]

_GROUP_COMMIT_MAX = 256


class HistoryWriter:
    """Runs jobs on the history database, in order, on one thread."""

    def __init__(self, path: Path, thread_name: str) -> None:
        self.path = path
        self._thread_name = thread_name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def open(self) -> int:
        """Create/upgrade the database and start the thread; the schema version found."""
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
        """Run every queued job, then close the connection."""
        thread = self._thread
        if thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    async def submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` on the connection; its result once committed (or its exception)."""
        if self._thread is None or self._closed:
            raise HistoryError("history is not open")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((job, fut))
        # Shielded: a cancelled caller (call torn down) must not drop a queued write.
        return await asyncio.shield(asyncio.wrap_future(fut))

    # --- on the writer thread ---

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path, create=True)
            found = migrate(conn)
        except BaseException as exc:  # reported to open(), which raises it
            ready.set_exception(HistoryError(f"cannot open history {self.path}: {exc}"))
            return
        ready.set_result(found)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            # Group commit: whatever queued up while we were busy shares one commit.
            while len(batch) < _GROUP_COMMIT_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            _run_batch(conn, batch)


def _run_batch(conn: sqlite3.Connection, batch: list[_Item]) -> None:
    results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for job, fut in batch:
            # A savepoint per job: one bad write never undoes its neighbours.
            conn.execute("SAVEPOINT job")
            try:
                results.append((fut, job(conn), None))
                conn.execute("RELEASE job")
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                results.append((fut, None, exc))
        conn.execute("COMMIT")
    except Exception as exc:  # BEGIN/COMMIT failed (disk full, locked too long)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        results = [(fut, None, exc) for _, fut in batch]
    for fut, value, error in results:
        try:
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its waiter; the write itself still happened
