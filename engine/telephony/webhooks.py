"""Twilio HTTP webhooks: the voice webhook (answers TwiML) and the status callbacks.

Every request must carry a valid X-Twilio-Signature over the public URL; a missing or
wrong one gets 403 and a warning line.

A new call is connected to a media stream unless the engine's `CallGate` says otherwise
(the budget is exhausted): then it is forwarded (<Dial> the human number) or refused
(<Say> a short line, <Hangup/>), and no session is made for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from engine.config import Config
from engine.log import get_logger
from engine.session.registry import CallRegistry
from engine.telephony import twiml
from engine.telephony.signature import SignatureChecker

log = get_logger(__name__)

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
                 accepting: Callable[[], bool] = lambda: True,
                 count_bad: Callable[[str], None] | None = None,
                 gate: CallGate | None = None) -> None:
        self.config = config
        self.registry = registry
        self.signatures = signatures
        self._accepting = accepting
        self._count_bad = count_bad or (lambda reason: None)
        self._gate = gate or _OpenGate()

    async def _signed_form(self, request: web.Request) -> MultiDictProxy[str]:
        if request.method == "GET":
            # A webhook configured as GET: the parameters are in the signed URL itself.
            params: MultiDict[str] = MultiDict()
            fields = MultiDict(request.query)
        else:
            form = await request.post()
            # Twilio posts plain form fields; a file upload here is not Twilio.
            params = MultiDict((k, v) for k, v in form.items() if isinstance(v, str))
            fields = params
        if not self.signatures.check_webhook(request, params):
            log.warning("webhook.bad_signature", path=request.path, peer=request.remote,
                        call_sid=params.get("CallSid"),
                        has_signature="X-Twilio-Signature" in request.headers)
            self._count_bad("bad_signature")
            raise web.HTTPForbidden(text="invalid or missing X-Twilio-Signature")
        return MultiDictProxy(fields)

    async def voice(self, request: web.Request) -> web.Response:
        form = await self._signed_form(request)
        call_sid = form.get("CallSid", "")
        if not call_sid.startswith("CA"):
            log.warning("webhook.bad_request", path=request.path, call_sid=call_sid or None)
            raise web.HTTPBadRequest(text="CallSid missing or malformed")
        from_number, to_number = form.get("From", ""), form.get("To", "")
        clog = log.bind(call_sid=call_sid)
        if self.registry.is_ended(call_sid):
            clog.warning("webhook.voice_for_ended_call")
            raise web.HTTPConflict(text="call already ended")
        if not self._accepting():
            clog.warning("webhook.voice_rejected", reason="engine not accepting calls")
            return web.Response(text=twiml.reject_busy(), content_type=twiml.TWIML_CONTENT_TYPE)
        answer = self._gate.admission()
        if answer != "connect" and self.registry.get(call_sid) is None:
            return self._turn_away(call_sid, answer)
        self.registry.create(call_sid, from_number, to_number)
        base = self.config.public_base_url()
        document = twiml.connect_stream(
            self.config.media_stream_url(), base + "/twilio/stream-status",
            twiml.stream_parameters(call_sid, from_number, to_number))
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
