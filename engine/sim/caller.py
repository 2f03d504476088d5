"""A simulated caller that does what Twilio does, with real audio.

It signs and posts the voice webhook, reads the TwiML, opens the signed Media Streams
WebSocket, sends `connected`/`start`, then streams 20 ms mu-law frames in real time:
scripted lines spoken by espeak-ng (another voice than the agent's), silence between
them. Like Twilio it plays what the engine sends in real time, echoes each mark when the
audio before it has played, honours `clear` (dropping queued audio and echoing pending
marks at once), can press DTMF digits and hang up, and ends the stream when the engine
redirects (transfers) or completes the call through the REST API.

It records what it heard (a timeline with silence, writable as WAV) and timings: the
delay from the end of each line to the first audio of the answer, and the arrival time
of every frame (for pacing and jitter figures).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import xml.etree.ElementTree as ET
from base64 import b64decode, b64encode
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from engine.audio.wav import write_ulaw_wav
from engine.log import get_logger
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.twilio_api import TwilioApiStandIn
from engine.telephony.signature import sign

log = get_logger(__name__)

FRAME_BYTES = 160
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME_BYTES


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class SaidLine:
    text: str
    started_at: float
    ended_at: float
    barge_in: bool
    first_reply_at: float | None = None  # first agent frame that arrived after the line

    @property
    def reply_latency_s(self) -> float | None:
        if self.first_reply_at is None:
            return None
        return self.first_reply_at - self.ended_at


@dataclass
class CallResult:
    call_sid: str
    stream_sid: str
    twiml: str = ""
    stream_url: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    frames_sent: int = 0
    frames_received: int = 0
    bad_frames_received: list[str] = field(default_factory=list)
    marks_received: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    clears_received: int = 0
    heard: bytearray = field(default_factory=bytearray)  # playout timeline, 8 kHz mu-law
    agent_audio: bytearray = field(default_factory=bytearray)  # frames received, in order
    arrivals: list[float] = field(default_factory=list)  # monotonic arrival per frame
    lines: list[SaidLine] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)  # TwiML the engine sent by REST
    twilio_says: list[str] = field(default_factory=list)  # <Say> texts Twilio spoke
    streams: int = 0  # media streams opened (more than one after a <Say> fallback)
    completed_by_rest: bool = False
    ended_by: str = ""  # caller | engine | redirect | rest-completed | error
    close_code: int | None = None
    error: str | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    def write_heard_wav(self, path: str) -> None:
        write_ulaw_wav(path, bytes(self.heard))

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)


class SimulatedCaller:
    """One simulated phone call against an engine."""

    def __init__(self, engine_url: str, auth_token: str, account_sid: str = "",
                 *, public_url: str | None = None, voice: str = "en-gb", rate_wpm: int = 165,
                 rest: TwilioApiStandIn | None = None, post_status: bool = True,
                 session: aiohttp.ClientSession | None = None,
                 speech_cache: dict[tuple[str, str], bytes] | None = None) -> None:
        self.engine_url = engine_url.rstrip("/")
        self.public_url = (public_url or engine_url).rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid or new_sid("AC")
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.rest = rest
        self.post_status = post_status
        self._http = session
        self._speech_cache = speech_cache if speech_cache is not None else {}
        self.call_sid = new_sid("CA")
        self.stream_sid = new_sid("MZ")
        self.result = CallResult(self.call_sid, self.stream_sid)
        self.log = log.bind(call_sid=self.call_sid)
        # Outbound (caller -> engine) audio not yet sent.
        self._speech = bytearray()
        self._speech_pos = 0
        self._seq = 0
        self._chunk = 0
        # Twilio's playout buffer: frames (bytes) and marks (str), in order.
        self._playout: deque[bytes | str] = deque()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closed = asyncio.Event()
        self._last_agent_frame_at = 0.0
        self._agent_frames_since_line = 0
        self._dtmf: deque[str] = deque()
        self._hangup_requested = False
        self._reconnecting = False
        self._receiver: asyncio.Task[None] | None = None
        self._http_session: aiohttp.ClientSession | None = None

    # -- public -------------------------------------------------------------------------

    async def run(self, scenario: Scenario) -> CallResult:
        own_session = self._http is None
        http = self._http or aiohttp.ClientSession()
        res = self.result
        res.started_at = time.monotonic()
        if scenario.voice:
            self.voice = scenario.voice
        try:
            await self._answer_webhook(http, scenario)
            if self.rest is not None:
                self.rest.register_call(self.call_sid, scenario.from_number,
                                        scenario.to_number, listener=self._on_rest_update)
            await self._open_stream(http)
            ticker = asyncio.create_task(self._tick(), name="sim-tick")
            self._receiver = asyncio.create_task(self._receive(), name="sim-recv")
            try:
                await self._script(scenario)
            finally:
                if not self._closed.is_set():
                    await self.hang_up()
                tasks = [ticker, self._receiver]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.post_status and res.ended_by in ("caller", "rest-completed"):
                await self._post_status(http, "completed")
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            res.ended_by = res.ended_by or "error"
            self.log.warning("sim.call_failed", error=res.error)
        finally:
            res.ended_at = time.monotonic()
            if self._ws is not None and not self._ws.closed:
                await self._ws.close()
            if own_session:
                await http.close()
        return res

    async def say(self, text: str, barge_in: bool = False) -> SaidLine:
        ulaw = await self._speech_audio(text)
        line = SaidLine(text, time.monotonic(), 0.0, barge_in)
        self.result.lines.append(line)
        self._agent_frames_since_line = 0
        self._queue_speech(ulaw)
        while self._speech_pos < len(self._speech) and not self._closed.is_set():
            await asyncio.sleep(FRAME_S)
        line.ended_at = time.monotonic()
        # Only audio after the line counts as the answer to it (not what we talked over).
        self._agent_frames_since_line = 0
        return line

    async def press(self, digits: str) -> None:
        for digit in digits:
            self._dtmf.append(digit)
            await asyncio.sleep(0.15)

    async def hang_up(self) -> None:
        if self._closed.is_set() or self._ws is None:
            return
        self._hangup_requested = True
        await self._send_json({"event": "stop", "sequenceNumber": str(self._next_seq()),
                               "streamSid": self.stream_sid,
                               "stop": {"accountSid": self.account_sid,
                                        "callSid": self.call_sid}})
        self.result.ended_by = self.result.ended_by or "caller"
        await self._ws.close()
        self._closed.set()

    async def wait_agent_done(self, quiet_s: float = 1.0, timeout: float = 30.0,
                              need_audio: bool = True) -> bool:
        """Wait until the agent has spoken (if `need_audio`) and gone quiet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._closed.is_set():
            now = time.monotonic()
            spoke = self._agent_frames_since_line > 0 or not need_audio
            if spoke and not self._playout and not self._reconnecting \
                    and now - self._last_agent_frame_at >= quiet_s:
                return True
            await asyncio.sleep(0.05)
        return False

    async def wait_closed(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def agent_speaking(self) -> bool:
        return bool(self._playout) or time.monotonic() - self._last_agent_frame_at < 0.3

    # -- script -------------------------------------------------------------------------

    async def _script(self, scenario: Scenario) -> None:
        if scenario.wait_for_greeting:
            await self.wait_agent_done(timeout=30.0)
        for step in scenario.steps:
            if self._closed.is_set():
                return
            # A call the engine (or a crash) ends also ends the step in progress.
            step_task = asyncio.create_task(self._step(step))
            closed = asyncio.create_task(self._closed.wait())
            await asyncio.wait({step_task, closed}, return_when=asyncio.FIRST_COMPLETED)
            for task in (step_task, closed):
                task.cancel()
            await asyncio.gather(step_task, closed, return_exceptions=True)
        if scenario.hangup_at_end and not self._closed.is_set():
            await self.wait_agent_done(timeout=30.0, need_audio=bool(self.result.lines))
            await self.hang_up()
        else:
            await self._closed.wait()

    async def _step(self, step: Step) -> None:
        if step.say is not None:
            if step.barge_in:
                # Talk over the agent's answer to our last line, once it has started.
                await self._wait_agent_audio(step.wait_timeout_s)
                await asyncio.sleep(step.after_s)
            else:
                # A polite caller lets the agent finish answering first.
                await self.wait_agent_done(timeout=step.wait_timeout_s,
                                           need_audio=bool(self.result.lines))
            await self.say(step.say, barge_in=step.barge_in)
        elif step.dtmf is not None:
            await self.press(step.dtmf)
        elif step.pause is not None:
            await asyncio.sleep(step.pause)
        elif step.hangup:
            await self.hang_up()

    async def _wait_agent_audio(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._agent_frames_since_line == 0 and time.monotonic() < deadline:
            if self._closed.is_set():
                return
            await asyncio.sleep(0.02)

    # -- Twilio's side of the protocol ---------------------------------------------------

    async def _answer_webhook(self, http: aiohttp.ClientSession, scenario: Scenario) -> None:
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid,
                "From": scenario.from_number, "To": scenario.to_number,
                "CallStatus": "ringing", "ApiVersion": "2010-04-01", "Direction": "inbound"}
        url = self.public_url + "/twilio/voice"
        headers = {"X-Twilio-Signature": sign(self.auth_token, url, form)}
        async with http.post(self.engine_url + "/twilio/voice", data=form,
                             headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"voice webhook answered {resp.status}: {body[:200]}")
            if not resp.content_type.endswith("xml"):
                raise RuntimeError(f"voice webhook answered {resp.content_type}, not TwiML")
        self.result.twiml = body
        root = ET.fromstring(body)
        stream = root.find("./Connect/Stream")
        if stream is None or not stream.get("url"):
            raise RuntimeError(f"TwiML has no <Connect><Stream url>: {body[:200]}")
        self.result.stream_url = stream.get("url", "")
        self.result.parameters = {p.get("name", ""): p.get("value", "")
                                  for p in stream.findall("Parameter")}

    async def _open_stream(self, http: aiohttp.ClientSession) -> None:
        self._http_session = http
        self.result.streams += 1
        stream_url = self.result.stream_url
        # Sign the URL exactly as written in the TwiML; connect to where the engine is.
        path = urlsplit(stream_url).path or "/twilio/media"
        eng = urlsplit(self.engine_url)
        ws_url = urlunsplit(("wss" if eng.scheme == "https" else "ws", eng.netloc, path, "", ""))
        headers = {"X-Twilio-Signature": sign(self.auth_token, stream_url, {})}
        self._ws = await http.ws_connect(ws_url, headers=headers, autoping=True,
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

    async def _send_json(self, message: dict[str, object]) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(json.dumps(message))

    def _queue_speech(self, ulaw: bytes) -> None:
        if self._speech_pos >= len(self._speech):
            self._speech.clear()
            self._speech_pos = 0
        self._speech += ulaw
        pad = (-len(self._speech)) % FRAME_BYTES
        self._speech += b"\xff" * pad

    async def _speech_audio(self, text: str) -> bytes:
        key = (self.voice, text)
        audio = self._speech_cache.get(key)
        if audio is None:
            from engine.providers.builtin.espeak_engine import get_espeak

            audio = await get_espeak().synthesize_ulaw8k(text, self.voice, self.rate_wpm)
            self._speech_cache[key] = audio
        return audio

    async def _tick(self) -> None:
        """Every 20 ms: play one frame of what the engine sent; send one frame of ours."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        res = self.result
        prefix = '{"event":"media","sequenceNumber":"'
        mid = '","media":{"track":"inbound","chunk":"'
        sid = json.dumps(self.stream_sid)
        while not self._closed.is_set():
            # Playout, as Twilio does it: one frame per 20 ms, marks when reached.
            frame = self._playout.popleft() if self._playout else None
            if isinstance(frame, bytes):
                res.heard += frame
            else:
                res.heard += SILENCE
            await self._echo_reached_marks()
            if self._reconnecting:
                # Between two streams (Twilio is speaking a <Say>): nothing goes out.
                next_tick += FRAME_S
                await asyncio.sleep(max(0.0, next_tick - loop.time()))
                continue
            # Inbound audio: speech if queued, otherwise line silence.
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
            ts = self._chunk * 20
            msg = (prefix + str(self._next_seq()) + mid + str(self._chunk) + '","timestamp":"'
                   + str(ts) + '","payload":"' + b64encode(out).decode() + '"},"streamSid":'
                   + sid + "}")
            ws = self._ws
            if ws is None or ws.closed:
                if not self._reconnecting:
                    break
                ws = None  # between two streams: nothing to send to
            if ws is not None:
                try:
                    await ws.send_str(msg)
                except (ConnectionError, RuntimeError):
                    if not self._reconnecting:
                        break
            res.frames_sent += 1
            next_tick += FRAME_S
            delay = next_tick - loop.time()
            if delay < -0.2:
                next_tick = loop.time()  # the machine stalled: don't burst to catch up
            await asyncio.sleep(max(0.0, delay))

    async def _echo_reached_marks(self) -> None:
        while self._playout and isinstance(self._playout[0], str):
            name = self._playout.popleft()
            assert isinstance(name, str)
            await self._echo_mark(name)

    async def _echo_mark(self, name: str) -> None:
        self.result.marks_echoed.append(name)
        await self._send_json({"event": "mark", "sequenceNumber": str(self._next_seq()),
                               "streamSid": self.stream_sid, "mark": {"name": name}})

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
                    frame = b64decode(data["media"]["payload"], validate=True)
                    now = time.monotonic()
                    res.arrivals.append(now)
                    res.frames_received += 1
                    if len(frame) != FRAME_BYTES:
                        res.bad_frames_received.append(f"frame of {len(frame)} bytes")
                    res.agent_audio += frame
                    self._playout.append(frame)
                    self._last_agent_frame_at = now
                    self._agent_frames_since_line += 1
                    if res.lines and res.lines[-1].first_reply_at is None \
                            and res.lines[-1].ended_at and now >= res.lines[-1].ended_at:
                        res.lines[-1].first_reply_at = now
                elif event == "mark":
                    name = data["mark"]["name"]
                    res.marks_received.append(name)
                    if self._playout:
                        self._playout.append(name)
                    else:
                        await self._echo_mark(name)  # nothing buffered: at once
                elif event == "clear":
                    res.clears_received += 1
                    pending = [m for m in self._playout if isinstance(m, str)]
                    self._playout.clear()
                    for name in pending:
                        await self._echo_mark(name)
                else:
                    res.bad_frames_received.append(f"unknown event {event!r}")
            except (KeyError, TypeError, ValueError) as exc:
                res.bad_frames_received.append(f"malformed: {exc!r}")
        res.close_code = ws.close_code
        if not self._closed.is_set() and not self._reconnecting:
            res.ended_by = res.ended_by or "engine"
            self._closed.set()

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
        if self._ws is not None and not self._closed.is_set():
            await self._send_json({"event": "stop", "sequenceNumber": str(self._next_seq()),
                                   "streamSid": self.stream_sid,
                                   "stop": {"accountSid": self.account_sid,
                                            "callSid": self.call_sid}})
            self._closed.set()
            await self._ws.close()

    async def _say_and_reconnect(self, twiml: str) -> None:
        """New TwiML with <Say> then <Connect><Stream>: as Twilio does, end this stream,
        speak the text, then open a new stream for the same call."""
        res = self.result
        root = ET.fromstring(twiml)
        said = " ".join((e.text or "") for e in root.iter("Say"))
        stream = root.find("./Connect/Stream")
        if stream is None or self._ws is None or self._closed.is_set():
            return
        self._reconnecting = True
        try:
            await self._send_json({"event": "stop", "sequenceNumber": str(self._next_seq()),
                                   "streamSid": self.stream_sid,
                                   "stop": {"accountSid": self.account_sid,
                                            "callSid": self.call_sid}})
            await self._ws.close()
            if self._receiver is not None:
                await asyncio.gather(self._receiver, return_exceptions=True)
            self._playout.clear()
            res.twilio_says.append(said)
            self._agent_frames_since_line += 1  # the agent did answer, in Twilio's voice
            await asyncio.sleep(min(3.0, 0.02 * len(said)))  # Twilio speaking
            self._last_agent_frame_at = time.monotonic()
            res.stream_url = stream.get("url", res.stream_url)
            res.parameters = {p.get("name", ""): p.get("value", "")
                              for p in stream.findall("Parameter")}
            self.stream_sid = new_sid("MZ")
            assert self._http_session is not None
            await self._open_stream(self._http_session)
            self._receiver = asyncio.create_task(self._receive(), name="sim-recv")
        finally:
            self._reconnecting = False

    async def _post_status(self, http: aiohttp.ClientSession, status: str) -> None:
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid,
                "CallStatus": status, "CallDuration": str(int(self.result.duration_s)),
                "SequenceNumber": "0", "StatusCallbackEvent": status}
        url = self.public_url + "/twilio/status"
        headers = {"X-Twilio-Signature": sign(self.auth_token, url, form)}
        try:
            async with http.post(self.engine_url + "/twilio/status", data=form,
                                 headers=headers) as resp:
                await resp.read()
        except aiohttp.ClientError as exc:
            self.log.debug("sim.status_callback_failed", error=str(exc))
