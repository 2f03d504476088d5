"""Call control over Twilio's REST API: the `CallControl` port the session declares.

Every action updates the live call through the official SDK: new TwiML (a transfer, or
Twilio's own <Say> followed by a new media stream, bound to the call by its stream token)
or `status=completed` (hang up).
Uses `AsyncTwilioHttpClient` so REST calls never block the event loop. The API base URL
is configurable: Twilio regions/edges, or a local stand-in in tests and the demo.
"""

from __future__ import annotations

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from engine.config import Config
from engine.log import get_logger
from engine.session.ports import ControlResult
from engine.telephony import twiml
from engine.telephony.stream_token import StreamTokens

log = get_logger(__name__)

CALL_NOT_FOUND = 20404


class TwilioCallControl:
    """Transfer, say-then-reconnect or hang up a live call."""

    def __init__(self, account_sid: str, auth_token: str, api_base_url: str,
                 stream_tokens: StreamTokens, timeout_s: float = 5.0, *, stream_url: str = "",
                 stream_status_url: str = "", caller_id: str = "") -> None:
        self._http = AsyncTwilioHttpClient(timeout=timeout_s)
        self._client = Client(account_sid or "AC" + "0" * 32, auth_token or "unset",
                              http_client=self._http)
        # Every REST domain we use lives under `api`; point it at the configured base.
        self._client.api.base_url = api_base_url.rstrip("/")
        self.configured = bool(account_sid and auth_token)
        # A call we update lives under this account (the REST URL names it): its new
        # stream's token is issued for it.
        self._account_sid = account_sid
        self._stream_tokens = stream_tokens
        self._stream_url = stream_url  # where a reconnecting call opens its new stream
        self._stream_status_url = stream_status_url
        self._caller_id = caller_id  # shown to the human a transfer dials

    @classmethod
    def from_config(cls, config: Config, stream_tokens: StreamTokens) -> TwilioCallControl:
        tw = config.twilio
        return cls(tw.account_sid, tw.auth_token.get_secret_value(), tw.api_base_url,
                   stream_tokens, tw.rest_timeout_s, stream_url=config.media_stream_url(),
                   stream_status_url=config.public_base_url() + "/twilio/stream-status",
                   caller_id=config.transfer.caller_id)

    async def say_then_reconnect(self, call_sid: str, text: str, from_number: str,
                                 to_number: str) -> ControlResult:
        document = twiml.say_then_reconnect(
            text, self._stream_url, self._stream_status_url,
            twiml.stream_parameters(call_sid, from_number, to_number,
                                    self._stream_tokens.issue(call_sid, self._account_sid)))
        return await self._update(call_sid, twiml=document)

    async def transfer(self, call_sid: str, number: str, announcement: str) -> ControlResult:
        document = twiml.transfer(announcement, number, self._caller_id)
        return await self._update(call_sid, twiml=document)

    async def hang_up(self, call_sid: str) -> ControlResult:
        return await self._update(call_sid, status="completed")

    async def _update(self, call_sid: str, **kwargs: str) -> ControlResult:
        clog = log.bind(call_sid=call_sid)
        try:
            await self._client.calls(call_sid).update_async(**kwargs)
        except TwilioRestException as exc:
            if exc.status == 404 or exc.code == CALL_NOT_FOUND:
                clog.info("twilio.call_already_ended", action=list(kwargs))
                return ControlResult(ok=True, already_ended=True, status=exc.status,
                                     code=exc.code)
            clog.warning("twilio.rest_error", status=exc.status, code=exc.code, msg=exc.msg)
            return ControlResult(ok=False, status=exc.status, code=exc.code, error=str(exc.msg))
        except (TwilioException, OSError, TimeoutError) as exc:
            clog.warning("twilio.rest_unreachable", error=str(exc) or type(exc).__name__)
            return ControlResult(ok=False, error=str(exc) or type(exc).__name__)
        clog.info("twilio.call_updated", action=list(kwargs))
        return ControlResult(ok=True, status=200)

    async def aclose(self) -> None:
        await self._http.close()
