"""Where usage goes: the bill of the call a provider request works for.

The chains are shared by every call, and a request may finish in the background after its
caller stopped waiting (see `engine.providers.drains`), so a request cannot ask "whose
call is running now" when it ends. Instead the session binds its bill (a `UsageSink`) in
the context of every task it starts; a chain reads it once, when a request starts, and
books everything that request costs to it, however and whenever it ends.

Only the chains book provider usage (`engine.providers.chain`); the session books what
it spends itself (Twilio's own <Say>, a cache hit) through the same sink, so each usage
is booked exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from engine.log import get_logger
from engine.providers.base import Usage

log = get_logger(__name__)

UsageSink = Callable[[Usage], None]


def _unattributed(usage: Usage) -> None:
    # No call bound its bill: a provider used outside a call (a script, a test).
    log.warning("usage outside any call is on no bill", provider=usage.provider,
                kind=usage.kind, model=usage.model, estimated=usage.estimated)


_sink: ContextVar[UsageSink] = ContextVar("usage_sink", default=_unattributed)


def bind_sink(sink: UsageSink) -> None:
    """Book the usage of requests started from this context on `sink` (the session calls
    it in the context of each task it spawns)."""
    _sink.set(sink)


def current_sink() -> UsageSink:
    """The bill requests started from here go on (read once, when a request starts)."""
    return _sink.get()


@contextmanager
def bill_to(sink: UsageSink) -> Iterator[None]:
    """Book on `sink` the requests started inside the block (work a call does in a task
    that is not its own, such as a supervisor's command)."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
