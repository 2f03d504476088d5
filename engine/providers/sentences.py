"""Cut the agent's streamed text into sentences, so speech starts before the LLM ends.

A boundary is sentence punctuation followed by white space and then a non-space
character: waiting for that next character keeps "$4.99" and "3.5" whole, and a short
list of abbreviations keeps "Dr. Smith" together.

The first piece of an answer may be shorter: with `first_clause_words` set, it is cut at
the first clause boundary (a comma, semicolon, colon or dash followed by a space) once it
holds that many words, so a voice that needs whole requests (HTTP) starts speaking
before the first sentence is written. Later pieces are whole sentences.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.",
                            "no.", "approx.", "inc.", "ltd.", "jr.", "sr.", "mt."})
_BOUNDARY = re.compile(r"[.!?…]+[\"')\]]*\s+(?=\S)")
_CLAUSE = re.compile(r"(?:[,;:]|\s[-–—])\s+(?=\S)")
# A clause this long is spoken at its next comma rather than waiting for a full stop.
_MAX_CLAUSE = 160


class SentenceAggregator:
    def __init__(self, first_clause_words: int = 0) -> None:
        self._buffer = ""
        self._first_clause_words = first_clause_words  # 0: whole sentences only
        self._emitted = False

    def push(self, delta: str) -> list[str]:
        """Add streamed text; return the sentences now complete."""
        self._buffer += delta
        out: list[str] = []
        start = 0
        text = self._buffer
        for match in _BOUNDARY.finditer(text):
            candidate = text[start:match.end()].strip()
            last_word = candidate.rsplit(None, 1)[-1].lower() if candidate else ""
            if last_word in _ABBREVIATIONS:
                continue
            if candidate:
                out.append(candidate)
            start = match.end()
        rest = text[start:]
        if not out and not self._emitted and self._first_clause_words:
            clause = self._first_clause(rest)
            if clause:
                out.append(rest[:clause].strip())
                rest = rest[clause:]
        if len(rest) > _MAX_CLAUSE and (comma := rest.rfind(", ")) > 0:
            out.append(rest[:comma + 1].strip())
            rest = rest[comma + 2:]
        self._buffer = rest
        self._emitted = self._emitted or bool(out)
        return out

    def _first_clause(self, text: str) -> int:
        """Where the answer's first clause of enough words ends (0: none yet)."""
        for match in _CLAUSE.finditer(text):
            if len(text[:match.start()].split()) >= self._first_clause_words:
                return match.end()
        return 0

    def flush(self) -> str | None:
        """The remainder at the end of the stream."""
        rest, self._buffer = self._buffer.strip(), ""
        self._emitted = False
        return rest or None
