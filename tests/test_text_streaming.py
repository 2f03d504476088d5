"""Text streamed into the voice: the first clause cut, the text feed, and a chain of voices
read as the agent writes (real espeak synthesis; the input-streaming voice has its own
tests in test_tts_elevenlabs_stream.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.providers.base import AudioChunk, SynthesisDone, TextSpoken
from engine.providers.builtin.tts_espeak import EspeakTTS
from engine.providers.caching_tts import CachingTTS
from engine.providers.fallback_tts import FallbackTTS
from engine.providers.response_cache import MemoryResponseCache
from engine.providers.sentences import SentenceAggregator
from engine.providers.text_feed import TextFeed

OPENING = "We open at nine in the morning on Saturday. We close at four."
ANSWER = ["Sure", ", our opening", " hours are", " nine to five", ", Monday to Friday.",
          " We close", " at noon on Saturday."]


def test_the_first_piece_is_cut_at_a_clause_once_it_has_enough_words() -> None:
    agg = SentenceAggregator(first_clause_words=4)
    out: list[str] = []
    for piece in ANSWER:
        out += agg.push(piece)
    assert out == ["Sure, our opening hours are nine to five,", "Monday to Friday."]
    assert agg.flush() == "We close at noon on Saturday."
    # "Sure," alone is too short to be said apart; whole sentences when switched off.
    plain = SentenceAggregator()
    assert [s for piece in ANSWER for s in plain.push(piece)] == [
        "Sure, our opening hours are nine to five, Monday to Friday."]
    # A sentence that is done before a clause is long enough goes whole.
    assert SentenceAggregator(4).push("Yes, we do. Thanks, really") == ["Yes, we do."]


async def test_every_reader_gets_the_whole_text_from_the_start() -> None:
    feed = TextFeed()
    early: list[str] = []

    async def read(into: list[str]) -> None:
        async for piece in feed.reader():
            into.append(piece)

    first_reader = asyncio.create_task(read(early))
    waiting = asyncio.create_task(feed.wait_first())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    feed.push("Hello")
    await asyncio.wait_for(waiting, 1)
    feed.push(" there.")
    late: list[str] = []
    second_reader = asyncio.create_task(read(late))  # a fallback voice taking over
    await asyncio.sleep(0.01)
    feed.push(" Bye.")
    feed.close()
    await asyncio.wait_for(asyncio.gather(first_reader, second_reader), 1)
    assert early == late == ["Hello", " there.", " Bye."]
    assert feed.text == "Hello there. Bye."
    with pytest.raises(RuntimeError):
        feed.push("more")


def _chain(first_audio_timeout_s: float = 1.0) -> tuple[FallbackTTS, MemoryResponseCache]:
    cache = MemoryResponseCache(100, 60.0)
    tts = FallbackTTS([CachingTTS(EspeakTTS(), cache, first_clause_words=4)],
                      first_audio_timeout_s=first_audio_timeout_s)
    return tts, cache


async def test_a_whole_request_voice_speaks_before_the_answer_is_written() -> None:
    tts, cache = _chain()
    assert not tts.streams_text
    feed = TextFeed()
    events: list[tuple[float, object]] = []

    async def consume() -> None:
        async for event in tts.synthesize_stream(feed):
            events.append((time.monotonic(), event))

    consumer = asyncio.create_task(consume())
    for piece in ANSWER[:5]:
        feed.push(piece)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    first_audio = next(t for t, e in events if isinstance(e, AudioChunk))
    rest_written = time.monotonic()
    for piece in ANSWER[5:]:
        feed.push(piece)
    feed.close()
    await asyncio.wait_for(consumer, 10)

    assert first_audio < rest_written
    spoken = [e.text for _, e in events if isinstance(e, TextSpoken)]
    assert spoken == ["Sure, our opening hours are nine to five,", "Monday to Friday.",
                      "We close at noon on Saturday."]
    done = events[-1][1]
    assert isinstance(done, SynthesisDone) and not done.truncated
    assert done.usage.characters == sum(len(s) for s in spoken)
    # Each piece was synthesized through the cache: a second answer is all replayed.
    again = TextFeed()
    for piece in ANSWER:
        again.push(piece)
    again.close()
    replay = [e async for e in tts.synthesize_stream(again)]
    assert isinstance(replay[-1], SynthesisDone) and replay[-1].usage.cached
    assert cache.stats().audio.hits == 3


async def test_the_first_audio_clock_starts_at_the_first_text() -> None:
    # The agent takes longer than the voice's deadline to write anything: no failover.
    tts, _ = _chain(first_audio_timeout_s=0.3)
    feed = TextFeed()

    async def write_late() -> None:
        await asyncio.sleep(0.6)
        feed.push("Thanks for waiting.")
        feed.close()

    writer = asyncio.create_task(write_late())
    events = [e async for e in tts.synthesize_stream(feed)]
    await writer
    assert any(isinstance(e, AudioChunk) for e in events)
    assert [h.consecutive_failures for h in tts.health()] == [0]


def test_the_voice_stream_flushes_its_first_words_when_the_sentence_runs_on() -> None:
    from engine.providers.builtin.spoken_text import SpokenText, WordPieces

    pieces = WordPieces(SpokenText(), flush_first_sentence=True, first_flush_words=5)
    sent: list[tuple[str, bool]] = []
    for token in OPENING.split(" "):
        sent += pieces.push(token + " ")
    first_flush = next(i for i, (_, flush) in enumerate(sent) if flush)
    # Flushed at the fifth word, long before the sentence's end; then the schedule.
    assert "".join(text for text, _ in sent[:first_flush + 1]) == "We open at nine in "
    assert [flush for _, flush in sent].count(True) == 1, sent
    # Without the word limit the first flush waits for the sentence's end.
    whole = WordPieces(SpokenText(), flush_first_sentence=True)
    out: list[tuple[str, bool]] = []
    for token in OPENING.split(" ")[:-2]:
        out += whole.push(token + " ")
    first_flush = next(i for i, (_, flush) in enumerate(out) if flush)
    assert "".join(t for t, _ in out[:first_flush + 1]) == \
        "We open at nine in the morning on Saturday. ", out


# --- a real engine: the agent's tokens into ElevenLabs' input stream ---------------------

REPLY = ("Our store is at 12 Main Street, next to the station. We are open from nine to "
         "five. Parking is free for customers. Ask at the desk for a parking ticket.")


async def _streaming_engine(config):  # type: ignore[no-untyped-def]
    from engine.wiring import Providers, build_engine, build_providers
    from tests.harness import local_providers

    local, cloud = local_providers(config), build_providers(config)
    return await build_engine(config, history=False, supervisor_api=False,
                              providers=Providers(stt=local.stt, agents=cloud.agents,
                                                  tts=cloud.tts))


@pytest.mark.slow
async def test_a_reply_streamed_into_the_voice_is_heard_cut_and_cached(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.bus.events import TranscriptLine
    from engine.sim.scenario import Scenario, Step
    from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
    from engine.sim.standins.openai_api import OpenAIStandin
    from tests.harness import EventLog, base_sections, running_engine

    openai, eleven = OpenAIStandin(api_key="sk-test"), ElevenLabsStandin(api_key="xi-test")
    oa_url, el_url = await openai.start(), await eleven.start()
    openai.reply = REPLY
    openai.token_interval_s = 0.03
    sections = base_sections()
    sections["providers"] = {
        "agent": ["openai"], "tts": ["elevenlabs"],
        "openai": {"api_key": "sk-test", "base_url": oa_url},
        "elevenlabs": {"api_key": "xi-test", "base_url": el_url}}
    try:
        async with running_engine(tmp_path, make_engine=_streaming_engine,
                                  **sections) as run:
            events = EventLog(run)
            whole = run.caller()
            await asyncio.wait_for(whole.run(Scenario(name="whole", steps=[
                Step(say="Where is your store?")])), 60)
            streamed_requests = len(eleven.stream_inputs)
            cut = run.caller()
            await asyncio.wait_for(cut.run(Scenario(name="cut", steps=[
                Step(say="How do I get to your store?"),
                Step(say="Wait, do you have parking?", barge_in=True, after_s=1.2)])), 60)
            again = run.caller()
            await asyncio.wait_for(again.run(Scenario(name="again", steps=[
                Step(say="Where is your store?")])), 60)
            await asyncio.sleep(0.2)
            await events.close()
    finally:
        await openai.stop()
        await eleven.stop()

    def agent_lines(call_sid: str) -> list[TranscriptLine]:
        return [e for e in events.lines(call_sid, "agent")
                if e.text != run.config.engine.greeting]

    # Spoken through the input stream, all of it heard.
    (line,) = agent_lines(whole.call_sid)
    assert streamed_requests >= 1 and line.text == REPLY and not line.interrupted
    assert line.heard_text == REPLY
    # Cut by the caller: what was heard is a true prefix of the reply, by sentence or word.
    first = agent_lines(cut.call_sid)[0]
    assert first.interrupted and first.heard_text, first
    heard = first.heard_text.rstrip("…")
    assert REPLY.startswith(heard) and len(heard) < len(REPLY), first
    # The same question again: the answer from the answer cache, its whole sentences'
    # audio from the audio cache (stored from the streamed reply): no new voice request
    # for them.
    (repeat,) = agent_lines(again.call_sid)
    assert repeat.text == REPLY
    stats = run.engine.deps.cache.stats()
    assert stats.answers.hits >= 1 and stats.audio.hits >= 4, stats
