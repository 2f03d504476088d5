"""GET /twilio/media: the bidirectional Media Streams WebSocket.

Where a frame comes from and goes: Twilio sends each 20 ms of the caller's audio as a
JSON text frame; `_StreamConnection.dispatch` parses it (`messages.py`) and hands the
mu-law payload to `CallSession.on_audio` (`session/call_session.py`). Marks and DTMF go
to the session the same way. The way back leaves through the stream's `OutboundPlayer`
(`telephony/outbound.py`), attached to the session as its `AudioOut` port on `start`.

The handshake signature is checked before the upgrade, and the `start` must carry the
call's stream token (`stream_token.py`): an unbound stream (no token, a wrong one, another
call's) is refused with close code 1008 and a reason, counted, logged once, and never
attached to a call, so nothing is billed. A stream with its token for a call this engine
has no webhook for (a restart, another engine answered) is served, unless the call has
ended. A stream refused while its call waits for one ends that call.

Bad input is counted and logged with the call id and the call goes on; a flood, too many
violations or an oversized frame close this one socket with a clear close code. Nothing
here can touch another call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from engine.audio.frames import FRAME_BYTES, FrameAssembler
from engine.config import Config
from engine.log import get_logger
from engine.session.call_session import CallSession
from engine.session.registry import CallRegistry
from engine.session.states import CallState
from engine.telephony.messages import (
    Connected,
    Dtmf,
    Mark,
    Media,
    ProtocolViolation,
    Start,
    Stop,
    parse_inbound,
)
from engine.telephony.outbound import OutboundPlayer, Pacer
from engine.telephony.signature import SignatureChecker
from engine.telephony.stream_token import TOKEN_PARAMETER, StreamTokens

log = get_logger(__name__)

# Logged at warning level per reason per socket; the rest at debug (counted regardless).
_WARN_FIRST = 3


class MediaStreamHandler:
    def __init__(self, config: Config, registry: CallRegistry, pacer: Pacer,
                 signatures: SignatureChecker, stream_tokens: StreamTokens,
                 count_bad: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.registry = registry
        self.pacer = pacer
        self.signatures = signatures
        self.stream_tokens = stream_tokens
        self._count_bad = count_bad or (lambda reason: None)
        self.open_sockets = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.signatures.check_websocket(request):
            log.warning("media.bad_signature", peer=request.remote,
                        has_signature="X-Twilio-Signature" in request.headers)
            self._count_bad("bad_signature")
            raise web.HTTPForbidden(text="invalid or missing X-Twilio-Signature")
        cfg = self.config.engine
        ws = web.WebSocketResponse(max_msg_size=cfg.max_message_bytes, compress=False,
                                   autoping=True)
        try:
            await ws.prepare(request)
        except web.HTTPException as exc:  # signed, but not a WebSocket upgrade
            log.warning("media.bad_handshake", peer=request.remote, status=exc.status,
                        detail=exc.text)
            self._count_bad("bad_handshake")
            raise
        self.open_sockets += 1
        stream = _StreamConnection(self, ws, request)
        try:
            await stream.run()
        finally:
            self.open_sockets -= 1
        return ws


class _StreamConnection:
    """The state of one WebSocket: which call it carries, counters, limits."""

    def __init__(self, handler: MediaStreamHandler, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.h = handler
        self.ws = ws
        self.request = request
        self.session: CallSession | None = None
        self.player: OutboundPlayer | None = None
        self.log = log.bind(call_sid=None, peer=request.remote)
        self.warned: dict[str, int] = {}
        self.bad_total = 0
        self.window_start = time.monotonic()
        self.window_count = 0
        self.frames = FrameAssembler()  # re-frames payloads of other sizes to 20 ms
        self.stopped = False
        self.close_reason = "stream closed without stop"

    async def run(self) -> None:
        cfg = self.h.config.engine
        ws = self.ws
        max_rate = cfg.max_messages_per_second
        try:
            while True:
                timeout = None if self.session is not None else cfg.start_timeout_s
                try:
                    msg = await ws.receive(timeout=timeout)
                except TimeoutError:
                    await self.close(WSCloseCode.POLICY_VIOLATION, "no start message received")
                    break
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    # Flood control: a fixed one-second window is cheap and enough.
                    now = time.monotonic()
                    if now - self.window_start >= 1.0:
                        self.window_start = now
                        self.window_count = 0
                    self.window_count += 1
                    if self.window_count > max_rate:
                        self.bad("flood", f"more than {max_rate} messages/s")
                        await self.close(WSCloseCode.POLICY_VIOLATION, "message rate exceeded")
                        break
                    start = self.dispatch(msg.data)
                    if start is not None:  # the one message whose handling awaits
                        await self.on_start_safely(start)
                    if self.stopped or ws.closed:
                        break
                elif kind is WSMsgType.BINARY:
                    self.bad("binary_frame", "Media Streams sends text frames only")
                elif kind is WSMsgType.ERROR:
                    error = msg.data  # aiohttp has closed the socket (1009 when too big)
                    if isinstance(error, WebSocketError) \
                            and error.code == WSCloseCode.MESSAGE_TOO_BIG:
                        self.bad("oversized_message", f"oversized message: {error}")
                        self.close_reason = "oversized message"
                    else:
                        self.log.warning("media.socket_error", error=repr(error))
                    break
                else:  # CLOSE, CLOSING, CLOSED
                    break
                if self.bad_total > cfg.max_bad_messages:
                    await self.close(WSCloseCode.POLICY_VIOLATION,
                                     "too many malformed messages")
                    break
        finally:
            await self.finish()

    def dispatch(self, data: str) -> Start | None:
        """Handle one text frame; a `start` is returned for the caller to await. Kept
        synchronous: it runs 50 times a second per call."""
        try:
            message = parse_inbound(data, self.h.config.engine.max_media_payload_bytes)
        except ProtocolViolation as exc:
            self.bad(exc.reason, exc.detail)
            return None
        session = self.session
        try:
            if isinstance(message, Media):
                if session is None:
                    self.bad("media_before_start", "media received before start")
                    return None
                self.feed_audio(session, message.payload)
            elif isinstance(message, Mark):
                if session is None:
                    self.bad("mark_before_start", "mark received before start")
                    return None
                session.on_mark(message.name)
            elif isinstance(message, Dtmf):
                if session is None:
                    self.bad("dtmf_before_start", "dtmf received before start")
                    return None
                session.on_dtmf(message.digit)
            elif isinstance(message, Start):
                return message
            elif isinstance(message, Stop):
                self.stopped = True
                self.close_reason = "caller hung up"
                self.log.info("media.stop")
            elif isinstance(message, Connected):
                self.log.debug("media.connected", protocol=message.protocol,
                               version=message.version)
        except Exception:  # a bug in one call's handling must not end the socket loop
            self.bad("internal_error", "handler raised")
            self.log.exception("media.dispatch_failed")
        return None

    async def on_start_safely(self, start: Start) -> None:
        try:
            await self.on_start(start)
        except Exception:
            self.bad("internal_error", "start handler raised")
            self.log.exception("media.dispatch_failed")

    def feed_audio(self, session: CallSession, payload: bytes) -> None:
        if len(payload) == FRAME_BYTES and not self.frames.pending_bytes:
            session.on_audio(payload)  # Twilio's usual 20 ms frame: no list, no copy
            return
        if len(payload) % FRAME_BYTES:
            self.bad("odd_size_payload", f"{len(payload)} bytes (re-framed)")
        for frame in self.frames.push(payload):
            session.on_audio(frame)

    async def on_start(self, start: Start) -> None:
        if self.session is not None:
            self.bad("second_start", "start received twice on one stream")
            return
        self.log = self.log.bind(call_sid=start.call_sid, stream_sid=start.stream_sid)
        session = await self.session_for(start)
        if session is None:
            return
        transport = self.request.transport
        player = self.h.pacer.create_player(start.call_sid, start.stream_sid, self.ws,
                                            transport)
        self.session = session
        self.player = player
        # Parameter names only: the values are the caller's numbers and the call's token.
        self.log.info("media.start", tracks=start.tracks,
                      parameters=sorted(start.custom_parameters) or None)
        if session.awaiting_stream and session.state is not CallState.CONNECTED:
            session.reattach_stream(start.stream_sid, player, self.close_normally)
        else:
            session.attach_stream(start.stream_sid, player, self.close_normally)

    async def session_for(self, start: Start) -> CallSession | None:
        """The call this stream is bound to, or None: the stream was refused."""
        call_sid = start.call_sid
        token = start.custom_parameters.get(TOKEN_PARAMETER, "")
        if not self.h.stream_tokens.valid(call_sid, start.account_sid, token):
            await self.refuse("unbound_stream", "stream token does not match the call"
                              if token else "no stream token", "stream not bound to its call")
            return None
        registry = self.h.registry
        fmt = start.media_format
        if fmt.encoding != "audio/x-mulaw" or fmt.sample_rate != 8000 or fmt.channels != 1:
            await self.refuse("unsupported_format",
                              f"{fmt.encoding} {fmt.sample_rate} Hz x{fmt.channels}",
                              "unsupported media format", WSCloseCode.UNSUPPORTED_DATA)
            waiting = registry.get(call_sid)
            if waiting is not None and (waiting.state is CallState.CONNECTED
                                        or waiting.awaiting_stream):
                await waiting.end("media stream refused: unsupported media format")
            return None
        session = registry.get(call_sid)
        if session is None:
            if await registry.has_ended(call_sid):
                await self.refuse("finished_call", "stream for a call that already ended",
                                  "call already ended")
                return None
            # Bound to its call but not answered here (this engine restarted, or another
            # took the webhook): serve it rather than drop a live caller.
            self.log.info("media.call_adopted", detail="no webhook for this call here")
            params = start.custom_parameters
            session = registry.create(call_sid, params.get("from", ""), params.get("to", ""))
        if session.state is not CallState.CONNECTED and not session.awaiting_stream:
            # Another stream carries this call: only the duplicate is refused (a replayed
            # stream must not be able to end a live call).
            await self.refuse("stream_already_attached", f"call is {session.state.value}",
                              "call already has a media stream")
            return None
        return session

    async def refuse(self, reason: str, detail: str, message: str,
                     code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        """Refuse this stream at its `start` (nothing attached): counted, one warning
        line, closed with `code` and `message` as the reason."""
        self.h._count_bad(reason)
        self.log.warning("media.stream_refused", reason=reason, detail=detail,
                         code=int(code), close_reason=message)
        self.close_reason = message
        await self._close_socket(code, message)

    def bad(self, reason: str, detail: str) -> None:
        self.bad_total += 1
        n = self.warned.get(reason, 0) + 1
        self.warned[reason] = n
        if self.session is not None:
            self.session.count_bad_message(reason)
        self.h._count_bad(reason)
        if n <= _WARN_FIRST:
            self.log.warning("media.bad_message", reason=reason, detail=detail, count=n)
        else:
            self.log.debug("media.bad_message", reason=reason, detail=detail, count=n)

    async def close_normally(self, reason: str) -> None:
        """The session's `EndStream`: the engine ends the stream (it hung up)."""
        await self.close(WSCloseCode.OK, reason)

    async def close(self, code: int, message: str) -> None:
        self.close_reason = message
        if not self.ws.closed:
            # A normal close (the engine hung up) is routine; anything else is a warning.
            (self.log.info if code == 1000 else self.log.warning)(
                "media.closing", code=int(code), reason=message)
            await self._close_socket(code, message)

    async def _close_socket(self, code: int, message: str) -> None:
        if not self.ws.closed:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(self.ws.close(code=code, message=message.encode()),
                                       timeout=2.0)

    async def finish(self) -> None:
        session = self.session
        if session is None:
            return
        if self.player is not None:
            self.player.close()
        if session.voice.player is not self.player:
            return  # a newer stream of this call has taken over
        if session.awaiting_stream and not session.ended:
            self.log.info("media.stream_replaced", detail="Twilio plays our <Say>, then "
                                                          "reconnects")
            session.stream_lost_while_awaiting()
            return
        if not session.ended:
            if session.state is CallState.TRANSFERRING:
                reason = "transferred"
            else:
                reason = session.hangup_reason or self.close_reason
            await session.end(reason)
