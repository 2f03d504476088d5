"""ElevenLabs input streaming: the agent's text goes into the voice as it is written.

One reply is one WebSocket, `GET {base}/v1/text-to-speech/{voice_id}/stream-input` (the
SDK's helper is synchronous and forces `wss`, so this is an aiohttp client). It connects
when the stream is made, before the first text and before anything reads it (`StreamInput`).
Messages [V: the SDK's generated schemas, `elevenlabs.types.{InitializeConnection,
SendText, CloseConnection, AudioOutput, FinalOutput, Alignment}`]:

- sent: `{"text": " ", "generation_config": {"chunk_length_schedule": [...]}}` first (the
  key goes in the `xi-api-key` header), then whole words ending in one space
  `{"text": "Sure thing. "}` (`"flush": true` makes the server generate what it holds),
  then `{"text": ""}`: generate the rest and close;
- received: `{"audio": <base64>, "alignment": {"chars", "charStartTimesMs",
  "charDurationsMs"}, "normalizedAlignment": ...}`, then `{"isFinal": true}`; errors come
  as `{"message", "error", "code"}` [U: the brief's shape] and closes with code 1008
  (policy violation: a bad key, 20 s without text) [V: issue threads].

`sync_alignment=true` puts timing data on every audio chunk, in milliseconds from the start
of that chunk's audio [V: the SDK's Alignment doc, "relative to the returned chunk"];
mu-law 8 kHz is 8 bytes a millisecond. The audio is cut at the byte where a sentence's last
character ends, so the audio between two `TextSpoken` events is exactly that sentence's
(`engine.providers.builtin.spoken_text`).

Billing: the protocol reports no character count [V: `FinalOutput` has only `isFinal`], so
usage is the characters sent, flagged `estimated`: in `SynthesisDone`, or from
`StreamInput.usage` for a stream closed before its end (a barge-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp

from engine.log import get_logger
from engine.providers.base import StreamedSynthesisEvent, SynthesisDone, Usage
from engine.providers.builtin.elevenlabs_stream_wire import (
    ABNORMAL_CLOSE,
    NORMAL_CLOSE,
    PROVIDER,
    Audio,
    Ended,
    Final,
    FirstText,
    Item,
    StreamInputError,
    StreamInputOptions,
    TextDone,
    TextFailed,
    Triggered,
    closed_error,
    parse_message,
)
from engine.providers.builtin.spoken_text import AlignedAudio, SpokenText, WordPieces
from engine.providers.event_stream import EventStream
from engine.providers.first_byte import FirstByteDeadline, TimedRequest

log = get_logger(__name__)


class StreamInputSynthesis:
    """One reply's audio over one socket: a task sends the text, a task receives, and
    `events()` turns what they report into audio, `TextSpoken` marks and the usage.
    `start()` connects at once, before the first text and before anything reads."""

    def __init__(self, options: StreamInputOptions, deadline: FirstByteDeadline,
                 session: aiohttp.ClientSession, text: AsyncIterator[str]) -> None:
        self._options = options
        self._deadline = deadline
        self._session = session
        self._text = text
        self._items: asyncio.Queue[Item] = asyncio.Queue()
        self._spoken = SpokenText()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._tasks: tuple[asyncio.Task[None], ...] = ()
        self._triggered = False
        self._text_done = False
        self.characters = 0  # characters sent (the bill's estimate)

    def start(self) -> None:
        self._tasks = (asyncio.create_task(self._receive(), name="elevenlabs-stream-receive"),
                       asyncio.create_task(self._send(), name="elevenlabs-stream-send"))

    async def events(self) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        if not self._tasks:
            self.start()
        try:
            async for event in self._read():
                yield event
        finally:
            await self.shut()

    async def shut(self) -> None:
        """Stop both tasks and close the socket (a barge-in lands here; idempotent)."""
        if not self._tasks:
            return
        receiver, sender = self._tasks
        sender.cancel()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()  # wakes the receiver; bounded by close_timeout_s
        receiver.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def abandon(self) -> None:
        """Without a loop to wait on (a stream dropped unread): cancel both tasks; the
        receiver closes the socket as it stops."""
        for task in self._tasks:
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                task.cancel()

    # --- the reader (the caller's task) ----------------------------------------------

    async def _read(self) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        request: TimedRequest | None = None
        item = await self._items.get()
        while not isinstance(item, Triggered | Audio):  # until enough text was sent
            if isinstance(item, FirstText):  # the first-audio clock starts
                request = self._deadline.request(self._options.model_id)
            elif isinstance(item, TextDone):  # nothing to say
                yield self._done(request, produced=False)
                return
            else:
                self._raise(item)
            item = await self._items.get()
        request = request or self._deadline.request(self._options.model_id)
        async with request.first_byte():  # the first-audio deadline runs from the trigger
            while not isinstance(item, Audio):
                self._raise(item)
                item = await self._items.get()
        audio = AlignedAudio(self._spoken)
        truncated = False
        while isinstance(item, Audio):
            for event in audio.feed(item.ulaw, item.alignment):
                yield event
            item = await self._next_audio(request)
        if isinstance(item, Ended):
            request.cut(item.error or closed_error(None, ""))
            truncated = True
        else:
            for event in audio.finish():
                yield event
        yield self._done(request, produced=True, truncated=truncated)

    async def _next_audio(self, request: TimedRequest) -> Audio | Final | Ended:
        """The next audio; `Final` at the end, `Ended` when the stream broke or stalled
        (no message for `stall_timeout_s` once all text is sent)."""
        while True:
            try:
                async with asyncio.timeout(self._options.stall_timeout_s
                                           if self._text_done else None):
                    item = await self._items.get()
            except TimeoutError:
                return Ended(StreamInputError(f"no audio for {self._options.stall_timeout_s}"
                                               "s after the end of the text"))
            if isinstance(item, Audio | Final):
                return item
            if isinstance(item, TextFailed):
                raise item.error
            if isinstance(item, Ended):
                if item.error is None and self._text_done:
                    return Final()  # closed after the end of input without isFinal
                return Ended(item.error or closed_error(None, "before the end of the text"))

    def _raise(self, item: Item) -> None:
        """Before the first audio: a failure ends the request as a logged ProviderError (the
        text's own failure passes unchanged)."""
        error: BaseException
        if isinstance(item, TextFailed):
            raise item.error
        if isinstance(item, TextDone):
            return
        if isinstance(item, Ended):
            error = item.error or closed_error(None, "before any audio")
        elif isinstance(item, Final):
            error = StreamInputError("stream ended without audio")
        else:
            return
        raise self._deadline.failed(error, self._options.model_id) from error

    def usage(self) -> Usage:
        return Usage(provider=PROVIDER, kind="tts", model=self._options.model_id,
                     characters=self.characters, estimated=True)

    def _done(self, request: TimedRequest | None, *, produced: bool,
              truncated: bool = False) -> SynthesisDone:
        if request is None:
            request = self._deadline.request(self._options.model_id)
        return SynthesisDone(usage=self.usage(), timing=request.timing(produced=produced),
                             truncated=truncated)

    # --- the socket ------------------------------------------------------------------

    async def _receive(self) -> None:
        options = self._options
        try:
            async with asyncio.timeout(self._deadline.timeout_s):
                ws = await self._session.ws_connect(
                    options.url(), headers={"xi-api-key": options.api_key}, autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=options.close_timeout_s))
            self._ws = ws
            await ws.send_str(json.dumps(options.init_message()))
            self._connected.set()
            log.debug("elevenlabs.stream_input_open", model=options.model_id)
            await self._read_socket(ws)
        except asyncio.CancelledError:  # abandoned unread: still close the socket
            if self._ws is not None and not self._ws.closed:
                with contextlib.suppress(Exception):
                    await self._ws.close()
            raise
        except TimeoutError:
            self._items.put_nowait(Ended(StreamInputError(
                f"no connection within {self._deadline.timeout_s:.2f}s")))
        except (aiohttp.ClientError, ConnectionError) as exc:
            self._items.put_nowait(Ended(exc))

    async def _read_socket(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                item = parse_message(message.data)
                if item is not None:
                    self._items.put_nowait(item)
                    if isinstance(item, Ended):
                        return
            elif message.type is aiohttp.WSMsgType.ERROR:
                self._items.put_nowait(Ended(message.data))
                return
            elif message.type is aiohttp.WSMsgType.CLOSE:  # the server's close frame
                code, reason = message.data, message.extra
                self._items.put_nowait(Ended(None if code == NORMAL_CLOSE else closed_error(
                    code, reason if isinstance(reason, str) else "")))
                return
            elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                self._items.put_nowait(Ended(closed_error(ABNORMAL_CLOSE, "connection lost")))
                return

    async def _send(self) -> None:
        pieces = WordPieces(self._spoken, flush_first_sentence=self._options.flush_first_sentence,
                            first_flush_words=self._options.first_flush_words)
        try:
            async for delta in self._text:
                if delta and not self._spoken.text.strip() and delta.strip():
                    self._items.put_nowait(FirstText())
                for piece, flush in pieces.push(delta):
                    await self._send_text(piece, flush)
            for piece, flush in pieces.finish():
                await self._send_text(piece, flush)
            if self.characters:
                await self._send_json({"text": ""})  # generate the rest, then close
                self._trigger()
            self._text_done = True
            self._items.put_nowait(TextDone())
        except (aiohttp.ClientError, ConnectionError):
            return  # the socket broke: the receiver reports it
        except Exception as exc:
            self._items.put_nowait(TextFailed(exc))

    async def _send_text(self, piece: str, flush: bool) -> None:
        await self._send_json({"text": piece, "flush": True} if flush else {"text": piece},
                              characters=len(piece))
        if flush or self._options.auto_mode or (
                self.characters >= self._options.chunk_length_schedule[0]):
            self._trigger()

    def _trigger(self) -> None:
        """The server generates from now (its schedule reached, a flush or the end)."""
        if not self._triggered:
            self._triggered = True
            self._items.put_nowait(Triggered())

    async def _send_json(self, message: dict[str, Any], characters: int = 0) -> None:
        await self._connected.wait()
        assert self._ws is not None
        # Counted before the await: an uncompressed frame is written before send_str
        # first yields, so a cancel after it cannot leave sent text uncounted.
        self.characters += characters
        try:
            await self._ws.send_str(json.dumps(message))
        except (aiohttp.ClientError, ConnectionError):
            self.characters -= characters  # refused: the socket was closing
            raise


class StreamInput(EventStream):
    """`StreamInputSynthesis.events()`, connected at once; closing it closes the socket
    even when nothing was read yet (an async generator that never ran ignores aclose)."""

    def __init__(self, synthesis: StreamInputSynthesis) -> None:
        synthesis.start()
        super().__init__(synthesis.events())
        self._synthesis = synthesis
        weakref.finalize(self, synthesis.abandon)

    async def after_close(self) -> None:
        await self._synthesis.shut()

    @property
    def usage(self) -> Usage:
        """What the stream owes so far: every character sent (estimated, as the socket
        reports no count). After a cut or a close this is the bill; `SynthesisDone` never
        comes then."""
        return self._synthesis.usage()
