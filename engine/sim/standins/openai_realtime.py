"""The OpenAI stand-in's realtime transcription endpoint: `GET /v1/realtime?intent=
transcription`, upgraded to a WebSocket, as the official SDK's `client.realtime.connect()`
opens it.

Speaks the GA wire format (openai 3.57 `types/realtime`): `session.created` on connect;
`session.update` with a `transcription` session answered by `session.updated`;
`input_audio_buffer.append` (base64 audio in the session's format), `.commit` (answered
by `input_audio_buffer.committed`, `conversation.item.added`, then the transcript as
`conversation.item.input_audio_transcription.delta` events and `.completed` with its
usage) and `.clear` (`input_audio_buffer.cleared`); `error` events in the API's shape.
One connection serves any number of committed turns, as the API's sessions do.

Knobs: the OpenAI stand-in's own (`transcript`, `token_logprob`, `latency_s`, `mode`,
`api_key`) and this endpoint's `latency_s` (None: the server's) and `cut_after_s`.
`latency_s` runs from the commit to the transcript. Modes:
- "401" / "429": the upgrade is refused with that HTTP status and the API's error body
  (as is any other key than the server's);
- "500": an `error` event (server_error) instead of the transcript;
- "422": `conversation.item.input_audio_transcription.failed` instead of the transcript;
- "timeout": the commit is acknowledged, the transcript never comes;
- "cut": the TCP connection drops once `cut_after_s` of audio arrived (or at the commit).

`connections` logs each WebSocket (its upgrade request, its client events with the audio
replaced by its size, each committed turn's audio); the upgrade is also in the server's
`requests`. `usage_log` is the bill: each accepted commit's usage object, and `bill()` the
same as the engine's `Usage`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from engine.providers.base import Usage
from engine.sim.standins.openai_wire import LOGPROB_MODELS, error_event, new_id
from engine.sim.standins.server import TIMEOUT_SLEEP_S, Mode, RecordedRequest, StandinServer

PROVIDER = "openai_realtime"  # the engine's name for this endpoint's usage
STREAMING_MODELS = ("gpt-live-transcribe", "gpt-realtime-whisper")  # VAD must be null
BYTES_PER_SECOND = {"audio/pcm": 48000, "audio/pcmu": 8000, "audio/pcma": 8000}
MIN_COMMIT_S = 0.1  # the API refuses to commit less than 100 ms of audio
AUDIO_TOKENS_PER_SECOND = 10.0  # the token-billed models' audio tokens
_TOKEN_RE = re.compile(r"\s*\S+")
_LOGPROBS = "item.input_audio_transcription.logprobs"
_REFUSALS: dict[int, tuple[str, str, str]] = {
    401: ("invalid_request_error", "invalid_api_key",
          "Incorrect API key provided. You can find your API key at "
          "https://platform.openai.com/account/api-keys."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests. Please try again in 1s."),
}


class _Host(Protocol):
    """What the endpoint uses of the OpenAI stand-in (its knobs and request log)."""

    mode: Mode
    latency_s: float
    transcript: str | Callable[[float], str]
    token_logprob: float
    requests: list[RecordedRequest]

    def key_ok(self, presented: str | None) -> bool: ...

    async def sleep(self, seconds: float) -> None: ...

    def mark_disconnected(self, record: RecordedRequest) -> None: ...


@dataclass(slots=True, frozen=True)
class RealtimeBill:
    """One transcribed turn as the vendor bills it: the model and the usage object."""

    model: str
    usage: dict[str, Any]

    def as_usage(self) -> Usage:
        u = self.usage
        if u["type"] == "tokens":
            return Usage(PROVIDER, "stt", self.model, input_tokens=u["input_tokens"],
                         output_tokens=u["output_tokens"])
        return Usage(PROVIDER, "stt", self.model, audio_seconds=float(u["seconds"]))


@dataclass(slots=True)
class RealtimeConnection:
    """One WebSocket as the stand-in saw it."""

    request: RecordedRequest
    session: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)  # audio -> its size
    commits: list[bytes] = field(default_factory=list)  # each committed turn's audio
    closed: bool = False


def _default_session() -> dict[str, Any]:
    return {"type": "transcription", "id": new_id("sess"),
            "object": "realtime.transcription_session",
            "expires_at": int(time.time()) + 3600, "include": None,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "noise_reduction": None,
                                "transcription": {"model": "gpt-4o-transcribe",
                                                  "language": None, "prompt": ""},
                                "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                                   "prefix_padding_ms": 300,
                                                   "silence_duration_ms": 500}}}}


class RealtimeTranscriptionEndpoint:
    """`GET /v1/realtime` on the OpenAI stand-in (see the module docstring)."""

    def __init__(self, server: _Host) -> None:
        self.server = server
        self.latency_s: float | None = None  # None: the server's latency_s
        self.cut_after_s = 0.5  # mode "cut": audio seconds before the connection drops
        self.connections: list[RealtimeConnection] = []
        self.usage_log: list[RealtimeBill] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/realtime", self._handle)

    def bill(self) -> list[Usage]:
        return [billed.as_usage() for billed in self.usage_log]

    @property
    def commit_latency_s(self) -> float:
        return self.server.latency_s if self.latency_s is None else self.latency_s

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = await StandinServer.record(request)
        self.server.requests.append(record)
        auth = request.headers.get("Authorization", "")
        presented = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        mode = self.server.mode
        status = 401 if mode == "401" or not self.server.key_ok(presented) else (
            429 if mode == "429" else None)
        if status is not None:
            type_, code, message = _REFUSALS[status]
            return web.json_response({"error": {"message": message, "type": type_,
                                                "param": None, "code": code}}, status=status)
        if request.query.get("intent") != "transcription" or "model" in request.query:
            return web.json_response({"error": {
                "message": "stand-in: only transcription sessions (?intent=transcription, "
                           "no model) are served", "type": "invalid_request_error",
                "param": "intent", "code": "invalid_value"}}, status=400)
        ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        connection = RealtimeConnection(record, _default_session())
        self.connections.append(connection)
        await _Session(self, request, ws, connection).run()
        return ws


class _Session:
    """One connection's state: its configuration, its input buffer, its pending turns."""

    def __init__(self, endpoint: RealtimeTranscriptionEndpoint, request: web.Request,
                 ws: web.WebSocketResponse, log: RealtimeConnection) -> None:
        self.endpoint = endpoint
        self.server = endpoint.server
        self.request = request
        self.ws = ws
        self.log = log
        self.buffer = bytearray()
        self.received_s = 0.0  # audio seconds appended on this connection
        self.previous_item: str | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()

    @property
    def input(self) -> dict[str, Any]:
        return dict(self.log.session["audio"]["input"])

    def bytes_per_second(self) -> int:
        return BYTES_PER_SECOND[str(self.input["format"]["type"])]

    async def send(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            async with self._send_lock:
                await self.ws.send_str(json.dumps(event))

    async def run(self) -> None:
        await self.send({"type": "session.created", "event_id": new_id("event"),
                         "session": self.log.session})
        try:
            async for message in self.ws:
                if message.type is WSMsgType.TEXT:
                    await self._on_text(str(message.data))
                elif message.type is WSMsgType.BINARY:
                    await self.send(error_event("invalid_request_error", "invalid_value",
                                                "Binary frames are not supported."))
                if self.ws.closed:
                    break
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            if self.pending:
                self.server.mark_disconnected(self.log.request)
            raise
        finally:
            self.log.closed = True
            for task in self.pending:
                task.cancel()

    async def _on_text(self, data: str) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            await self.send(error_event("invalid_request_error", "invalid_json",
                                        "The server could not parse the JSON of your event."))
            return
        if not isinstance(event, dict):
            event = {"type": None}
        kind, event_id = event.get("type"), event.get("event_id")
        logged = dict(event)
        if isinstance(logged.get("audio"), str):
            logged["audio"] = len(logged["audio"])
        self.log.events.append(logged)
        handler = {"session.update": self._update, "input_audio_buffer.append": self._append,
                   "input_audio_buffer.commit": self._commit,
                   "input_audio_buffer.clear": self._clear}.get(str(kind))
        if handler is None:
            await self.send(error_event(
                "invalid_request_error", "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: 'session.update', "
                "'input_audio_buffer.append', 'input_audio_buffer.commit' and "
                "'input_audio_buffer.clear'.", param="type", event_id=event_id))
            return
        await handler(event)

    async def _update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        event_id = event.get("event_id")
        problem = _session_problem(session)
        if problem is not None:
            param, message = problem
            await self.send(error_event("invalid_request_error", "invalid_value", message,
                                        param=param, event_id=event_id))
            return
        assert isinstance(session, dict)
        merged = dict(self.log.session)
        audio_input = dict(merged["audio"]["input"])
        audio_input.update((session.get("audio") or {}).get("input") or {})
        merged["audio"] = {"input": audio_input}
        if "include" in session:
            merged["include"] = session["include"]
        self.log.session = merged
        await self.send({"type": "session.updated", "event_id": new_id("event"),
                         "session": merged})

    async def _append(self, event: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode(str(event.get("audio", "")), validate=True)
        except (binascii.Error, ValueError):
            await self.send(error_event("invalid_request_error", "invalid_value",
                                        "Invalid 'audio'. Expected base64-encoded audio.",
                                        param="audio", event_id=event.get("event_id")))
            return
        self.buffer += audio
        self.received_s += len(audio) / self.bytes_per_second()
        if self.server.mode == "cut" and self.received_s >= self.endpoint.cut_after_s:
            self._drop()

    def _drop(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared", "event_id": new_id("event")})

    async def _commit(self, event: dict[str, Any]) -> None:
        seconds = len(self.buffer) / self.bytes_per_second()
        if seconds < MIN_COMMIT_S:
            await self.send(error_event(
                "invalid_request_error", "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {seconds * 1000:.2f}ms of audio.",
                event_id=event.get("event_id")))
            return
        if self.server.mode == "cut":
            self._drop()
            return
        item_id, previous = new_id("item"), self.previous_item
        self.previous_item = item_id
        self.log.commits.append(bytes(self.buffer))
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.committed", "event_id": new_id("event"),
                         "item_id": item_id, "previous_item_id": previous})
        await self.send({"type": "conversation.item.added", "event_id": new_id("event"),
                         "previous_item_id": previous,
                         "item": {"id": item_id, "object": "realtime.item", "type": "message",
                                  "status": "completed", "role": "user",
                                  "content": [{"type": "input_audio", "transcript": None}]}})
        task = asyncio.create_task(self._transcribe(item_id, seconds))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _transcribe(self, item_id: str, seconds: float) -> None:
        mode = self.server.mode
        if mode == "timeout":
            await self.server.sleep(TIMEOUT_SLEEP_S)
            return
        text = self.server.transcript
        text = text if isinstance(text, str) else text(seconds)
        model = str((self.input.get("transcription") or {}).get("model", ""))
        usage = _usage(model, seconds, text)
        if mode not in ("500", "422"):  # accepted: billed whatever the client does next
            self.endpoint.usage_log.append(RealtimeBill(model, usage))
        await self.server.sleep(self.endpoint.commit_latency_s)
        if mode == "500":
            await self.send(error_event(
                "server_error", "server_error", "The server had an error while processing "
                "your request. Sorry about that!"))
            return
        if mode == "422":
            await self.send({"type": "conversation.item.input_audio_transcription.failed",
                             "event_id": new_id("event"), "item_id": item_id,
                             "content_index": 0,
                             "error": {"type": "invalid_request_error", "code": "audio_unusable",
                                       "message": "The audio could not be transcribed.",
                                       "param": None}})
            return
        await self._send_transcript(item_id, text, usage)

    async def _send_transcript(self, item_id: str, text: str, usage: dict[str, Any]) -> None:
        with_logprobs = _LOGPROBS in (self.log.session.get("include") or [])
        tokens = _TOKEN_RE.findall(text)
        logprobs = [{"token": tok, "logprob": self.server.token_logprob,
                     "bytes": list(tok.encode())} for tok in tokens]
        for i, token in enumerate(tokens):
            delta: dict[str, Any] = {
                "type": "conversation.item.input_audio_transcription.delta",
                "event_id": new_id("event"), "item_id": item_id, "content_index": 0,
                "delta": token}
            if with_logprobs:
                delta["logprobs"] = [logprobs[i]]
            await self.send(delta)
        completed: dict[str, Any] = {
            "type": "conversation.item.input_audio_transcription.completed",
            "event_id": new_id("event"), "item_id": item_id, "content_index": 0,
            "transcript": text, "usage": usage}
        if with_logprobs:
            completed["logprobs"] = logprobs
        await self.send(completed)


def _session_problem(session: object) -> tuple[str, str] | None:
    """(param, message) of what the API refuses in a transcription `session.update`."""
    if not isinstance(session, dict) or session.get("type") != "transcription":
        return ("session.type", "This is a transcription session: session.type must be "
                                "'transcription'.")
    audio_input = (session.get("audio") or {}).get("input") or {}
    fmt = audio_input.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in BYTES_PER_SECOND:
            return ("session.audio.input.format.type", f"Invalid value: {fmt!r}. Supported "
                    "values are: 'audio/pcm', 'audio/pcmu' and 'audio/pcma'.")
        if fmt["type"] == "audio/pcm" and fmt.get("rate", 24000) != 24000:
            return ("session.audio.input.format.rate", "Only a 24kHz sample rate is "
                                                       "supported for audio/pcm.")
    model = str((audio_input.get("transcription") or {}).get("model", ""))
    if model.startswith(STREAMING_MODELS) and audio_input.get("turn_detection") is not None:
        return ("session.audio.input.turn_detection",
                f"Turn detection is not supported with '{model}': set it to null.")
    if _LOGPROBS in (session.get("include") or []) and model and \
            not model.startswith(LOGPROB_MODELS):
        return ("session.include", f"logprobs are not supported with model '{model}'.")
    return None


def _usage(model: str, seconds: float, text: str) -> dict[str, Any]:
    """Per token (the gpt-4o transcribers) or per second of audio (the others)."""
    if model.startswith(LOGPROB_MODELS):
        audio_tokens = math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)
        out_tokens = max(1, math.ceil(len(text) / 4)) if text else 0
        return {"type": "tokens", "input_tokens": audio_tokens, "output_tokens": out_tokens,
                "total_tokens": audio_tokens + out_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}
    return {"type": "duration", "seconds": round(seconds, 3)}
