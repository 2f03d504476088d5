"""Twilio's side of one simulated call: the wire to the engine and the playout of its audio.

It signs and posts the voice webhook, reads the TwiML, opens the signed Media Streams
WebSocket and sends `connected`/`start`. Then, every 20 ms, it plays one frame of what the
engine sent, as Twilio does (each mark is echoed when the audio before it has played;
`clear` drops the queued audio and echoes the pending marks at once), and sends one frame
of the caller's audio (queued speech, else line silence) and any DTMF digit pressed. When
the engine updates the call through the REST API it ends the stream (a transfer or a
hang-up) — or, for a <Say> then a new <Connect><Stream>, speaks and opens a new stream
for the same call.

The scripted caller (`engine/sim/caller.py`) queues speech and digits here and reads the
agent-audio counters to know when the agent has answered and gone quiet.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import xml.etree.ElementTree as ET
from base64 import b64decode, b64encode
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from engine.audio.codec import ULAW_SILENCE
from engine.audio.frames import FRAME_BYTES, FRAME_S
from engine.log import get_logger
from engine.sim.call_result import CallResult
from engine.sim.scenario import Scenario
from engine.sim.standins.twilio_api import TwilioApiStandIn
from engine.telephony.signature import sign

log = get_logger(__name__)

SILENCE = bytes([ULAW_SILENCE]) * FRAME_BYTES
# Agent audio that comes again this soon after the playout ran dry was one reply with a
# break in it (an underrun); later, it is the next reply (callers wait 1 s of quiet).
UNDERRUN_WINDOW_S = 1.0
_MEDIA_HEAD = '{"event":"media","sequenceNumber":"'
_MEDIA_CHUNK = '","media":{"track":"inbound","chunk":"'


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class TwilioSide:
    """Twilio's half of one call, writing what happens into `result`."""

    def __init__(self, result: CallResult, *, engine_url: str, public_url: str,
                 auth_token: str, account_sid: str,
                 rest: TwilioApiStandIn | None = None) -> None:
        self.result = result
        self.engine_url = engine_url
        self.public_url = public_url
        self.auth_token = auth_token
        self.account_sid = account_sid
        self.rest = rest
        self.call_sid = result.call_sid
        self.stream_sid = result.stream_sid
        self.log = log.bind(call_sid=self.call_sid)
        self.closed = asyncio.Event()  # the call is over, whoever ended it
        # Twilio's playout buffer: frames (bytes) and marks (str), in order.
        self.playout: deque[bytes | str] = deque()
        self._was_playing = False
        self._ran_dry_at: float | None = None
        # When each underrun's audio came again (monotonic): the benches match them with
        # the engine's and the callers' own loop stalls.
        self.underrun_at: list[float] = []
        self.reconnecting = False  # between two streams, while Twilio speaks a <Say>
        self.last_agent_frame_at = 0.0
        # Agent frames since the caller's last line began or ended (the caller resets it).
        self.agent_frames_since_line = 0
        # Caller -> engine audio not yet sent, and digits not yet pressed.
        self._speech = bytearray()
        self._speech_pos = 0
        self._dtmf: deque[str] = deque()
        self._seq = 0
        self._chunk = 0
        self._sid_json = json.dumps(self.stream_sid)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None

    # -- what the scripted caller uses ---------------------------------------------------

    async def dial(self, http: aiohttp.ClientSession, scenario: Scenario) -> None:
        """Ring the engine (signed webhook), open the stream its TwiML names, start the
        20 ms tick and the receiver."""
        self._http = http
        await self._answer_webhook(scenario)
        if self.rest is not None:
            self.rest.register_call(self.call_sid, scenario.from_number, scenario.to_number,
                                    listener=self._on_rest_update)
        await self._open_stream()
        self._ticker = asyncio.create_task(self._tick(), name="sim-tick")
        self._receiver = asyncio.create_task(self._receive(), name="sim-recv")

    async def stop(self) -> None:
        """Stop the tick and the receiver (the call is over or being abandoned)."""
        tasks = [task for task in (self._ticker, self._receiver) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()

    def queue_speech(self, ulaw: bytes) -> None:
        """Send `ulaw` after what is still queued, padded to whole frames with silence."""
        if self._speech_pos >= len(self._speech):
            self._speech.clear()
            self._speech_pos = 0
        self._speech += ulaw
        self._speech += SILENCE[:(-len(self._speech)) % FRAME_BYTES]

    @property
    def speech_pending(self) -> bool:
        return self._speech_pos < len(self._speech)

    def press(self, digit: str) -> None:
        self._dtmf.append(digit)

    async def hang_up(self) -> None:
        if self.closed.is_set() or self._ws is None:
            return
        await self._send_stop()
        self.result.ended_by = self.result.ended_by or "caller"
        await self._ws.close()
        self.closed.set()

    async def post_status(self, status: str) -> None:
        """The status callback Twilio posts when the call is over."""
        assert self._http is not None
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid,
                "CallStatus": status, "CallDuration": str(int(self.result.duration_s)),
                "SequenceNumber": "0", "StatusCallbackEvent": status}
        target, headers = self._signed("/twilio/status", form)
        try:
            async with self._http.post(target, data=form, headers=headers) as resp:
                await resp.read()
        except aiohttp.ClientError as exc:
            self.log.debug("sim.status_callback_failed", error=str(exc))

    # -- webhook and stream --------------------------------------------------------------

    def _signed(self, path: str, form: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Where to post `form`, and its signature for the URL the engine believes in."""
        signature = sign(self.auth_token, self.public_url + path, form)
        return self.engine_url + path, {"X-Twilio-Signature": signature}

    async def _answer_webhook(self, scenario: Scenario) -> None:
        assert self._http is not None
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid,
                "From": scenario.from_number, "To": scenario.to_number,
                "CallStatus": "ringing", "ApiVersion": "2010-04-01", "Direction": "inbound"}
        target, headers = self._signed("/twilio/voice", form)
        async with self._http.post(target, data=form, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"voice webhook answered {resp.status}: {body[:200]}")
            if not resp.content_type.endswith("xml"):
                raise RuntimeError(f"voice webhook answered {resp.content_type}, not TwiML")
        self.result.twiml = body
        stream = ET.fromstring(body).find("./Connect/Stream")
        if stream is None or not stream.get("url"):
            raise RuntimeError(f"TwiML has no <Connect><Stream url>: {body[:200]}")
        self._use_stream(stream)

    def _use_stream(self, stream: ET.Element) -> None:
        """Take the stream URL and custom parameters from a <Connect><Stream> element."""
        self.result.stream_url = stream.get("url", self.result.stream_url)
        self.result.parameters = {p.get("name", ""): p.get("value", "")
                                  for p in stream.findall("Parameter")}

    async def _open_stream(self) -> None:
        assert self._http is not None
        self.result.streams += 1
        self._sid_json = json.dumps(self.stream_sid)
        stream_url = self.result.stream_url
        # Sign the URL exactly as written in the TwiML; connect to where the engine is.
        path = urlsplit(stream_url).path or "/twilio/media"
        eng = urlsplit(self.engine_url)
        ws_url = urlunsplit(("wss" if eng.scheme == "https" else "ws", eng.netloc, path, "", ""))
        headers = {"X-Twilio-Signature": sign(self.auth_token, stream_url, {})}
        self._ws = await self._http.ws_connect(ws_url, headers=headers, autoping=True,
                                               max_msg_size=1 << 20)
        await self._send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send_json({
            "event": "start", "sequenceNumber": str(self._next_seq()),
            "start": {"accountSid": self.account_sid, "streamSid": self.stream_sid,
                      "callSid": self.call_sid, "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                      "channels": 1},
                      "customParameters": self.result.parameters},
            "streamSid": self.stream_sid})

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send_json(self, message: dict[str, Any]) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(json.dumps(message))

    async def _send_stop(self) -> None:
        await self._send_json({"event": "stop", "sequenceNumber": str(self._next_seq()),
                               "streamSid": self.stream_sid,
                               "stop": {"accountSid": self.account_sid,
                                        "callSid": self.call_sid}})

    # -- every 20 ms ---------------------------------------------------------------------

    async def _tick(self) -> None:
        """Every 20 ms: play one frame of what the engine sent; send one frame of ours."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while not self.closed.is_set():
            await self._play_one_frame()
            # Between two streams (Twilio is speaking a <Say>) nothing goes out.
            if not self.reconnecting and not await self._send_one_frame():
                break
            next_tick += FRAME_S
            delay = next_tick - loop.time()
            if delay < -0.2:
                next_tick = loop.time()  # the machine stalled: don't burst to catch up
            await asyncio.sleep(max(0.0, delay))

    async def _play_one_frame(self) -> None:
        """Playout, as Twilio does it: one frame per 20 ms, marks when reached."""
        frame = self.playout.popleft() if self.playout else None
        self.result.heard += frame if isinstance(frame, bytes) else SILENCE
        if isinstance(frame, bytes):
            self._ran_dry_at = None
            self._was_playing = True
        elif self._was_playing:  # the agent's audio stopped: an end, or an underrun
            self._was_playing = False
            self._ran_dry_at = time.monotonic()
        while self.playout and isinstance(self.playout[0], str):
            name = self.playout.popleft()
            assert isinstance(name, str)
            await self._echo_mark(name)

    async def _send_one_frame(self) -> bool:
        """A pressed digit, then one frame: speech if queued, otherwise line silence.
        False when the stream is gone for good."""
        if self._dtmf:
            digit = self._dtmf.popleft()
            await self._send_json({"event": "dtmf", "streamSid": self.stream_sid,
                                   "sequenceNumber": str(self._next_seq()),
                                   "dtmf": {"track": "inbound_track", "digit": digit}})
        if self._speech_pos < len(self._speech):
            out = bytes(self._speech[self._speech_pos:self._speech_pos + FRAME_BYTES])
            self._speech_pos += FRAME_BYTES
        else:
            out = SILENCE
        self._chunk += 1
        msg = (_MEDIA_HEAD + str(self._next_seq()) + _MEDIA_CHUNK + str(self._chunk)
               + '","timestamp":"' + str(self._chunk * 20) + '","payload":"'
               + b64encode(out).decode() + '"},"streamSid":' + self._sid_json + "}")
        ws = self._ws
        if ws is None or ws.closed:
            if not self.reconnecting:
                return False
            ws = None  # between two streams: nothing to send to
        if ws is not None:
            try:
                await ws.send_str(msg)
            except (ConnectionError, RuntimeError):
                if not self.reconnecting:
                    return False
        self.result.frames_sent += 1
        return True

    async def _echo_mark(self, name: str) -> None:
        self.result.marks_echoed.append(name)
        await self._send_json({"event": "mark", "sequenceNumber": str(self._next_seq()),
                               "streamSid": self.stream_sid, "mark": {"name": name}})

    # -- what the engine sends -----------------------------------------------------------

    async def _receive(self) -> None:
        ws = self._ws
        assert ws is not None
        res = self.result
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    res.bad_frames_received.append("binary frame")
                continue
            try:
                data = json.loads(msg.data)
                event = data["event"]
                if data.get("streamSid") != self.stream_sid:
                    res.bad_frames_received.append(f"wrong streamSid in {event}")
                if event == "media":
                    self._on_media(b64decode(data["media"]["payload"], validate=True))
                elif event == "mark":
                    await self._on_mark(data["mark"]["name"])
                elif event == "clear":
                    await self._on_clear()
                else:
                    res.bad_frames_received.append(f"unknown event {event!r}")
            except (KeyError, TypeError, ValueError) as exc:
                res.bad_frames_received.append(f"malformed: {exc!r}")
        res.close_code = ws.close_code
        if not self.closed.is_set() and not self.reconnecting:
            res.ended_by = res.ended_by or "engine"
            self.closed.set()

    def _on_media(self, frame: bytes) -> None:
        res = self.result
        now = time.monotonic()
        res.arrivals.append(now)
        res.frames_received += 1
        if len(frame) != FRAME_BYTES:
            res.bad_frames_received.append(f"frame of {len(frame)} bytes")
        res.agent_audio += frame
        if self._ran_dry_at is not None:
            if now - self._ran_dry_at < UNDERRUN_WINDOW_S:
                res.underruns += 1
                self.underrun_at.append(now)
            self._ran_dry_at = None
        self.playout.append(frame)
        self.last_agent_frame_at = now
        self.agent_frames_since_line += 1
        line = res.lines[-1] if res.lines else None
        if line is not None and line.first_reply_at is None and line.ended_at \
                and now >= line.ended_at:
            line.first_reply_at = now

    async def _on_mark(self, name: str) -> None:
        self.result.marks_received.append(name)
        if self.playout:
            self.playout.append(name)
        else:
            await self._echo_mark(name)  # nothing buffered: at once

    async def _on_clear(self) -> None:
        self.result.clears_received += 1
        pending = [m for m in self.playout if isinstance(m, str)]
        self.playout.clear()
        for name in pending:
            await self._echo_mark(name)

    # -- REST updates from the engine ----------------------------------------------------

    async def _on_rest_update(self, call_sid: str, form: dict[str, str]) -> None:
        """The engine updated the call through the REST API: Twilio ends the stream."""
        res = self.result
        twiml = form.get("Twiml", "")
        if form.get("Status") == "completed":
            res.completed_by_rest = True
            res.ended_by = res.ended_by or "rest-completed"
        elif "<Connect>" in twiml and "<Stream" in twiml:
            await self._say_and_reconnect(twiml)
            return
        else:
            res.redirects.append(form.get("Twiml", form.get("Url", "")))
            res.ended_by = res.ended_by or "redirect"
        if self._ws is not None and not self.closed.is_set():
            await self._send_stop()
            self.closed.set()
            await self._ws.close()

    async def _say_and_reconnect(self, twiml: str) -> None:
        """New TwiML with <Say> then <Connect><Stream>: as Twilio does, end this stream,
        speak the text, then open a new stream for the same call."""
        root = ET.fromstring(twiml)
        said = " ".join((e.text or "") for e in root.iter("Say"))
        stream = root.find("./Connect/Stream")
        if stream is None or self._ws is None or self.closed.is_set():
            return
        self.reconnecting = True
        try:
            await self._send_stop()
            await self._ws.close()
            if self._receiver is not None:
                await asyncio.gather(self._receiver, return_exceptions=True)
            self.playout.clear()
            self.result.twilio_says.append(said)
            self.agent_frames_since_line += 1  # the agent did answer, in Twilio's voice
            await asyncio.sleep(min(3.0, 0.02 * len(said)))  # Twilio speaking
            self.last_agent_frame_at = time.monotonic()
            self._use_stream(stream)
            self.stream_sid = new_sid("MZ")
            await self._open_stream()
            self._receiver = asyncio.create_task(self._receive(), name="sim-recv")
        finally:
            self.reconnecting = False
