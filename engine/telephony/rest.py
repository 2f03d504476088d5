"""Twilio REST control of a live call (transfer, hang up) through the official SDK.

Uses `AsyncTwilioHttpClient` so REST calls never block the event loop. The API base URL
is configurable: Twilio regions/edges, or a local stand-in in tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from engine.log import get_logger

log = get_logger(__name__)

CALL_NOT_FOUND = 20404


@dataclass(slots=True)
class RestResult:
    ok: bool
    already_ended: bool = False
    status: int | None = None
    code: int | None = None
    error: str | None = None


class TwilioCallControl:
    """Update live calls: transfer with new TwiML, or hang up."""

    def __init__(self, account_sid: str, auth_token: str, api_base_url: str,
                 timeout_s: float = 5.0) -> None:
        self._http = AsyncTwilioHttpClient(timeout=timeout_s)
        self._client = Client(account_sid or "AC" + "0" * 32, auth_token or "unset",
                              http_client=self._http)
        # Every REST domain we use lives under `api`; point it at the configured base.
        self._client.api.base_url = api_base_url.rstrip("/")
        self.configured = bool(account_sid and auth_token)

    async def update_twiml(self, call_sid: str, twiml: str) -> RestResult:
        return await self._update(call_sid, twiml=twiml)

    async def hang_up(self, call_sid: str) -> RestResult:
        return await self._update(call_sid, status="completed")

    async def _update(self, call_sid: str, **kwargs: str) -> RestResult:
        clog = log.bind(call_sid=call_sid)
        try:
            await self._client.calls(call_sid).update_async(**kwargs)
        except TwilioRestException as exc:
            if exc.status == 404 or exc.code == CALL_NOT_FOUND:
                clog.info("twilio.call_already_ended", action=list(kwargs))
                return RestResult(ok=True, already_ended=True, status=exc.status, code=exc.code)
            clog.warning("twilio.rest_error", status=exc.status, code=exc.code, msg=exc.msg)
            return RestResult(ok=False, status=exc.status, code=exc.code, error=str(exc.msg))
        except (TwilioException, OSError, TimeoutError) as exc:
            clog.warning("twilio.rest_unreachable", error=str(exc) or type(exc).__name__)
            return RestResult(ok=False, error=str(exc) or type(exc).__name__)
        clog.info("twilio.call_updated", action=list(kwargs))
        return RestResult(ok=True, status=200)

    async def aclose(self) -> None:
        await self._http.close()
