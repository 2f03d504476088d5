"""Response cache: reusable agent answers and synthesized audio.

Two namespaces behind one small interface:
- answers: `AgentDone.cache_key` (e.g. "faq:hours") -> answer text;
- audio: (TTS provider, voice, text) -> mu-law 8 kHz bytes, so a repeated sentence
  (greeting, FAQ answers) costs no TTS characters and starts playing at once.

Backends: in-process LRU with TTL (`memory`), Redis shared by every engine (`redis`),
or nothing (`off`). A cache is an optimisation: every backend error degrades to a miss
with a warning log and never reaches the call. `CachingTTS` (caching_tts.py) puts the
audio namespace in front of a voice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.config import Config, ConfigError
from engine.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    hit_rate: float  # hits / (hits + misses); 0.0 before any lookup
    errors: int = 0  # backend errors (each also counted as a miss)


@dataclass(frozen=True, slots=True)
class ResponseCacheStats:
    answers: CacheStats
    audio: CacheStats


class _Counter:
    __slots__ = ("errors", "hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.errors = 0

    def record(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def snapshot(self) -> CacheStats:
        total = self.hits + self.misses
        return CacheStats(hits=self.hits, misses=self.misses,
                          hit_rate=self.hits / total if total else 0.0, errors=self.errors)


def audio_key(provider: str, voice: str, text: str) -> str:
    """Hex sha256 of (provider, voice, text); a separator keeps the parts apart."""
    return hashlib.sha256("\x1f".join((provider, voice, text)).encode("utf-8")).hexdigest()


def answer_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@runtime_checkable
class ResponseCache(Protocol):
    async def get_answer(self, key: str) -> str | None: ...

    async def put_answer(self, key: str, text: str) -> None: ...

    async def get_audio(self, provider: str, voice: str, text: str) -> bytes | None: ...

    async def put_audio(self, provider: str, voice: str, text: str, ulaw: bytes) -> None: ...

    def stats(self) -> ResponseCacheStats: ...

    async def aclose(self) -> None: ...


# --- off ------------------------------------------------------------------------------


class NullCache:
    """backend = "off": stores nothing, every lookup misses."""

    def __init__(self) -> None:
        self._answers = _Counter()
        self._audio = _Counter()

    async def get_answer(self, key: str) -> str | None:
        self._answers.record(False)
        return None

    async def put_answer(self, key: str, text: str) -> None:
        return None

    async def get_audio(self, provider: str, voice: str, text: str) -> bytes | None:
        self._audio.record(False)
        return None

    async def put_audio(self, provider: str, voice: str, text: str, ulaw: bytes) -> None:
        return None

    def stats(self) -> ResponseCacheStats:
        return ResponseCacheStats(self._answers.snapshot(), self._audio.snapshot())

    async def aclose(self) -> None:
        return None


# --- memory ---------------------------------------------------------------------------


class _LruTtl:
    """LRU with per-entry expiry and an optional bound on the total size of values."""

    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int | None,
                 clock: Callable[[], float]) -> None:
        self._entries: OrderedDict[str, tuple[float, Any, int]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._clock = clock
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value, _ = entry
        if self._clock() >= expires_at:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any, size: int) -> bool:
        if self._max_bytes is not None and size > self._max_bytes:
            return False  # larger than the whole cache: storing it would evict everything
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (self._clock() + self._ttl_s, value, size)
        self.total_bytes += size
        while len(self._entries) > self._max_entries or (
                self._max_bytes is not None and self.total_bytes > self._max_bytes):
            self._remove(next(iter(self._entries)))
        return True

    def _remove(self, key: str) -> None:
        _, _, size = self._entries.pop(key)
        self.total_bytes -= size


class MemoryResponseCache:
    """In-process LRU + TTL. `max_entries` bounds each namespace; audio also by bytes."""

    def __init__(self, max_entries: int, ttl_s: float, *,
                 max_audio_bytes: int = 64 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._answers = _LruTtl(max_entries, ttl_s, None, clock)
        self._audio = _LruTtl(max_entries, ttl_s, max_audio_bytes, clock)
        self._answer_stats = _Counter()
        self._audio_stats = _Counter()

    @property
    def audio_bytes(self) -> int:
        return self._audio.total_bytes

    @property
    def audio_entries(self) -> int:
        return len(self._audio)

    async def get_answer(self, key: str) -> str | None:
        value = self._answers.get(answer_key(key))
        self._answer_stats.record(value is not None)
        return value

    async def put_answer(self, key: str, text: str) -> None:
        self._answers.put(answer_key(key), text, len(text))

    async def get_audio(self, provider: str, voice: str, text: str) -> bytes | None:
        value = self._audio.get(audio_key(provider, voice, text))
        self._audio_stats.record(value is not None)
        return value

    async def put_audio(self, provider: str, voice: str, text: str, ulaw: bytes) -> None:
        if not self._audio.put(audio_key(provider, voice, text), bytes(ulaw), len(ulaw)):
            log.info("audio too large for the response cache", provider=provider,
                     bytes=len(ulaw))

    def stats(self) -> ResponseCacheStats:
        return ResponseCacheStats(self._answer_stats.snapshot(), self._audio_stats.snapshot())

    async def aclose(self) -> None:
        return None


# --- redis ----------------------------------------------------------------------------


_FAILED = object()


class RedisResponseCache:
    """Entries shared by every engine, expiring after `ttl_s` (SET … EX).

    Size is bounded by the TTL and the server's maxmemory policy, not by max_entries.
    Every operation is bounded by `op_timeout_s`; after an error Redis is not asked again
    for `retry_after_s`, so an outage costs a call one short timeout, not one per sentence.
    """

    def __init__(self, url: str, key_prefix: str, ttl_s: float, *,
                 op_timeout_s: float = 0.5, retry_after_s: float = 5.0,
                 client: aioredis.Redis | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._prefix = f"{key_prefix}:cache"
        self._ttl_s = max(1, round(ttl_s))
        self._op_timeout_s = op_timeout_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._owns_client = client is None
        # One client (with its connection pool) per cache, and one cache per process.
        # No client-side retries: a miss now beats a hit after the caller waited.
        self._client: aioredis.Redis = client or aioredis.from_url(
            url, decode_responses=False, socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s, retry=Retry(NoBackoff(), 0),
            health_check_interval=30, client_name=f"{key_prefix}-response-cache")
        self._down_until = 0.0
        self._answer_stats = _Counter()
        self._audio_stats = _Counter()

    def _answer_key(self, key: str) -> str:
        return f"{self._prefix}:answer:{answer_key(key)}"

    def _audio_key(self, provider: str, voice: str, text: str) -> str:
        return f"{self._prefix}:audio:{audio_key(provider, voice, text)}"

    async def _run(self, op: str, counter: _Counter,
                   call: Callable[[], Awaitable[T]]) -> T | object:
        if self._clock() < self._down_until:
            return _FAILED
        try:
            async with asyncio.timeout(self._op_timeout_s):
                result = await call()
        except Exception as exc:  # any Redis trouble is a miss, never the call's problem
            counter.errors += 1
            recovering = self._down_until > 0.0
            self._down_until = self._clock() + self._retry_after_s
            log.warning("response cache unavailable; treating as a miss", op=op,
                        error=str(exc) or type(exc).__name__,
                        retry_in_s=self._retry_after_s, still_down=recovering)
            return _FAILED
        if self._down_until > 0.0:
            self._down_until = 0.0
            log.info("response cache reachable again")
        return result

    async def get_answer(self, key: str) -> str | None:
        raw = await self._run("get_answer", self._answer_stats,
                              lambda: self._client.get(self._answer_key(key)))
        text: str | None = None
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("cached answer is not UTF-8; ignoring it", key=key)
        self._answer_stats.record(text is not None)
        return text

    async def put_answer(self, key: str, text: str) -> None:
        await self._run("put_answer", self._answer_stats,
                        lambda: self._client.set(self._answer_key(key), text.encode("utf-8"),
                                                 ex=self._ttl_s))

    async def get_audio(self, provider: str, voice: str, text: str) -> bytes | None:
        raw = await self._run("get_audio", self._audio_stats,
                              lambda: self._client.get(self._audio_key(provider, voice, text)))
        audio = raw if isinstance(raw, bytes) else None
        self._audio_stats.record(audio is not None)
        return audio

    async def put_audio(self, provider: str, voice: str, text: str, ulaw: bytes) -> None:
        await self._run("put_audio", self._audio_stats,
                        lambda: self._client.set(self._audio_key(provider, voice, text),
                                                 bytes(ulaw), ex=self._ttl_s))

    def stats(self) -> ResponseCacheStats:
        return ResponseCacheStats(self._answer_stats.snapshot(), self._audio_stats.snapshot())

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def make_response_cache(config: Config) -> ResponseCache:
    """The cache the config asks for (`cache.backend`: memory | redis | off)."""
    cache = config.cache
    if cache.backend == "off":
        return NullCache()
    if cache.backend == "memory":
        return MemoryResponseCache(cache.max_entries, cache.ttl_s)
    if not config.redis.url:
        log.error("cache.backend is redis but no Redis URL is configured")
        raise ConfigError("cache.backend = \"redis\" needs redis.url (or env REDIS_URL)")
    try:
        return RedisResponseCache(config.redis.url, config.redis.key_prefix, cache.ttl_s)
    except ValueError as exc:  # redis-py rejects a malformed URL here
        log.error("invalid Redis URL for the response cache", error=str(exc))
        raise ConfigError(f"invalid redis.url for the response cache: {exc}") from exc
