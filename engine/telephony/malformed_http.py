"""aiohttp's own refusals of malformed HTTP, logged as one warning line.

A request too broken for any handler to see (a bad chunk size, a header or URL over
8 KiB, a bad request line) is answered 400 by aiohttp's parser, which logs it on the
`aiohttp.server` logger as an error with a traceback. Such requests are the internet's
background noise, not faults of the engine: this filter logs each as one structured
warning line instead and drops the traceback. Every other record passes untouched.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from engine.log import get_logger

log = get_logger(__name__)


class _MalformedHttpFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        log.warning("http.malformed_request", peer=args[0] if args else None,
                    status=exc.code or 400, error=type(exc).__name__,
                    detail=str(exc.message).strip()[:200])
        return False


_FILTER = _MalformedHttpFilter()


def log_malformed_http_as_warnings() -> None:
    """Install the filter (once per process, however many engines it runs)."""
    server_log = logging.getLogger("aiohttp.server")
    if _FILTER not in server_log.filters:
        server_log.addFilter(_FILTER)
