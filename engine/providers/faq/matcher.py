"""Match a caller's (speech-recognized) question to an FAQ entry, or say it does not know.

Questions and caller text are compared as concepts (engine.providers.faq.text); words
the FAQ has never seen are snapped to the nearest known word with rapidfuzz
(misrecognized spellings only: long words, high similarity). Scores weigh each concept
by how specific it is to one entry (IDF), and a question word the FAQ does not know
counts *against* the match, so "what's the price of gold" does not become the pricing
answer. A handoff or goodbye (engine.providers.faq.intent) reaches the FAQ's entry for
it directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from rapidfuzz import fuzz, process

from engine.config import FaqEntry
from engine.providers.faq.intent import Intent, detect_intent
from engine.providers.faq.text import CONCEPT_WORDS, analyze, normalize

MatchMethod = Literal["intent", "lexical", "fuzzy", "embedding"]


@dataclass(frozen=True, slots=True)
class FaqMatch:
    entry: FaqEntry
    score: float  # 0..1
    method: MatchMethod


@dataclass(slots=True)
class _Question:
    entry_index: int
    weights: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


@dataclass(slots=True)
class _Query:
    known: dict[str, float] = field(default_factory=dict)  # token -> weight
    unknown: list[set[str]] = field(default_factory=list)  # near-miss tokens per word
    snapped: bool = False  # a word was snapped to a known one


class FaqMatcher:
    """Lexical, ASR-tolerant FAQ matcher. `match` is pure CPU, well under a millisecond."""

    # A query word absent from the FAQ is snapped to a known word only when it is long
    # and nearly identical as spoken (a recognition slip like "older"/"order", not another
    # topic). Measured on tests/data/faq_cases.toml: 80 gains ASR cases without false
    # matches; 75 starts pairing unrelated words.
    FUZZY_MIN_LEN = 5
    FUZZY_CUTOFF = 80.0
    # Looser similarity accepted only when the other words support the same question.
    CONTEXT_FUZZY_CUTOFF = 72.0
    # Share of the score from "how much of what the caller said is covered" versus
    # "how much of the FAQ question is covered": callers' fragments are short.
    QUERY_WEIGHT = 0.6
    # At least this share of what the caller said must be understood, whatever the
    # entry-side coverage: "price of gold today" shares only "price" with pricing.
    MIN_QUERY_COVERAGE = 0.5
    # A word the FAQ has never seen weighs more than the most specific known word, so an
    # unrelated question is not carried by one shared generic word.
    UNKNOWN_WEIGHT_FACTOR = 1.5

    def __init__(self, entries: Iterable[FaqEntry], threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"match threshold must be in (0, 1], got {threshold}")
        self.entries: list[FaqEntry] = list(entries)
        self.threshold = threshold
        per_entry: list[set[str]] = []
        token_lists: list[tuple[int, list[str]]] = []
        surfaces: dict[str, str] = {}
        for idx, entry in enumerate(self.entries):
            if not entry.questions:
                raise ValueError(f"FAQ entry {entry.id!r} has no questions")
            seen: set[str] = set()
            for q in entry.questions:
                pairs = analyze(q)
                token_lists.append((idx, [t for t, _ in pairs]))
                seen.update(t for t, _ in pairs)
                for t, surface in pairs:
                    surfaces.setdefault(surface, t)
            per_entry.append(seen)
        n = max(1, len(self.entries))
        df: dict[str, int] = {}
        for seen in per_entry:
            for t in seen:
                df[t] = df.get(t, 0) + 1
        # Smoothed IDF: a concept every entry shares weighs little, a unique one a lot.
        self._idf = {t: math.log(1.0 + n / d) for t, d in df.items()}
        self._unknown_weight = self.UNKNOWN_WEIGHT_FACTOR * math.log(1.0 + n)
        # Spoken forms the FAQ knows (its own words and the concept table's), for fuzzy
        # snapping of misrecognized words.
        for concept, forms in CONCEPT_WORDS.items():
            if concept in self._idf:
                for form in forms:
                    surfaces.setdefault(" ".join(normalize(form)), concept)
        self._surface_to_token = {w: t for w, t in surfaces.items()
                                  if len(w) >= self.FUZZY_MIN_LEN and " " not in w}
        self._surface_list = list(self._surface_to_token)
        self._questions: list[_Question] = []
        for idx, toks in token_lists:
            weights = {t: self._idf[t] for t in toks}
            if weights:
                self._questions.append(_Question(idx, weights, sum(weights.values())))
        self._by_action: dict[str, FaqEntry] = {}
        for entry in self.entries:
            self._by_action.setdefault(entry.action, entry)

    def detect_intent(self, text: str) -> Intent | None:
        return detect_intent(text)

    def _resolve(self, pairs: list[tuple[str, str]]) -> _Query:
        """Query words -> known tokens, near-miss candidates and unknown words."""
        query = _Query()
        for token, surface in pairs:
            if token in self._idf:
                # Repeats count: "open on Sunday" is twice about hours.
                query.known[token] = query.known.get(token, 0.0) + self._idf[token]
                continue
            candidates: set[str] = set()
            if len(surface) >= self.FUZZY_MIN_LEN and self._surface_list:
                hits = process.extract(surface, self._surface_list, scorer=fuzz.ratio,
                                       score_cutoff=self.CONTEXT_FUZZY_CUTOFF, limit=4)
                for word, similarity, _ in hits:
                    known = self._surface_to_token[word]
                    if similarity >= self.FUZZY_CUTOFF:
                        query.known[known] = query.known.get(known, 0.0) + self._idf[known]
                        query.snapped = True
                        break
                    candidates.add(known)
                else:
                    query.unknown.append(candidates)
                continue
            query.unknown.append(candidates)
        return query

    def score_all(self, text: str) -> list[tuple[FaqEntry, float, bool]]:
        """(entry, best score, fuzzy used) per entry, highest first (evaluation, debugging)."""
        return self._score(self._resolve(analyze(text)))

    def _score(self, query: _Query) -> list[tuple[FaqEntry, float, bool]]:
        best: dict[int, tuple[float, bool]] = {}
        for q in self._questions:
            matched = sum(w for t, w in query.known.items() if t in q.weights)
            if matched <= 0.0:
                continue
            q_total = sum(query.known.values())
            fuzzy = query.snapped
            for candidates in query.unknown:
                # A looser near-miss counts only when the rest of the sentence already
                # points at this question ("cancel my prescription").
                hit = next((t for t in candidates if t in q.weights), None)
                if hit is not None:
                    matched += q.weights[hit]
                    q_total += q.weights[hit]
                    fuzzy = True
                else:
                    q_total += self._unknown_weight
            q_cov = matched / q_total
            if q_cov < self.MIN_QUERY_COVERAGE:
                continue
            e_cov = min(1.0, matched / q.total)
            score = self.QUERY_WEIGHT * q_cov + (1.0 - self.QUERY_WEIGHT) * e_cov
            if score > best.get(q.entry_index, (0.0, False))[0]:
                best[q.entry_index] = (score, fuzzy)
        ranked = sorted(best.items(), key=lambda kv: kv[1][0], reverse=True)
        return [(self.entries[i], s, f) for i, (s, f) in ranked]

    def match(self, text: str) -> FaqMatch | None:
        """The entry answering `text`, or None when nothing scores above the threshold."""
        intent = detect_intent(text)
        if intent is not None and intent in self._by_action:
            return FaqMatch(self._by_action[intent], 1.0, "intent")
        # Handoff/goodbye entries are reached through detect_intent only: a lexical brush
        # with them must not end or transfer the call.
        ranked = [r for r in self.score_all(text) if r[0].action == "answer"]
        if not ranked or ranked[0][1] < self.threshold:
            return None
        entry, score, fuzzy = ranked[0]
        return FaqMatch(entry, round(score, 4), "fuzzy" if fuzzy else "lexical")
