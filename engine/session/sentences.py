"""Cut the agent's streamed text into sentences, so speech starts before the LLM ends.

A boundary is sentence punctuation followed by white space and then a non-space
character: waiting for that next character keeps "$4.99" and "3.5" whole, and a short
list of abbreviations keeps "Dr. Smith" together.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.",
                            "no.", "approx.", "inc.", "ltd.", "jr.", "sr.", "mt."})
_BOUNDARY = re.compile(r"[.!?…]+[\"')\]]*\s+(?=\S)")
# A clause this long is spoken at its next comma rather than waiting for a full stop.
_MAX_CLAUSE = 160


class SentenceAggregator:
    def __init__(self) -> None:
        self._buffer = ""

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
        if len(rest) > _MAX_CLAUSE and (comma := rest.rfind(", ")) > 0:
            out.append(rest[:comma + 1].strip())
            rest = rest[comma + 2:]
        self._buffer = rest
        return out

    def flush(self) -> str | None:
        """The remainder at the end of the stream."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None
