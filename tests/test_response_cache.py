"""Response cache: memory LRU/TTL, CachingTTS, and the Redis backend on a real server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from engine.config import Config, ConfigError
from engine.providers.base import (
    AudioChunk,
    ProviderError,
    SynthesisDone,
    SynthesisEvent,
    TextToSpeech,
    Timing,
    Usage,
)
from engine.providers.caching_tts import CACHED_CHUNK_BYTES, CachingTTS
from engine.providers.fallback_tts import FallbackTTS
from engine.providers.response_cache import (
    MemoryResponseCache,
    NullCache,
    RedisResponseCache,
    ResponseCache,
    make_response_cache,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


# --- a local redis-server (the lead will consolidate with tests/redis_server.py) ------


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes] | None  # None: an external server from REDIS_URL
    binary: str = ""
    port: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        pytest.fail("redis-server did not start")
                    time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_unavailable(reason: str) -> None:
    if os.environ.get("SWITCHBOARD_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (SWITCHBOARD_REQUIRE_REDIS=1)")
    pytest.skip(reason)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REDIS_URL"):
            yield RedisServer(os.environ["REDIS_URL"], None)
            return
        _redis_unavailable("no redis-server binary and REDIS_URL unset")
    assert binary is not None
    port = _free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", None, binary, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- a scripted TTS (a double of our own Protocol) ------------------------------------


class CountingTTS:
    """Yields `chunks` then SynthesisDone; `fail_after` raises after that many chunks."""
    runs_locally = False

    def __init__(self, chunks: list[bytes], fail_after: int | None = None,
                 name: str = "eleven", voice: str = "rachel") -> None:
        self.name = name
        self.voice = voice
        self.model = "flash"
        self.chunks = chunks
        self.fail_after = fail_after
        self.calls = 0

    async def synthesize(self, text: str) -> AsyncIterator[SynthesisEvent]:
        self.calls += 1
        for index, chunk in enumerate(self.chunks):
            if self.fail_after is not None and index == self.fail_after:
                raise ProviderError(self.name, "connection reset")
            yield AudioChunk(chunk)
        yield SynthesisDone(Usage(self.name, "tts", self.model, characters=len(text)),
                            Timing(0.1, 0.3))

    def estimate_usage(self, text: str) -> Usage:
        return Usage(self.name, "tts", self.model, characters=len(text), estimated=True)

    async def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


AUDIO = [bytes(range(256)) * 4, b"\x00\xff" * 300, b"\x7f" * 123]  # all byte values


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


def audio_of(events: list[Any]) -> bytes:
    return b"".join(e.ulaw for e in events if isinstance(e, AudioChunk))


# --- memory backend -------------------------------------------------------------------


async def test_memory_lru_evicts_least_recently_used() -> None:
    cache = MemoryResponseCache(max_entries=2, ttl_s=60)
    await cache.put_answer("faq:hours", "nine to five")
    await cache.put_answer("faq:address", "1 Main St")
    assert await cache.get_answer("faq:hours") == "nine to five"  # now most recent
    await cache.put_answer("faq:prices", "ask us")
    assert await cache.get_answer("faq:address") is None
    assert await cache.get_answer("faq:hours") == "nine to five"
    assert await cache.get_answer("faq:prices") == "ask us"
    stats = cache.stats().answers
    assert (stats.hits, stats.misses) == (3, 1) and stats.hit_rate == pytest.approx(0.75)
    assert cache.stats().audio.hits == 0


async def test_memory_ttl_expires_entries() -> None:
    clock = FakeClock()
    cache = MemoryResponseCache(max_entries=10, ttl_s=30, clock=clock)
    await cache.put_audio("p", "v", "Hello.", b"\x01\x02")
    clock.now += 29.9
    assert await cache.get_audio("p", "v", "Hello.") == b"\x01\x02"
    clock.now += 0.1
    assert await cache.get_audio("p", "v", "Hello.") is None
    assert cache.audio_entries == 0 and cache.audio_bytes == 0


async def test_memory_audio_bounded_by_total_bytes() -> None:
    cache = MemoryResponseCache(max_entries=100, ttl_s=60, max_audio_bytes=1000)
    for index in range(4):
        await cache.put_audio("p", "v", f"sentence {index}", bytes([index]) * 400)
    assert cache.audio_bytes <= 1000 and cache.audio_entries == 2
    assert await cache.get_audio("p", "v", "sentence 0") is None
    assert await cache.get_audio("p", "v", "sentence 3") == b"\x03" * 400
    await cache.put_audio("p", "v", "huge", b"\x00" * 1001)  # bigger than the cache
    assert await cache.get_audio("p", "v", "huge") is None
    assert cache.audio_entries == 2  # and nothing was evicted for it


async def test_audio_key_separates_provider_voice_and_text() -> None:
    cache = MemoryResponseCache(max_entries=10, ttl_s=60)
    await cache.put_audio("eleven", "rachel", "Hi.", b"\x01")
    assert await cache.get_audio("eleven", "adam", "Hi.") is None
    assert await cache.get_audio("espeak", "rachel", "Hi.") is None
    assert await cache.get_audio("eleven", "rachel", "Hi!") is None
    assert await cache.get_audio("eleven", "rachel", "Hi.") == b"\x01"


# --- CachingTTS -----------------------------------------------------------------------


async def test_caching_tts_hit_serves_identical_bytes_without_calling_inner() -> None:
    inner = CountingTTS(AUDIO)
    tts = CachingTTS(inner, MemoryResponseCache(max_entries=10, ttl_s=60))
    assert isinstance(tts, TextToSpeech)
    first = await collect(tts.synthesize("Welcome to Acme."))
    assert inner.calls == 1 and first[-1].usage.characters == len("Welcome to Acme.")

    second = await collect(tts.synthesize("Welcome to Acme."))
    assert inner.calls == 1
    assert audio_of(second) == b"".join(AUDIO)
    chunks = [e for e in second if isinstance(e, AudioChunk)]
    assert all(len(c.ulaw) <= CACHED_CHUNK_BYTES for c in chunks) and len(chunks) >= 2
    done = second[-1]
    assert isinstance(done, SynthesisDone)
    # A free line that says it came from the cache (Usage.cached replaced ":cache").
    assert done.usage.cached and done.usage.provider == "eleven"
    assert done.usage.characters == 0 and not first[-1].usage.cached

    await collect(tts.synthesize("Something else."))
    assert inner.calls == 2
    assert tts.cache.stats().audio.hits == 1 and tts.cache.stats().audio.misses == 2


async def test_caching_tts_does_not_store_a_cut_stream() -> None:
    inner = CountingTTS(AUDIO)
    tts = CachingTTS(inner, MemoryResponseCache(max_entries=10, ttl_s=60))
    stream = tts.synthesize("Barge in on me.")
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]  # barge-in
    await collect(tts.synthesize("Barge in on me."))
    assert inner.calls == 2


async def test_caching_tts_does_not_store_a_failed_stream() -> None:
    inner = CountingTTS(AUDIO, fail_after=2)
    cache = MemoryResponseCache(max_entries=10, ttl_s=60)
    tts = CachingTTS(inner, cache)
    with pytest.raises(ProviderError):
        await collect(tts.synthesize("Broken."))
    assert cache.audio_entries == 0


async def test_caching_tts_does_not_store_truncated_fallback_audio() -> None:
    # Wrapping a whole chain: its mid-stream failure ends with a truncated done.
    chain = FallbackTTS([CountingTTS(AUDIO, fail_after=1)], first_audio_timeout_s=1)
    cache = MemoryResponseCache(max_entries=10, ttl_s=60)
    out = await collect(CachingTTS(chain, cache).synthesize("Cut."))
    assert audio_of(out) == AUDIO[0]
    assert cache.audio_entries == 0


async def test_caching_tts_key_includes_model() -> None:
    cache = MemoryResponseCache(max_entries=10, ttl_s=60)
    inner = CountingTTS(AUDIO)
    await collect(CachingTTS(inner, cache).synthesize("Hi."))
    inner.model = "multilingual"
    await collect(CachingTTS(inner, cache).synthesize("Hi."))
    assert inner.calls == 2


# --- null backend and the factory -----------------------------------------------------


async def test_null_cache_stores_nothing() -> None:
    cache = NullCache()
    await cache.put_answer("k", "v")
    await cache.put_audio("p", "v", "t", b"\x01")
    assert await cache.get_answer("k") is None
    assert await cache.get_audio("p", "v", "t") is None
    assert cache.stats().audio.misses == 1 and cache.stats().audio.hit_rate == 0.0


async def test_make_response_cache_follows_config() -> None:
    config = Config()
    assert isinstance(make_response_cache(config), MemoryResponseCache)
    config.cache.backend = "off"
    assert isinstance(make_response_cache(config), NullCache)
    config.cache.backend = "redis"
    with pytest.raises(ConfigError, match=r"redis\.url"):
        make_response_cache(config)
    config.redis.url = "not-a-url"
    with pytest.raises(ConfigError, match=r"invalid redis\.url"):
        make_response_cache(config)
    config.redis.url = "redis://127.0.0.1:1/0"
    cache = make_response_cache(config)
    assert isinstance(cache, RedisResponseCache) and isinstance(cache, ResponseCache)
    await cache.aclose()


# --- redis backend (real server) ------------------------------------------------------


def _prefix() -> str:
    return f"sbtest-{uuid.uuid4().hex[:8]}"


@pytest.mark.redis
async def test_redis_binary_audio_roundtrip_with_ttl(redis_server: RedisServer) -> None:
    prefix = _prefix()
    cache = RedisResponseCache(redis_server.url, prefix, ttl_s=3600)
    ulaw = b"".join(AUDIO)
    await cache.put_audio("eleven/flash", "rachel", "Hello.", ulaw)
    assert await cache.get_audio("eleven/flash", "rachel", "Hello.") == ulaw
    assert await cache.get_audio("eleven/flash", "rachel", "Other.") is None
    await cache.put_answer("faq:hours", "Nous ouvrons à 9 h — bienvenue")
    assert await cache.get_answer("faq:hours") == "Nous ouvrons à 9 h — bienvenue"

    raw = aioredis.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() if isinstance(k, bytes) else k
                      for k in await raw.keys(f"{prefix}:*"))
        assert len(keys) == 2
        assert keys[0].startswith(f"{prefix}:cache:answer:")
        assert keys[1].startswith(f"{prefix}:cache:audio:")
        for key in keys:
            assert 3590 <= await raw.ttl(key) <= 3600
    finally:
        await raw.aclose()
        await cache.aclose()
    stats = cache.stats()
    assert (stats.audio.hits, stats.audio.misses, stats.answers.hits) == (1, 1, 1)


@pytest.mark.redis
async def test_redis_two_engines_share_entries(redis_server: RedisServer) -> None:
    prefix = _prefix()
    engine_a = RedisResponseCache(redis_server.url, prefix, ttl_s=60)
    engine_b = RedisResponseCache(redis_server.url, prefix, ttl_s=60)
    try:
        tts_a = CachingTTS(CountingTTS(AUDIO), engine_a)
        inner_b = CountingTTS([b"never used"])
        tts_b = CachingTTS(inner_b, engine_b)
        await collect(tts_a.synthesize("Thanks for calling."))
        out = await collect(tts_b.synthesize("Thanks for calling."))
        assert audio_of(out) == b"".join(AUDIO) and inner_b.calls == 0
        await engine_b.put_answer("faq:hours", "nine to five")
        assert await engine_a.get_answer("faq:hours") == "nine to five"
    finally:
        await engine_a.aclose()
        await engine_b.aclose()


@pytest.mark.redis
async def test_redis_outage_degrades_to_miss(redis_server: RedisServer) -> None:
    if redis_server.process is None:
        _redis_unavailable("cannot stop an external REDIS_URL server")
    cache = RedisResponseCache(redis_server.url, _prefix(), ttl_s=60, op_timeout_s=0.5,
                               retry_after_s=5.0)
    try:
        await cache.put_audio("p", "v", "Hi.", b"\x01\x02")
        assert await cache.get_audio("p", "v", "Hi.") == b"\x01\x02"
        redis_server.stop()

        with capture_logs() as logs:
            started = time.monotonic()
            assert await cache.get_audio("p", "v", "Hi.") is None
            assert await cache.get_answer("faq:hours") is None
            await cache.put_audio("p", "v", "Hi.", b"\x03")
            elapsed = time.monotonic() - started
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and warnings[0]["op"] == "get_audio"
        assert "unavailable" in warnings[0]["event"]
        assert elapsed < 1.0  # one bounded failure, then skipped during the back-off
        assert cache.stats().audio.errors == 1 and cache.stats().audio.misses == 1
    finally:
        await cache.aclose()


@pytest.mark.redis
async def test_redis_recovers_after_back_off(redis_server: RedisServer) -> None:
    if redis_server.process is None:
        _redis_unavailable("cannot restart an external REDIS_URL server")
    clock = FakeClock()
    # A generous operation timeout: a loaded CI machine must not turn a slow reply
    # after the restart into a second outage.
    cache = RedisResponseCache(redis_server.url, _prefix(), ttl_s=60, retry_after_s=5.0,
                               op_timeout_s=3.0, clock=clock)
    try:
        redis_server.stop()
        assert await cache.get_answer("k") is None
        assert cache.stats().answers.errors == 1
        redis_server.start()  # same port, empty data
        await cache.put_answer("k", "v")  # still backing off: not even sent
        assert await cache.get_answer("k") is None
        clock.now += 5
        with capture_logs() as logs:
            assert await cache.get_answer("k") is None  # reachable, but nothing was stored
            await cache.put_answer("k", "v")
            assert await cache.get_answer("k") == "v"
        assert any("reachable again" in e["event"] for e in logs)
        assert cache.stats().answers.errors == 1
    finally:
        await cache.aclose()


@pytest.mark.redis
async def test_frozen_redis_costs_one_bounded_timeout(redis_server: RedisServer) -> None:
    if redis_server.process is None:
        _redis_unavailable("cannot freeze an external REDIS_URL server")
    process = redis_server.process
    assert process is not None
    cache = RedisResponseCache(redis_server.url, _prefix(), ttl_s=60, op_timeout_s=0.2)
    try:
        await cache.put_answer("k", "v")  # connection established while healthy
        process.send_signal(signal.SIGSTOP)  # up, but never answers
        try:
            started = time.monotonic()
            assert await cache.get_answer("k") is None
            first = time.monotonic() - started
            started = time.monotonic()
            assert await cache.get_answer("k") is None  # backing off: immediate miss
            second = time.monotonic() - started
        finally:
            process.send_signal(signal.SIGCONT)
        assert 0.15 <= first < 0.6
        assert second < 0.05
    finally:
        await cache.aclose()
