"""Which passages answer the caller's words: sentence embeddings when the model is
installed (engine/providers/faq/embeddings.py), else a lexical ranking (BM25 over the
FAQ matcher's topic tokens: stems and concepts such as "#price").

Both are CPU work: `KnowledgeBase` calls `rank` from its worker thread, never on the loop.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from engine.knowledge.passages import Passage
from engine.providers.faq.embeddings import SentenceEmbedder
from engine.providers.faq.text import content_tokens

_BATCH = 16


class Ranker(Protocol):
    method: str  # "embedding" | "lexical"

    def rank(self, text: str, k: int) -> list[tuple[int, float]]:
        """Up to `k` (passage index, score) pairs, best first, each above the minimum."""
        ...


class EmbeddingRanker:
    """A passage scores its best key's cosine similarity with the caller's words."""

    method = "embedding"

    def __init__(self, passages: Sequence[Passage], embedder: SentenceEmbedder,
                 min_similarity: float) -> None:
        self.embedder = embedder
        self.min_similarity = min_similarity
        keys = [key for p in passages for key in p.keys]
        # Each passage's keys are contiguous: its score is the max over its slice.
        self._starts = np.cumsum([0, *(len(p.keys) for p in passages[:-1])])
        # Once, at start; in small batches (a batch pads to its longest key).
        batches = [embedder.embed(keys[i:i + _BATCH]) for i in range(0, len(keys), _BATCH)]
        self._matrix = np.concatenate(batches) if batches else np.zeros((0, 384), np.float32)

    def rank(self, text: str, k: int) -> list[tuple[int, float]]:
        if not text.strip() or self._matrix.shape[0] == 0:
            return []
        sims = self._matrix @ self.embedder.embed([text])[0]
        scores = np.maximum.reduceat(sims, self._starts)
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in best if scores[i] >= self.min_similarity]


class LexicalRanker:
    """BM25 (k1 1.2, b 0.75) over topic tokens; a passage must share one with the words."""

    method = "lexical"
    _K1 = 1.2
    _B = 0.75

    def __init__(self, passages: Sequence[Passage]) -> None:
        self._docs = [Counter(tok for key in p.keys for tok in content_tokens(key))
                      for p in passages]
        self._lengths = [sum(doc.values()) for doc in self._docs]
        self._avg = (sum(self._lengths) / len(self._docs)) if self._docs else 1.0
        frequency = Counter(tok for doc in self._docs for tok in doc)
        n = len(self._docs)
        self._idf = {tok: math.log(1 + (n - df + 0.5) / (df + 0.5))
                     for tok, df in frequency.items()}

    def rank(self, text: str, k: int) -> list[tuple[int, float]]:
        query = set(content_tokens(text)) & self._idf.keys()
        if not query:
            return []
        scored = []
        for i, doc in enumerate(self._docs):
            norm = self._K1 * (1 - self._B + self._B * self._lengths[i] / max(self._avg, 1.0))
            score = sum(self._idf[t] * doc[t] * (self._K1 + 1) / (doc[t] + norm)
                        for t in query if t in doc)
            if score > 0:
                scored.append((i, score))
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored[:k]
