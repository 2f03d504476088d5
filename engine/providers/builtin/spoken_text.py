"""Text streamed into a voice: where its sentences end, the words to send, and which audio
speaks which sentence.

`SpokenText` holds the reply as it is written and finds its sentence ends (closing
punctuation followed by white space, "Dr." and the like excepted). `WordPieces` cuts the
text into whole words ending in one space, as input-streaming voices want them, with the
first sentence sent alone and flushed (it is generated at once instead of waiting for more
text). `AlignedAudio` reads the voice's character alignment (start and duration of each
character, in milliseconds from the start of the chunk of audio that carries it) and
cuts the audio at the byte where each sentence's last character ends, so the audio between
two `TextSpoken` events is exactly that sentence's. Characters are matched by counting
those that are not white space, so a voice that spaces the text differently still lines
up.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from typing import Any

from engine.providers.base import AudioChunk, TextSpoken

# Closing punctuation (and quotes or brackets after it) that white space follows.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)")
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.",
                            "no.", "approx.", "inc.", "ltd.", "jr.", "sr.", "mt."})
ULAW_BYTES_PER_MS = 8  # mu-law 8 kHz: one byte a sample


def _visible(text: str) -> int:
    """Characters that are not white space."""
    return sum(not char.isspace() for char in text)


class SpokenText:
    """The reply so far, its sentence ends, and how much of it was handed out as spoken."""

    def __init__(self) -> None:
        self.text = ""
        self.ends: list[int] = []  # index just past each sentence's closing punctuation
        self.end_visible: list[int] = []  # visible characters up to each end
        self._sentence_start = 0
        self._given = 0  # text handed out in TextSpoken events
        self._given_sentences = 0

    def add(self, delta: str) -> None:
        self.text += delta
        for match in _SENTENCE_END.finditer(self.text, self._sentence_start):
            end = match.end()
            words = self.text[self._sentence_start:end].split()
            if not words or words[-1].lower() in _ABBREVIATIONS:
                continue
            self.ends.append(end)
            self.end_visible.append(_visible(self.text[:end]))
            self._sentence_start = end

    def next_sentence(self) -> str:
        """The next sentence as spoken, with the white space after it received so far."""
        end = self.ends[self._given_sentences]
        stop = end
        while stop < len(self.text) and self.text[stop].isspace():
            stop += 1
        part, self._given = self.text[self._given:stop], stop
        self._given_sentences += 1
        return part

    def remaining_sentences(self) -> int:
        return len(self.ends) - self._given_sentences

    def rest(self) -> str:
        """Everything not handed out yet (at the end of the reply)."""
        part, self._given = self.text[self._given:], len(self.text)
        return part


class WordPieces:
    """The text to send: whole words, each piece ending in one space."""

    def __init__(self, spoken: SpokenText, *, flush_first_sentence: bool = True,
                 first_flush_words: int = 0) -> None:
        self._spoken = spoken
        self._flush_first = flush_first_sentence
        # The first flush also comes after this many words without a sentence end (0: at
        # the sentence end only): the voice starts on the reply's first words.
        self._first_flush_words = first_flush_words
        self._sent = 0  # text index up to which pieces were made

    def push(self, delta: str) -> list[tuple[str, bool]]:
        """Add streamed text; the pieces (text, flush) now ready to send."""
        self._spoken.add(delta)
        text = self._spoken.text
        limit = len(text) - 1
        while limit >= self._sent and not text[limit].isspace():
            limit -= 1
        return self._pieces(limit) if limit > self._sent else []

    def finish(self) -> list[tuple[str, bool]]:
        """The end of the text: the last words, flushed."""
        return self._pieces(len(self._spoken.text), final=True)

    def _pieces(self, limit: int, final: bool = False) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        if self._flush_first:
            first_end = next((end for end in self._spoken.ends if self._sent < end <= limit),
                             None)
            if first_end is not None:
                out += self._piece(first_end, flush=True)
                self._flush_first = False
            elif self._first_flush_words and len(
                    self._spoken.text[:limit].split()) >= self._first_flush_words:
                self._flush_first = False
                return self._piece(limit, flush=True)
        return out + self._piece(limit, flush=final)

    def _piece(self, upto: int, flush: bool) -> list[tuple[str, bool]]:
        words = self._spoken.text[self._sent:upto].strip()
        self._sent = max(self._sent, upto)
        return [(words + " ", flush)] if words else []


class AlignedAudio:
    """Audio chunks with their alignment in; audio and `TextSpoken` events out, in order."""

    def __init__(self, spoken: SpokenText) -> None:
        self._spoken = spoken
        self._received = 0  # audio bytes so far
        self._heard = 0  # visible characters the alignment covered so far
        self._cuts: deque[int] = deque()  # byte offsets of sentence ends not yet reached
        self._sentences_cut = 0
        self._last_cut = 0

    def feed(self, ulaw: bytes, alignment: Mapping[str, Any] | None
             ) -> list[AudioChunk | TextSpoken]:
        base = self._received
        self._received += len(ulaw)
        if alignment is not None:
            self._align(base, alignment)
        events: list[AudioChunk | TextSpoken] = []
        offset = 0
        while self._cuts and self._cuts[0] <= self._received:
            upto = max(self._cuts.popleft() - base, offset)
            if upto > offset:
                events.append(AudioChunk(ulaw[offset:upto]))
                offset = upto
            events.append(TextSpoken(self._spoken.next_sentence()))
        if offset < len(ulaw):
            events.append(AudioChunk(ulaw[offset:]))
        return events

    def finish(self) -> list[TextSpoken]:
        """After the last audio: the sentences not marked yet, then the rest of the text."""
        self._cuts.clear()
        events = [TextSpoken(self._spoken.next_sentence())
                  for _ in range(self._spoken.remaining_sentences())]
        rest = self._spoken.rest()
        return [*events, TextSpoken(rest)] if rest else events

    def _align(self, base: int, alignment: Mapping[str, Any]) -> None:
        chars, starts, durations = (alignment.get("chars"), alignment.get("charStartTimesMs"),
                                    alignment.get("charDurationsMs"))
        if not (isinstance(chars, list) and isinstance(starts, list)
                and isinstance(durations, list) and len(chars) == len(starts) == len(durations)):
            return  # no usable timing: the sentences are marked at the end instead
        ends = self._spoken.end_visible
        for char, start, duration in zip(chars, starts, durations, strict=True):
            self._heard += _visible(str(char))
            while self._sentences_cut < len(ends) and ends[self._sentences_cut] <= self._heard:
                if isinstance(start, int | float) and isinstance(duration, int | float):
                    cut = base + round((start + duration) * ULAW_BYTES_PER_MS)
                    self._last_cut = max(self._last_cut, cut)
                self._cuts.append(self._last_cut)
                self._sentences_cut += 1
