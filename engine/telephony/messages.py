"""Twilio Media Streams wire format: typed inbound messages and outbound encoders.

Twilio's wire format stops at this module. Inbound JSON text frames are parsed into small
slotted dataclasses; anything malformed raises `ProtocolViolation` with a short `reason`
(used as a metric label) and a human-readable detail. They are decoded by orjson: a media
frame (50 a second per call) parses in a quarter of json.loads' time, 12,500 frames a
second at 250 calls. Outbound messages are built by string concatenation: they are sent
50 times a second per call, and json.dumps of a nested dict costs several times more
than joining four strings.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson


class ProtocolViolation(Exception):
    """An inbound message that breaks the Media Streams protocol."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(slots=True)
class MediaFormat:
    encoding: str
    sample_rate: int
    channels: int


@dataclass(slots=True)
class Start:
    sequence_number: int
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: list[str]
    media_format: MediaFormat
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Media:
    sequence_number: int
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes  # raw mu-law


@dataclass(slots=True)
class Dtmf:
    sequence_number: int
    track: str
    digit: str


@dataclass(slots=True)
class Mark:
    sequence_number: int
    name: str


@dataclass(slots=True)
class Stop:
    sequence_number: int
    account_sid: str
    call_sid: str


InboundMessage = Connected | Start | Media | Dtmf | Mark | Stop

_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")


def _int(value: object, name: str) -> int:
    # Twilio sends sequenceNumber/chunk/timestamp as strings; accept ints too.
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ProtocolViolation("bad_field", f"{name} is not a number: {value!r}") from None


def _obj(msg: dict, key: str) -> dict:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise ProtocolViolation("missing_field", f"'{key}' object missing")
    return value


def _str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolViolation("missing_field", f"'{key}' missing or not a string")
    return value


def parse_inbound(raw: str | bytes, max_payload_bytes: int) -> InboundMessage:
    """Parse one text frame from Twilio. Raises ProtocolViolation on anything malformed."""
    try:
        msg = orjson.loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError: bad JSON or bad UTF-8
        raise ProtocolViolation("bad_json", str(exc)[:120]) from None
    if type(msg) is not dict:
        raise ProtocolViolation("bad_json", "message is not a JSON object")
    event = msg.get("event")
    if event == "media":  # 50 a second per call: inline, before any other kind
        media = msg.get("media")
        if type(media) is not dict:
            raise ProtocolViolation("missing_field", "'media' object missing")
        b64 = media.get("payload")
        if type(b64) is not str:
            raise ProtocolViolation("missing_field", "'payload' missing")
        # Check the size before decoding: base64 is 4/3 of the raw size.
        if len(b64) > (max_payload_bytes * 4) // 3 + 4:
            raise ProtocolViolation("oversized_payload", f"{len(b64)} base64 chars")
        try:  # strict: only the base64 alphabet, padding only at the end
            payload = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolViolation("bad_base64", "payload is not valid base64") from None
        if not payload:
            raise ProtocolViolation("empty_payload", "media payload is empty")
        return Media(_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
                     media.get("track", "inbound"), _int(media.get("chunk", 0), "chunk"),
                     _int(media.get("timestamp", 0), "timestamp"), payload)
    parse = _PARSERS.get(event) if isinstance(event, str) else None
    if parse is None:
        raise ProtocolViolation("unknown_event", f"unknown event {str(event)[:40]!r}")
    return parse(msg)


def _mark(msg: dict) -> Mark:
    mark = _obj(msg, "mark")
    return Mark(_int(msg.get("sequenceNumber", 0), "sequenceNumber"), _str(mark, "name"))


def _start(msg: dict) -> Start:
    start = _obj(msg, "start")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise ProtocolViolation("bad_field", "mediaFormat is not an object")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise ProtocolViolation("bad_field", "customParameters is not an object")
    tracks = start.get("tracks") or ["inbound"]
    return Start(
        sequence_number=_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
        stream_sid=_str(start, "streamSid") if "streamSid" in start else _str(msg, "streamSid"),
        call_sid=_str(start, "callSid"),
        account_sid=str(start.get("accountSid", "")),
        tracks=[str(t) for t in tracks] if isinstance(tracks, list) else ["inbound"],
        media_format=MediaFormat(
            encoding=str(fmt.get("encoding", "audio/x-mulaw")),
            sample_rate=_int(fmt.get("sampleRate", 8000), "sampleRate"),
            channels=_int(fmt.get("channels", 1), "channels"),
        ),
        custom_parameters={str(k): str(v) for k, v in params.items()},
    )


def _dtmf(msg: dict) -> Dtmf:
    dtmf = _obj(msg, "dtmf")
    digit = _str(dtmf, "digit")
    if len(digit) != 1 or digit not in _DTMF_DIGITS:
        raise ProtocolViolation("bad_field", f"invalid DTMF digit {digit!r}")
    return Dtmf(_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
                str(dtmf.get("track", "inbound_track")), digit)


def _stop(msg: dict) -> Stop:
    stop = msg.get("stop") if isinstance(msg.get("stop"), dict) else {}
    assert isinstance(stop, dict)
    return Stop(_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
                str(stop.get("accountSid", "")), str(stop.get("callSid", "")))


def _connected(msg: dict) -> Connected:
    return Connected(str(msg.get("protocol", "")), str(msg.get("version", "")))


# Every kind but media, by its `event`.
_PARSERS: dict[str, Callable[[dict], InboundMessage]] = {
    "mark": _mark, "start": _start, "dtmf": _dtmf, "stop": _stop, "connected": _connected,
}


# --- outbound ---------------------------------------------------------------------


class OutboundEncoder:
    """Builds outbound messages for one stream; the streamSid prefix is built once."""

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix")

    def __init__(self, stream_sid: str) -> None:
        sid = json.dumps(stream_sid)  # quoted and escaped once
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":'
        self._clear = '{"event":"clear","streamSid":' + sid + "}"

    def media(self, ulaw_frame: bytes) -> str:
        return self._media_prefix + b64encode(ulaw_frame).decode("ascii") + '"}}'

    def mark(self, name: str) -> str:
        return self._mark_prefix + json.dumps(name) + "}}"

    def clear(self) -> str:
        return self._clear
