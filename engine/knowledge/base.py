"""The business's knowledge for the LLM agent, built once per engine.

Two ways to reach the model, chosen by size (`knowledge.inline_max_tokens`):
- inline: every passage in one static block sent right after the system prompt. It is
  the same bytes in every request of every call, so the provider's prompt cache serves
  it (OpenAI: identical prefixes from 1024 tokens, cached input at ~1/10 of the price).
- retrieved: for each turn the `top_k` passages nearest the caller's words, sent after
  the conversation (just before the caller's message), so the cached prefix before them
  stays the same. Prompt tokens per turn stay flat however large the knowledge grows.

Retrieval runs on one worker thread (an embedding is ~10 ms of numpy), with a bound on
waiting requests and a deadline: when the CPU is too busy a turn goes without passages
rather than waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from engine.config import Config, ConfigError, KnowledgeConfig
from engine.knowledge.passages import Passage, approx_tokens, faq_passages, load_file
from engine.knowledge.ranking import EmbeddingRanker, LexicalRanker, Ranker
from engine.log import get_logger
from engine.providers.faq.embeddings import EmbeddingUnavailable, SentenceEmbedder

log = get_logger(__name__)

STATIC_HEADER = ("What you know about the business, one passage per line with its id in "
                 "brackets. Answer only from these passages; when they do not answer the "
                 "question, say you don't know and offer a specialist.")
# Retrieval requests waiting for the worker beyond this are skipped (the turn goes on).
_MAX_WAITING = 8

Mode = Literal["inline", "retrieved"]


class KnowledgeBase:
    def __init__(self, passages: Sequence[Passage], config: KnowledgeConfig,
                 ranker: Ranker | None = None) -> None:
        self.passages = list(passages)
        self.config = config
        self.tokens = sum(approx_tokens(p.render()) for p in self.passages)
        self.mode: Mode = "inline" if self.tokens <= config.inline_max_tokens else "retrieved"
        self.ranker = ranker
        # Built once: byte-identical in every request (the provider's cache keys on it).
        self.static_text = (STATIC_HEADER + "\n" + "\n".join(p.render() for p in self.passages)
                            if self.mode == "inline" and self.passages else "")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge")
        self._waiting = 0

    @property
    def method(self) -> str:
        return "inline" if self.mode == "inline" else getattr(self.ranker, "method", "none")

    async def retrieve(self, text: str, call_sid: str = "") -> tuple[Passage, ...]:
        """The passages for one caller turn (none in inline mode: they are all sent)."""
        if self.mode == "inline" or self.ranker is None or not text.strip():
            return ()
        if self._waiting >= _MAX_WAITING:
            log.warning("knowledge.retrieval_skipped", call_sid=call_sid, reason="busy")
            return ()
        ranker, k = self.ranker, self.config.top_k
        self._waiting += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, ranker.rank,
                                                                text, k)
            found = await asyncio.wait_for(future, self.config.retrieval_timeout_s)
        except TimeoutError:
            log.warning("knowledge.retrieval_skipped", call_sid=call_sid, reason="timeout")
            return ()
        finally:
            self._waiting -= 1
        return tuple(self.passages[i] for i, _ in found)

    def rank_now(self, text: str) -> list[tuple[Passage, float]]:
        """Blocking ranking with scores, for benchmarks and tests (not on the loop)."""
        if self.ranker is None:
            return []
        return [(self.passages[i], s) for i, s in self.ranker.rank(text, self.config.top_k)]

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def load_knowledge(config: Config) -> KnowledgeBase | None:
    """The knowledge base the configuration names, or None when it has nothing.
    An unreadable knowledge file raises ConfigError naming it."""
    cfg = config.knowledge
    passages = faq_passages(config.faq.entries) if cfg.include_faq else []
    for path in cfg.paths():
        try:
            passages += await asyncio.to_thread(load_file, path, cfg.passage_tokens)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"knowledge.files: cannot read {path}: {exc}") from exc
    if not passages:
        return None
    _check_unique(passages)
    base = KnowledgeBase(passages, cfg)
    if base.mode == "retrieved":
        base.ranker = await asyncio.to_thread(build_ranker, passages, cfg)
    log.info("knowledge.loaded", passages=len(passages), tokens=base.tokens, mode=base.mode,
             method=base.method)
    return base


def build_ranker(passages: Sequence[Passage], cfg: KnowledgeConfig,
                 embedder: SentenceEmbedder | None = None,
                 model_dir: Path | None = None) -> Ranker:
    """Embeddings when the model is installed (the wheel's, or `model_dir`), else the
    lexical ranking (logged once). CPU work (the model loads and embeds every passage):
    call from a thread."""
    try:
        embedder = embedder or SentenceEmbedder(model_dir)
        return EmbeddingRanker(passages, embedder, cfg.min_similarity)
    except EmbeddingUnavailable as exc:
        log.info("knowledge.lexical_fallback", reason=str(exc))
        return LexicalRanker(passages)


def _check_unique(passages: Sequence[Passage]) -> None:
    seen: set[str] = set()
    for p in passages:
        if p.id in seen:  # two files of one name in different folders
            raise ConfigError(f"knowledge: two passages are named {p.id!r} (rename a file)")
        seen.add(p.id)
