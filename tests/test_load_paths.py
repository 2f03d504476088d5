"""What keeps 250 calls on one core (issue 12, point 5): full garbage collections only at
the pacer's safe point, the engine's event loop (uvloop where installed), and realtime
transcription sessions kept for as many utterances as were in progress at once."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from engine.audio.frames import FRAME_BYTES
from engine.providers.builtin.stt_openai_realtime import OpenAIRealtimeTranscriber
from engine.serve import LOOP_ENV, loop_name, run
from engine.sim.standins.openai_api import OpenAIStandin
from engine.telephony.collector import FullCollections
from engine.telephony.outbound import OutboundPlayer, Pacer
from tests.cloud_fixtures import OPENAI_KEY, speech_pcm16

RATE = 8000


@pytest.fixture
def full_collections() -> Iterator[list[int]]:
    """The generation of every collection the collector runs while the test does."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            seen.append(int(info["generation"]))

    saved = gc.get_threshold()
    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*saved)


def promote(objects: int) -> list[list[int]]:
    """Allocate `objects` cyclic-GC-tracked objects that stay alive through young
    collections (they are promoted to the oldest generation)."""
    return [[i] for i in range(objects)]


async def test_no_full_collection_runs_but_at_the_safe_point(
        full_collections: list[int]) -> None:
    sent: list[str] = []

    async def send(message: str) -> None:
        sent.append(message)

    threshold_before = gc.get_threshold()  # another test's engine may still hold it
    pacer = Pacer()
    # Long enough for the allocations below on a busy machine (the collection is not due
    # before the test says so); by time only, however many objects wait.
    collector = FullCollections(pacer, interval_s=1.0, max_pending=1 << 30)
    collector.start()
    # A stream with audio to play: the pacer is awake (its ticks are run by hand here).
    OutboundPlayer("CA1", "MZ1", send, None, pacer).enqueue_audio(b"\xff" * FRAME_BYTES * 50)
    now = asyncio.get_running_loop().time
    try:
        assert gc.get_threshold()[2] >= 1 << 30  # automatic full collections off
        full_collections.clear()
        kept = promote(300_000)  # CPython would collect the oldest generation for this
        assert 0 in full_collections and 1 in full_collections  # young ones go on
        assert 2 not in full_collections
        await collector.after_tick(now())  # not due yet
        assert 2 not in full_collections and not sent
        await asyncio.sleep(1.05)  # due; the timer leaves it to the ticks
        assert 2 not in full_collections
        hook = pacer.after_tick
        assert hook is not None
        await hook(now())  # the pacer's next tick takes it, its streams sent ahead first
        assert full_collections.count(2) == 1 and collector.collections == 1
        assert len(sent) == round((pacer.lead_s + collector.headroom_s) / 0.02)
        await collector.after_tick(now())  # once per interval
        assert full_collections.count(2) == 1
        del kept
    finally:
        collector.stop()
    assert gc.get_threshold() == threshold_before and collector.pacer.after_tick is None


async def test_a_reply_just_starting_puts_the_collection_off_a_tick(
        full_collections: list[int]) -> None:
    async def send(message: str) -> None:
        pass

    pacer = Pacer()
    collector = FullCollections(pacer, interval_s=0.05, headroom_above=0)  # a long pause
    collector.start()
    player = OutboundPlayer("CA1", "MZ1", send, None, pacer)
    now = asyncio.get_running_loop().time
    try:
        player.enqueue_audio(b"\xff" * FRAME_BYTES * 5)  # its first 100 ms of speech
        gc.collect(1)  # something promoted: the collection is not skipped
        await asyncio.sleep(0.08)  # due
        full_collections.clear()
        await collector.after_tick(now())
        assert 2 not in full_collections  # 100 ms at Twilio would not outlast a pause
        player.enqueue_audio(b"\xff" * FRAME_BYTES * 50)  # the rest came
        await collector.after_tick(now())
        assert 2 in full_collections
    finally:
        collector.stop()


async def test_without_audio_playing_a_timer_takes_the_collection(
        full_collections: list[int]) -> None:
    collector = FullCollections(Pacer(), interval_s=0.1)
    collector.start()
    try:
        kept = promote(50_000)
        full_collections.clear()
        await asyncio.sleep(0.35)  # the pacer never ticks: no call is playing audio
        assert 2 in full_collections
        del kept
    finally:
        collector.stop()


async def test_before_a_full_collection_every_stream_is_sent_the_headroom(
        full_collections: list[int]) -> None:
    sent: list[str] = []
    sent_at_collection: list[int] = []

    async def send(message: str) -> None:
        sent.append(message)

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            sent_at_collection.append(len(sent))

    pacer = Pacer(lead_s=0.04)  # two frames ahead
    collector = FullCollections(pacer, interval_s=0.06, headroom_s=0.1,  # five more
                                headroom_above=0)  # however short the pause
    player = OutboundPlayer("CA1", "MZ1", send, None, pacer)
    collector.start()
    gc.callbacks.append(record)
    try:
        gc.collect(1)  # something promoted: the collection is not skipped
        player.enqueue_audio(b"\xff" * FRAME_BYTES * 50)  # a second of speech
        pacer.start()
        await asyncio.sleep(0.1)
    finally:
        gc.callbacks.remove(record)
        await pacer.stop()
        collector.stop()
    assert sent_at_collection, "no full collection at a tick"
    # By the first collection: the lead plus the headroom ahead of the tick, 7 frames
    # (and the 20 ms frames of the ticks that ran before it).
    first = sent_at_collection[0]
    assert 7 <= first <= 7 + 10
    assert len(sent) < 50  # then the pacer waits for the lead to come back


async def test_many_objects_pending_bring_the_collection_forward(
        full_collections: list[int]) -> None:
    sent = 0

    async def send(message: str) -> None:
        nonlocal sent
        sent += 1

    pacer = Pacer()
    # Not due for an hour by time: only the pending count can bring it forward.
    collector = FullCollections(pacer, interval_s=3600.0, max_pending=20_000,
                                probe_every_s=0.0, headroom_above=40_000)
    collector.start()
    OutboundPlayer("CA1", "MZ1", send, None, pacer).enqueue_audio(b"\xff" * FRAME_BYTES * 50)
    now = asyncio.get_running_loop().time
    try:
        few = promote(2_000)
        gc.collect(1)  # promoted into the oldest generation, under the limit
        full_collections.clear()
        await collector.after_tick(now())
        assert 2 not in full_collections and collector.collections == 0
        many = promote(30_000)  # calls arriving together
        gc.collect(1)
        await collector.after_tick(now())
        assert full_collections.count(2) == 1
        assert collector.collections == 1 and collector.early == 1
        assert len(gc.get_objects(generation=2)) < 1_000  # frozen: traversed once
        assert sent == 0  # 30,000 objects: a short pause, the usual lead covers it
        await collector.after_tick(now())  # nothing new pending: no second one
        assert full_collections.count(2) == 1
        del few, many
    finally:
        collector.stop()


class _Cycle:
    """Cyclic garbage once dropped: only a collection frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_a_collection_traverses_only_what_came_since_the_last_one() -> None:
    collector = FullCollections(Pacer(), sweep_interval_s=3600.0)
    collector.start()
    try:
        kept = promote(20_000)  # a call's long-lived objects
        gc.collect(1)
        collector.collect(0.0)  # traverses them once, then they are frozen
        frozen = gc.get_freeze_count()
        young = promote(500)  # what the next window brings
        cycle = _Cycle()  # made and dropped within the window: the next collection's
        gc.collect(1)
        del cycle
        before = len(gc.get_objects(generation=2))
        collector.collect(0.0)
        assert before < 5_000  # the frozen 20,000 are not in the traversed generation
        assert gc.get_freeze_count() >= frozen + 500
        old_cycle = _Cycle()  # alive at a freeze, garbage later: waits for the sweep
        ref = weakref.ref(old_cycle)
        gc.collect(1)
        collector.collect(0.0)
        del old_cycle
        collector.collect(0.0)
        assert ref() is not None  # frozen: the window's collection cannot see it
        collector.sweep_now()
        assert ref() is None and collector.sweeps == 1 and collector.swept >= 1
        del kept, young
    finally:
        collector.stop()
    if gc.get_threshold()[2] < 1 << 30:  # no other engine's collector in this process
        assert gc.get_freeze_count() == 0  # stopping hands every object back


async def test_engines_in_one_process_share_the_collectors_settings() -> None:
    before = gc.get_threshold()
    first, second = FullCollections(Pacer()), FullCollections(Pacer())
    first.start()
    second.start()
    try:
        first.stop()  # the other engine still runs: full collections stay its job
        assert gc.get_threshold()[2] >= 1 << 30
    finally:
        second.stop()
    assert gc.get_threshold() == before


def test_the_engine_loop_is_uvloop_where_installed_unless_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")

    async def which() -> str:
        return loop_name(asyncio.get_running_loop())

    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert run(which()) == "uvloop"
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert run(which()) == "asyncio"
    assert os.environ[LOOP_ENV] == "asyncio"


async def test_the_stt_pool_keeps_as_many_sessions_as_utterances_in_progress() -> None:
    async with OpenAIStandin() as server:
        server.latency_s = 0.02
        stt = OpenAIRealtimeTranscriber(OPENAI_KEY, server.base_url, pool_size=1)
        await stt.warm_up()

        async def utterance() -> str:
            stream = stt.open_stream(RATE)
            pcm = speech_pcm16(0.2, RATE)
            for offset in range(0, len(pcm), 320):
                stream.push(pcm[offset:offset + 320])
            try:
                return (await stream.finish()).text
            finally:
                await stream.aclose()

        first = await asyncio.gather(*(utterance() for _ in range(3)))
        assert stt.idle_sessions == 3  # three were held at once: all three stay warm
        second = await asyncio.gather(*(utterance() for _ in range(3)))
        assert stt.idle_sessions == 3
        await stt.aclose()
    assert all(first) and all(second)
    assert len(server.realtime.connections) == 3  # the second round opened none
    assert sorted(len(c.commits) for c in server.realtime.connections) == [2, 2, 2]
