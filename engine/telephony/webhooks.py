"""Twilio HTTP webhooks: the voice webhook (answers TwiML) and the status callbacks.

Every request must carry a valid X-Twilio-Signature over the public URL; a missing or
wrong one gets 403 and a warning line. The signature is checked before the body is
trusted: the raw body is decoded leniently and parsed as the form Twilio signed, and
only then used. Whatever is malformed (too large, not a form, not UTF-8) gets a 4xx and
one warning line, never a traceback.

The TwiML of a connected call carries the call's stream token (`stream_token.py`), which
its media stream must present. A webhook for a call that has ended (a replay, also long
after: the call history is asked) is answered with <Hangup/>; the call is not revived.

While the engine drains (a rolling restart) a new call is answered 503, so that Twilio
uses the number's fallback URL; a call already taken goes on.

A new call is connected to a media stream unless the engine's `CallGate` says otherwise
(the budget is exhausted): then it is forwarded (<Dial> the human number) or refused
(<Say> a short line, <Hangup/>), and no session is made for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NoReturn, Protocol
from urllib.parse import parse_qsl

from aiohttp import hdrs, web
from multidict import MultiDict, MultiDictProxy

from engine.config import Config
from engine.log import get_logger
from engine.session.registry import CallRegistry
from engine.telephony import twiml
from engine.telephony.signature import SignatureChecker
from engine.telephony.stream_token import StreamTokens

log = get_logger(__name__)

# Twilio's webhooks are a few kilobytes; larger bodies get 413 (unread when their
# length is declared).
MAX_BODY_BYTES = 64 * 1024
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

_FINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})

# What the voice webhook does with a new call.
Admission = Literal["connect", "forward", "refuse"]


class CallGate(Protocol):
    """Whether new calls are taken (the engine's budget decides)."""

    def admission(self) -> Admission: ...

    def call_turned_away(self, call_sid: str, answer: Admission) -> None:
        """A new call was forwarded or refused with TwiML alone (no session)."""


class _OpenGate:
    def admission(self) -> Admission:
        return "connect"

    def call_turned_away(self, call_sid: str, answer: Admission) -> None:
        return None


class TwilioWebhooks:
    def __init__(self, config: Config, registry: CallRegistry, signatures: SignatureChecker,
                 stream_tokens: StreamTokens, accepting: Callable[[], bool] = lambda: True,
                 count_bad: Callable[[str], None] | None = None,
                 gate: CallGate | None = None,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.registry = registry
        self.signatures = signatures
        self.stream_tokens = stream_tokens
        self._accepting = accepting
        self._count_bad = count_bad or (lambda reason: None)
        self._gate = gate or _OpenGate()
        self._draining = draining

    async def _signed_form(self, request: web.Request) -> MultiDictProxy[str]:
        if request.method == "GET":
            # A webhook configured as GET: the parameters are in the signed URL itself.
            params: MultiDict[str] = MultiDict()
            fields = MultiDict(request.query)
        else:
            params = fields = await self._form(request)
        if not self.signatures.check_webhook(request, params):
            log.warning("webhook.bad_signature", path=request.path, peer=request.remote,
                        call_sid=params.get("CallSid", "")[:64] or None,
                        has_signature="X-Twilio-Signature" in request.headers)
            self._count_bad("bad_signature")
            raise web.HTTPForbidden(text="invalid or missing X-Twilio-Signature")
        return MultiDictProxy(fields)

    async def _form(self, request: web.Request) -> MultiDict[str]:
        """The POSTed form as Twilio signed it, parsed without trusting it: read within
        the size limit, decoded with bad bytes replaced (the signature then fails)."""
        size = request.content_length
        if size is not None and size >= MAX_BODY_BYTES:
            self._refuse_too_large(request, size)
        content_type = request.headers.get(hdrs.CONTENT_TYPE)
        if content_type is not None and request.content_type != _FORM_CONTENT_TYPE:
            log.warning("webhook.bad_request", path=request.path, peer=request.remote,
                        reason="not a form", content_type=request.content_type[:80])
            self._count_bad("not_a_form")
            raise web.HTTPUnsupportedMediaType(text=f"expected {_FORM_CONTENT_TYPE}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # sent without a length (chunked)
            self._refuse_too_large(request, request.content_length)
        except ConnectionResetError:  # the sender went away before its body was complete
            log.warning("webhook.bad_request", path=request.path, peer=request.remote,
                        reason="body incomplete", size=request.content_length)
            self._count_bad("body_incomplete")
            raise web.HTTPBadRequest(text="request body incomplete") from None
        text = body.decode("utf-8", errors="replace")
        return MultiDict(parse_qsl(text, keep_blank_values=True, errors="replace"))

    def _refuse_too_large(self, request: web.Request, size: int | None) -> NoReturn:
        log.warning("webhook.body_too_large", path=request.path, peer=request.remote,
                    size=size, limit=MAX_BODY_BYTES)
        self._count_bad("body_too_large")
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=size or 0)

    async def voice(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request)
        call_sid = form.get("CallSid", "")
        if not call_sid.startswith("CA"):
            log.warning("webhook.bad_request", path=request.path, call_sid=call_sid or None,
                        reason="CallSid missing or malformed")
            raise web.HTTPBadRequest(text="CallSid missing or malformed")
        from_number, to_number = form.get("From", ""), form.get("To", "")
        clog = log.bind(call_sid=call_sid)
        if await self.registry.has_ended(call_sid):
            # A replay (or a late retry): the call stays over, whatever this says.
            clog.warning("webhook.voice_for_ended_call", status=form.get("CallStatus"))
            self._count_bad("ended_call_webhook")
            return web.Response(text=twiml.hang_up(), content_type=twiml.TWIML_CONTENT_TYPE)
        if self._draining() and self.registry.get(call_sid) is None:
            # A non-2xx makes Twilio try the number's fallback URL (or a load balancer
            # the next engine): a new call goes elsewhere while this engine drains.
            clog.info("webhook.voice_refused_draining")
            return web.Response(status=503, text="engine draining\n",
                                headers={"Retry-After": "1"})
        if not self._accepting():
            clog.warning("webhook.voice_rejected", reason="engine not accepting calls")
            return web.Response(text=twiml.reject_busy(), content_type=twiml.TWIML_CONTENT_TYPE)
        answer = self._gate.admission()
        if answer != "connect" and self.registry.get(call_sid) is None:
            return self._turn_away(call_sid, answer)
        self.registry.create(call_sid, from_number, to_number)
        base = self.config.public_base_url()
        token = self.stream_tokens.issue(call_sid, form.get("AccountSid", ""))
        document = twiml.connect_stream(
            self.config.media_stream_url(), base + "/twilio/stream-status",
            twiml.stream_parameters(call_sid, from_number, to_number, token))
        clog.info("webhook.voice", from_number=from_number, to_number=to_number,
                  status=form.get("CallStatus"), direction=form.get("Direction"))
        return web.Response(text=document, content_type=twiml.TWIML_CONTENT_TYPE)

    def _turn_away(self, call_sid: str, answer: Admission) -> web.Response:
        transfer = self.config.transfer
        if answer == "forward" and transfer.number:
            document = twiml.transfer(transfer.announcement, transfer.number,
                                      transfer.caller_id)
        else:  # refuse (or forward with nowhere to forward to)
            answer = "refuse"
            document = twiml.say_and_hang_up(self.config.budget.refuse_message)
        log.info("webhook.voice_turned_away", call_sid=call_sid, answer=answer,
                 reason="budget exhausted")
        self._gate.call_turned_away(call_sid, answer)
        return web.Response(text=document, content_type=twiml.TWIML_CONTENT_TYPE)

    async def call_status(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request)
        call_sid = form.get("CallSid", "")
        status = form.get("CallStatus", "")
        clog = log.bind(call_sid=call_sid)
        session = self.registry.get_any(call_sid)
        clog.info("webhook.call_status", status=status, duration=form.get("CallDuration"),
                  sequence=form.get("SequenceNumber"), known=session is not None)
        if session is not None and status:
            session.twilio_status = status
            if status in _FINAL_CALL_STATUSES and not session.ended:
                await session.end(f"twilio status {status}")
        return web.Response(status=204)

    async def stream_status(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request)
        call_sid = form.get("CallSid", "")
        event = form.get("StreamEvent", "")
        clog = log.bind(call_sid=call_sid)
        if event == "stream-error":
            clog.warning("webhook.stream_error", error=form.get("StreamError"),
                         stream_sid=form.get("StreamSid"))
        else:
            clog.info("webhook.stream_status", stream_event=event,
                      stream_sid=form.get("StreamSid"))
        return web.Response(status=204)
