"""structlog setup: JSON lines when not on a terminal, readable on a terminal.

Modules take `log = get_logger(__name__)` and bind `call_sid` for every line about a call.

Private data (`logging.redact`, on by default): every line goes through `redact`, which
goes by the names of its fields, so name them after what they hold. A phone number
(`number`, `from`, `to`, `caller`, `called` or any `*_number`, also inside a dict such as
a stream's parameters) keeps only its last digits; a transcript (`text`, `transcript` or
any `*_text`) and DTMF keys (`digit`, `digits`) are replaced by their length; any other
text has E.164 numbers in it masked. The history keeps numbers and transcripts whole.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

_NUMBER_FIELDS = frozenset({"number", "from", "to", "caller", "called"})
# DTMF keys are what the caller typed (an account number, a PIN): kept out like words.
_TRANSCRIPT_FIELDS = frozenset({"text", "transcript", "digit", "digits"})
_E164 = re.compile(r"\+\d{7,15}")
_NESTED_DEPTH = 2  # dicts and lists inside a field are looked into this deep


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None,
                      redact: bool = True) -> None:
    """Configure structlog once per process. `fmt`: auto | json | console. `redact`:
    mask phone numbers and leave transcripts out (`logging.redact`)."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty")
                                       and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=True) if use_console
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            *([redact_private] if redact else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(),
                                                                        logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """The module's logger; bind `call_sid=` for lines about a call."""
    return structlog.get_logger(name)


def mask_number(value: str) -> str:
    """A phone number with all but its last digits masked ('+15550100001' ->
    '+********001'); a caller id without digits (a client name) is masked whole."""
    digits = sum(ch.isdigit() for ch in value)
    if digits < 4:
        return "***" if value else value
    keep = 3 if digits >= 7 else 2
    masked, seen = [], 0
    for ch in value:
        if ch.isdigit():
            seen += 1
            masked.append(ch if seen > digits - keep else "*")
        else:
            masked.append(ch)
    return "".join(masked)


def redact_private(_logger: Any, _method: str,
                   event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor behind `logging.redact` (see the module's docstring)."""
    for key, value in event.items():
        event[key] = _redacted(key, value, 0)
    return event


def _redacted(key: Any, value: Any, depth: int) -> Any:
    name = key.lower() if isinstance(key, str) else ""
    if isinstance(value, str):
        if name in _TRANSCRIPT_FIELDS or name.endswith("_text"):
            return f"<{len(value)} chars>" if value else value
        if name in _NUMBER_FIELDS or name.endswith("_number"):
            return mask_number(value)
        return _E164.sub(lambda m: mask_number(m.group()), value) if "+" in value else value
    if depth < _NESTED_DEPTH:
        if isinstance(value, dict):
            return {k: _redacted(k, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [_redacted(key, v, depth + 1) for v in value]
    return value
