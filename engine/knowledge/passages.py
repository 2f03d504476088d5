"""The knowledge base as passages: FAQ entries and knowledge files, cut into pieces with
stable ids (`faq:<entry id>`, `<file name>#<n>`), each rendered on one line for the agent.

A file passage is one or more paragraphs of one section (Markdown headings start
sections), up to about `passage_tokens`; the section's heading leads each of its
passages so a passage read alone still says what it is about. The same file always
gives the same passages and ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import FaqEntry

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACES = re.compile(r"\s+")


def approx_tokens(text: str) -> int:
    """About four characters per token for English (budgets, not bills)."""
    return len(text) // 4 + 1


@dataclass(frozen=True, slots=True)
class Passage:
    """One piece of knowledge. `text` is what the agent is given (one line); `keys` are
    what retrieval compares the caller's words with."""

    id: str
    text: str
    keys: tuple[str, ...]

    def render(self) -> str:
        return f"[{self.id}] {self.text}"


def faq_passages(entries: Sequence[FaqEntry]) -> list[Passage]:
    """One passage per answering entry; handoff and goodbye entries are intents, not facts."""
    return [Passage(f"faq:{e.id}", _one_line(f"Q: {e.questions[0]} A: {e.answer}"),
                    (*e.questions, e.answer))
            for e in entries if e.action == "answer" and e.questions]


def file_passages(name: str, text: str, passage_tokens: int) -> list[Passage]:
    """The passages of one file's text (`name` names them: `name#1`, `name#2`, ...)."""
    limit = passage_tokens * 4
    out: list[Passage] = []
    for heading, paragraphs in _sections(text):
        lead = f"{heading}: " if heading else ""
        for body in _pack(paragraphs, max(40, limit - len(lead))):
            line = _one_line(lead + body)
            out.append(Passage(f"{name}#{len(out) + 1}", line, (line,)))
    return out


def load_file(path: Path, passage_tokens: int) -> list[Passage]:
    """Raises OSError / UnicodeDecodeError: the caller names the file in its error."""
    return file_passages(path.name, path.read_text(encoding="utf-8"), passage_tokens)


def _one_line(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(nearest heading, its paragraphs) in file order; sections without text are skipped."""
    heading = ""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        found = _HEADING.match(line)
        if found or not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            if found:
                if paragraphs:
                    yield heading, paragraphs
                heading, paragraphs = found.group(1), []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    if paragraphs:
        yield heading, paragraphs


def _pack(paragraphs: list[str], limit: int) -> Iterator[str]:
    """Paragraphs joined up to `limit` characters; a longer paragraph is cut at sentence
    ends (and a longer sentence at word boundaries)."""
    pieces = [piece for p in paragraphs for piece in _split(p, limit)]
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > limit:
            yield current
            current = ""
        current = f"{current} {piece}" if current else piece
    if current:
        yield current


def _split(paragraph: str, limit: int) -> Iterator[str]:
    if len(paragraph) <= limit:
        yield paragraph
        return
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            yield sentence[:cut]
            sentence = sentence[cut:].lstrip()
        if sentence:
            yield sentence
