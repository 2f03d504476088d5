"""Stopping background tasks: an engine's stop never hangs on one that ignores its
cancellation, and never swallows its own."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from engine.tasks import stop_task


async def _stubborn(release: asyncio.Event) -> None:
    """A task that ignores cancellation until released (a library call that swallows it)."""
    while not release.is_set():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            continue


async def test_a_task_that_ignores_cancellation_is_left_behind_with_one_log_line() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(_stubborn(release), name="stubborn")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        started = asyncio.get_running_loop().time()
        assert await stop_task(task, timeout_s=0.2) is False
        assert asyncio.get_running_loop().time() - started < 1.0
    [line] = [entry for entry in logs if entry["event"] == "engine.task_did_not_stop"]
    assert line["task"] == "stubborn" and any("stubborn" in w for w in line["where"])
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()


async def test_a_task_that_stops_is_awaited_and_its_error_seen() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            raise RuntimeError("cleanup failed")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    assert await stop_task(task) is True and task.done()
    assert await stop_task(None) is True


async def test_the_stopper_s_own_cancellation_is_not_swallowed() -> None:
    release = asyncio.Event()
    inner = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    outer = asyncio.create_task(stop_task(inner, timeout_s=30))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    release.set()
    inner.cancel()
    await asyncio.wait({inner}, timeout=1)
    assert inner.done()
