"""ElevenLabs input streaming: the agent's text streamed into the voice over the real
WebSocket wire format, against the local stand-in."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from engine.providers.base import (
    AudioChunk,
    ProviderError,
    StreamedSynthesisEvent,
    StreamingTextToSpeech,
    SynthesisDone,
    TextSpoken,
)
from engine.providers.builtin.elevenlabs_stream_input import StreamInput
from engine.providers.builtin.elevenlabs_stream_wire import StreamInputOptions
from engine.providers.builtin.spoken_text import SpokenText, WordPieces
from engine.providers.builtin.tts_elevenlabs import ElevenLabsTTS
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin, StreamInputSession
from tests.cloud_fixtures import ELEVENLABS_KEY, Stopwatch, closed_port_url, collect

VOICE = "voice-123"
MODEL = "eleven_flash_v2_5"
REPLY = ("Sure thing. Your order shipped on Monday and should arrive by Thursday, "
         "well before the weekend. Dr. Smith can see you at 3.30 tomorrow. Anything else?")
SENTENCES = ["Sure thing. ",
             "Your order shipped on Monday and should arrive by Thursday, well before the "
             "weekend. ",
             "Dr. Smith can see you at 3.30 tomorrow. ",
             "Anything else?"]


def make_tts(base_url: str, *, first_audio_timeout_s: float = 3.0, stall_timeout_s: float = 5.0,
             sync_alignment: bool = True) -> ElevenLabsTTS:
    options = StreamInputOptions(api_key=ELEVENLABS_KEY, voice_id=VOICE, model_id=MODEL,
                                 base_url=base_url, sync_alignment=sync_alignment,
                                 stall_timeout_s=stall_timeout_s)
    return ElevenLabsTTS(api_key=ELEVENLABS_KEY, voice_id=VOICE, base_url=base_url,
                         model_id=MODEL, first_audio_timeout_s=first_audio_timeout_s,
                         stream_options=options)


class Deltas:
    """The agent's text as token-sized deltas, `gap_s` apart; notes when each went out and
    whether the reader stopped early."""

    def __init__(self, text: str, *, size: int = 4, gap_s: float = 0.0,
                 first_after_s: float = 0.0) -> None:
        self.pieces = [text[i:i + size] for i in range(0, len(text), size)]
        self.gap_s = gap_s
        self.first_after_s = first_after_s
        self.sent_at: list[float] = []
        self.closed_early = False

    async def __call__(self) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.first_after_s)
            for index, piece in enumerate(self.pieces):
                if index:
                    await asyncio.sleep(self.gap_s)
                self.sent_at.append(time.monotonic())
                yield piece
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early = True
            raise


def audio_between_marks(events: list[StreamedSynthesisEvent]) -> list[tuple[bytes, str]]:
    """(audio, text) for each TextSpoken: the audio yielded since the previous one."""
    out: list[tuple[bytes, str]] = []
    audio = bytearray()
    for event in events:
        if isinstance(event, AudioChunk):
            audio += event.ulaw
        elif isinstance(event, TextSpoken):
            out.append((bytes(audio), event.text))
            audio.clear()
    return out


def expected_cuts(session: StreamInputSession, sentences: list[str]) -> list[int]:
    """Byte offsets in the stand-in's audio where each sentence's last character ends."""
    visible = [(start, end) for char, start, end in session.timeline if not char.isspace()]
    cuts, count = [], 0
    for sentence in sentences[:-1]:
        count += sum(not char.isspace() for char in sentence)
        cuts.append(visible[count - 1][1])
    return [*cuts, len(session.audio)]


# --- the text side ----------------------------------------------------------------


def test_pieces_are_whole_words_and_the_first_sentence_is_flushed_alone() -> None:
    spoken = SpokenText()
    pieces = WordPieces(spoken)
    sent = []
    for delta in ["Hel", "lo wor", "ld. How", " are", " you?"]:
        sent += pieces.push(delta)
    sent += pieces.finish()
    assert sent == [("Hello ", False), ("world. ", True), ("How ", False), ("are ", False),
                    ("you? ", True)]
    assert spoken.ends == [len("Hello world.")]


def test_sentence_ends_skip_abbreviations_and_decimals() -> None:
    spoken = SpokenText()
    for delta in [REPLY[i:i + 3] for i in range(0, len(REPLY), 3)]:
        spoken.add(delta)
    assert [REPLY[:end] for end in spoken.ends] == [
        "".join(SENTENCES[:n]).rstrip() for n in range(1, len(SENTENCES))]


# --- through the socket -----------------------------------------------------------


async def test_audio_starts_before_the_text_is_complete() -> None:
    async with ElevenLabsStandin() as server:
        server.latency_s = 0.05
        tts = make_tts(server.base_url)
        assert isinstance(tts, StreamingTextToSpeech)
        deltas = Deltas(REPLY, gap_s=0.03)  # ~40 deltas over ~1.2 s
        first_audio_at = None
        events = []
        async for event in tts.synthesize_stream(deltas()):
            if isinstance(event, AudioChunk) and first_audio_at is None:
                first_audio_at = time.monotonic()
            events.append(event)
        await tts.aclose()
    session = server.stream_inputs[0]
    assert first_audio_at is not None and first_audio_at < deltas.sent_at[-1]
    # The wire: the key in the header, the query, the schedule, whole words, the end.
    record = session.record
    assert record.headers["xi-api-key"] == ELEVENLABS_KEY
    assert record.path == f"/v1/text-to-speech/{VOICE}/stream-input"
    assert record.query == {"model_id": MODEL, "output_format": "ulaw_8000",
                            "sync_alignment": "true", "auto_mode": "false"}
    assert session.init == {"text": " ",
                            "generation_config": {"chunk_length_schedule": [50, 120, 160, 250]}}
    texts = [message["text"] for message in session.messages]
    assert texts[-1] == "" and all(t.endswith(" ") and not t.endswith("  ") for t in texts[:-1])
    assert "".join(texts).split() == REPLY.split()
    assert session.generations[0] == "Sure thing. "  # the first sentence, flushed alone
    assert session.finished and not session.closed_by_client
    done = events[-1]
    assert isinstance(done, SynthesisDone) and not done.truncated
    assert done.timing.first_byte_s is not None and done.timing.first_byte_s >= 0.05


@pytest.mark.parametrize("sync_alignment", [True, False])
@pytest.mark.parametrize("chunk_bytes", [800, 160, 4000])
async def test_text_spoken_at_each_sentence_end_with_exactly_its_audio(
        chunk_bytes: int, sync_alignment: bool) -> None:
    async with ElevenLabsStandin() as server:
        server.audio_chunk_bytes = chunk_bytes
        tts = make_tts(server.base_url, sync_alignment=sync_alignment)
        events = await collect(tts.synthesize_stream(Deltas(REPLY)()))
        await tts.aclose()
    session = server.stream_inputs[0]
    marks = audio_between_marks(events)
    assert [text for _, text in marks] == SENTENCES
    cuts = expected_cuts(session, SENTENCES)
    starts = [0, *cuts[:-1]]
    for (audio, text), start, end in zip(marks, starts, cuts, strict=True):
        assert audio == bytes(session.audio[start:end]), text
    assert isinstance(events[-1], SynthesisDone)


async def test_close_mid_stream_stops_promptly_and_the_server_sees_it() -> None:
    async with ElevenLabsStandin() as server:
        server.stream_realtime_factor = 1.0  # audio as fast as it plays: a long stream
        deltas = Deltas(REPLY * 3, gap_s=0.01)
        tts = make_tts(server.base_url)
        stream = tts.synthesize_stream(deltas())
        while not isinstance(await anext(stream), AudioChunk):
            pass
        watch = Stopwatch()
        await stream.aclose()  # barge-in
        closed_in = watch.elapsed
        session = server.stream_inputs[0]
        await asyncio.wait_for(session.ended.wait(), 2.0)
        assert await server.wait_disconnect(within_s=1.0)
        await tts.aclose()
    assert closed_in < 0.5
    assert session.closed_by_client and not session.finished
    assert deltas.closed_early  # the text is no longer read either
    # No SynthesisDone after a close: the stream's usage says what was sent (and billed).
    assert isinstance(stream, StreamInput) and stream.usage.estimated
    assert stream.usage.characters == session.characters == server.usage_log[0]["characters"]
    assert 0 < session.characters < len(REPLY * 3)


async def test_socket_opens_before_the_first_text_and_before_any_read() -> None:
    async with ElevenLabsStandin() as server:
        tts = make_tts(server.base_url)
        deltas = Deltas("Hello there.", first_after_s=0.3)
        stream = tts.synthesize_stream(deltas())  # as the chain does: open, wait, then read
        await asyncio.sleep(0.2)
        opened = [session.init for session in server.stream_inputs]
        events = await collect(stream)
        await tts.aclose()
    assert opened == [{"text": " ",
                       "generation_config": {"chunk_length_schedule": [50, 120, 160, 250]}}]
    assert any(isinstance(e, AudioChunk) for e in events)


async def test_a_stream_closed_or_dropped_before_any_read_closes_its_socket() -> None:
    async with ElevenLabsStandin() as server:
        tts = make_tts(server.base_url)
        closed = tts.synthesize_stream(Deltas("Hello.", first_after_s=5.0)())
        dropped = tts.synthesize_stream(Deltas("Hello.", first_after_s=5.0)())
        while len([s for s in server.stream_inputs if s.init is not None]) < 2:
            await asyncio.sleep(0.01)
        await closed.aclose()  # a barge-in before the first token
        del dropped  # never read, never closed
        for session in server.stream_inputs:
            await asyncio.wait_for(session.ended.wait(), 2.0)
        await tts.aclose()
    assert all(s.closed_by_client and not s.messages for s in server.stream_inputs)


@pytest.mark.parametrize(("mode", "status", "retryable"),
                         [("401", 401, False), ("429", 429, True), ("500", 500, True)])
async def test_handshake_refused(mode: str, status: int, retryable: bool) -> None:
    async with ElevenLabsStandin() as server:
        server.mode = mode  # type: ignore[assignment]
        tts = make_tts(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize_stream(Deltas(REPLY)()))
        await tts.aclose()
    assert info.value.status == status and info.value.retryable is retryable
    assert not server.usage_log


async def test_wrong_key_is_refused_at_the_handshake() -> None:
    async with ElevenLabsStandin(api_key="xi-other") as server:
        tts = make_tts(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize_stream(Deltas(REPLY)()))
        await tts.aclose()
    assert info.value.status == 401 and not info.value.retryable


@pytest.mark.parametrize(("error", "retryable"), [
    ({"message": "Quota exceeded.", "error": "quota_exceeded", "code": 1008}, False),
    ({"message": "Internal error.", "error": "internal", "code": 500}, True)])
async def test_error_message_fails_before_audio(error: dict[str, object],
                                                retryable: bool) -> None:
    async with ElevenLabsStandin() as server:
        server.stream_error = error
        tts = make_tts(server.base_url)
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize_stream(Deltas(REPLY)()))
        await tts.aclose()
    assert str(error["message"]) in str(info.value) and info.value.retryable is retryable


async def test_hang_ends_at_the_first_audio_deadline() -> None:
    async with ElevenLabsStandin() as server:
        server.mode = "timeout"
        tts = make_tts(server.base_url, first_audio_timeout_s=0.3)
        watch = Stopwatch()
        with pytest.raises(ProviderError) as info:
            await collect(tts.synthesize_stream(Deltas(REPLY)()))
        elapsed = watch.elapsed
        session = server.stream_inputs[0]
        await asyncio.wait_for(session.ended.wait(), 2.0)
        await tts.aclose()
    assert "timed out" in str(info.value) and info.value.retryable
    assert 0.3 <= elapsed < 1.0
    assert session.closed_by_client


async def test_socket_dropped_after_audio_ends_truncated() -> None:
    async with ElevenLabsStandin() as server:
        server.mode = "cut"
        tts = make_tts(server.base_url)
        events = await collect(tts.synthesize_stream(Deltas(REPLY)()))
        await tts.aclose()
    session = server.stream_inputs[0]
    audio = b"".join(e.ulaw for e in events if isinstance(e, AudioChunk))
    assert audio == bytes(session.audio) and audio  # what came before the drop
    assert not any(isinstance(e, TextSpoken) for e in events)  # no sentence was finished
    done = events[-1]
    assert isinstance(done, SynthesisDone) and done.truncated


async def test_connection_refused_is_retryable() -> None:
    tts = make_tts(closed_port_url())
    with pytest.raises(ProviderError) as info:
        await collect(tts.synthesize_stream(Deltas(REPLY)()))
    await tts.aclose()
    assert info.value.retryable and info.value.status is None


async def test_usage_is_the_characters_sent() -> None:
    async with ElevenLabsStandin() as server:
        tts = make_tts(server.base_url)
        events = await collect(tts.synthesize_stream(Deltas(REPLY)()))
        session = server.stream_inputs[0]
        await asyncio.wait_for(session.ended.wait(), 2.0)
        await tts.aclose()
    done = events[-1]
    assert isinstance(done, SynthesisDone)
    sent = sum(len(message["text"]) for message in session.messages)
    assert done.usage.characters == sent == server.usage_log[0]["characters"]
    assert done.usage.estimated  # the socket reports no count of its own
    assert (done.usage.provider, done.usage.kind, done.usage.model) == ("elevenlabs", "tts",
                                                                        MODEL)


async def test_an_empty_reply_sends_no_text() -> None:
    async with ElevenLabsStandin() as server:
        tts = make_tts(server.base_url)
        events = await collect(tts.synthesize_stream(Deltas("  ")()))
        await tts.aclose()
    assert len(events) == 1 and isinstance(events[0], SynthesisDone)
    assert events[0].usage.characters == 0 and events[0].timing.first_byte_s is None
    assert all(not message.get("text")
               for session in server.stream_inputs for message in session.messages)


async def test_a_failing_text_source_fails_the_stream() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "Hello there, "
        raise RuntimeError("agent broke")

    async with ElevenLabsStandin() as server:
        tts = make_tts(server.base_url)
        with pytest.raises(RuntimeError, match="agent broke"):
            await collect(tts.synthesize_stream(failing()))
        await tts.aclose()


# --- the stand-in's wire, spoken directly ---------------------------------------------


async def test_standin_speaks_the_wire_format() -> None:
    async with ElevenLabsStandin() as server, aiohttp.ClientSession() as http:
        url = server.base_url.replace("http", "ws") + f"/v1/text-to-speech/{VOICE}/stream-input"
        query = {"model_id": MODEL, "output_format": "ulaw_8000", "sync_alignment": "true"}
        async with http.ws_connect(url, params=query) as ws:  # the key in the first message
            await ws.send_json({"text": " ", "xi-api-key": ELEVENLABS_KEY})
            await ws.send_json({"text": "Hi there. ", "flush": True})
            await ws.send_json({"text": ""})
            messages = [m.json() async for m in ws if m.type is aiohttp.WSMsgType.TEXT]
            close_code = ws.close_code
    audio = [m for m in messages if m.get("audio")]
    assert messages[-1] == {"isFinal": True} and close_code == 1000
    assert b"".join(base64.b64decode(m["audio"]) for m in audio) == bytes(
        server.stream_inputs[0].audio)
    chars = [c for m in audio if m["alignment"] for c in m["alignment"]["chars"]]
    assert "".join(chars) == "Hi there. "
    first = audio[0]["alignment"]
    assert first["charStartTimesMs"][:2] == [0, server.char_ms]
    assert first["charDurationsMs"][0] == server.char_ms


async def test_standin_refuses_a_wrong_key_in_the_first_message() -> None:
    async with ElevenLabsStandin() as server, aiohttp.ClientSession() as http:
        url = server.base_url.replace("http", "ws") + f"/v1/text-to-speech/{VOICE}/stream-input"
        async with http.ws_connect(url, params={"output_format": "ulaw_8000"}) as ws:
            await ws.send_json({"text": " ", "xi-api-key": "xi-wrong"})
            message = await ws.receive_json()
            closing = await ws.receive()
    assert message["error"] == "invalid_api_key" and message["code"] == 1008
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1008
    assert not server.usage_log
