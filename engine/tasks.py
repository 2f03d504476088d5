"""Stopping a background task without letting shutdown hang on it.

`stop_task` cancels the task and waits for it a bounded time: a task that does not end
(stuck in a call that ignores cancellation) is logged once, with where it is, and left
behind, so an engine's stop always finishes. It never swallows the caller's own
cancellation, which `with suppress(CancelledError): await task` would.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

from engine.log import get_logger

log = get_logger(__name__)

STOP_WAIT_S = 5.0


async def stop_task(task: asyncio.Task[Any] | None, timeout_s: float = STOP_WAIT_S) -> bool:
    """Cancel `task` and wait up to `timeout_s` for it to end; False (and one log line)
    when it did not."""
    if task is None:
        return True
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=timeout_s)
    if not task.done():
        where = [line.strip() for frame in task.get_stack(limit=3)
                 for line in traceback.format_stack(frame, limit=1)]
        log.warning("engine.task_did_not_stop", task=task.get_name(), waited_s=timeout_s,
                    where=where)
        return False
    if not task.cancelled():
        task.exception()  # seen: it ended with its own error while being stopped
    return True
