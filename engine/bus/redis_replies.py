"""Redis Streams as the bus reads them: stream ids, and XINFO STREAM / XREAD replies.

Stream ids are "<ms>-<seq>", compared as (ms, seq) tuples. Replies come as RESP2 or RESP3
shapes depending on the client's protocol; both are handled here, so the bus never
looks at a raw reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

StreamId = tuple[int, int]
ZERO_ID: StreamId = (0, 0)
_MAX_SEQ = 2**64 - 1


def parse_stream_id(value: str) -> StreamId:
    """'1700000000000-3' -> (1700000000000, 3); '0' -> (0, 0). ValueError otherwise."""
    ms, sep, seq = value.partition("-")
    try:
        parsed = (int(ms), int(seq) if sep else 0)
    except ValueError:
        raise ValueError(f"invalid Redis stream id {value!r}") from None
    if parsed[0] < 0 or parsed[1] < 0:
        raise ValueError(f"invalid Redis stream id {value!r}")
    return parsed


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def id_before(stream_id: StreamId) -> StreamId:
    ms, seq = stream_id
    if seq > 0:
        return ms, seq - 1
    return (ms - 1, _MAX_SEQ) if ms > 0 else ZERO_ID


def text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class StreamInfo:
    last_generated: StreamId
    first_entry: StreamId | None  # None: the stream is empty


def is_no_such_key(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and "no such key" in str(reply).lower()


def parse_info(reply: Any) -> StreamInfo | None:
    """An XINFO STREAM reply; None when the stream does not exist. Raises a reply that
    is an error."""
    if is_no_such_key(reply):
        return None
    if isinstance(reply, Exception):
        raise reply
    first = reply.get("first-entry")
    return StreamInfo(
        last_generated=parse_stream_id(text(reply["last-generated-id"])),
        first_entry=parse_stream_id(text(first[0])) if first else None)


def stream_entries(response: Any, stream_key: str) -> list[Any]:
    """The (id, fields) entries of one stream in an XREAD reply."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        for key, value in response.items():
            if text(key) == stream_key:
                return list(value[0] if value and isinstance(value[0], list) else value)
        return []
    for key, entries in response:  # RESP2: [[key, [(id, fields), ...]]]
        if text(key) == stream_key:
            return list(entries)
    return []
