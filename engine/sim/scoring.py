"""Scoring simulated calls: did the recognizer hear the script, did the agent answer right.

The word error rate of a line is the word-level edit distance between the scripted line
and what the engine transcribed, over the scripted line's words, after the usual
normalization (lower case, no punctuation, a few contractions spelled out), so "where's"
for "where is" is not an error. Which FAQ entry answered is read back from the agent's
words: FAQ answers are fixed texts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein

from engine.config import Config
from engine.providers.builtin.agent_faq import DEFAULT_GOODBYE, DEFAULT_HANDOFF

_CONTRACTIONS = {
    "what's": "what is", "where's": "where is", "that's": "that is", "it's": "it is",
    "there's": "there is", "how's": "how is", "i'm": "i am", "i'd": "i would",
    "i'll": "i will", "you're": "you are", "we're": "we are", "don't": "do not",
    "can't": "cannot", "won't": "will not", "let's": "let us", "okay": "ok",
}
_WORD = re.compile(r"[a-z0-9']+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_MIN_PREFIX_WORDS = 3  # fewer words heard do not tell answers apart


def words(text: str) -> list[str]:
    """`text` as normalized words."""
    out: list[str] = []
    text = _THOUSANDS.sub("", text)  # "4,471" is the number 4471, as the script says
    for token in _WORD.findall(text.lower().replace("\u2019", "'")):
        token = token.strip("'")
        if token:
            out.extend(_CONTRACTIONS.get(token, token).split())
    return out


@dataclass(frozen=True, slots=True)
class WordErrors:
    errors: int  # substitutions + insertions + deletions
    words: int  # in the reference

    @property
    def rate(self) -> float:
        return self.errors / self.words if self.words else 0.0

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(self.errors + other.errors, self.words + other.words)


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    ref = words(reference)
    return WordErrors(Levenshtein.distance(ref, words(hypothesis)), len(ref))


class AnswerKey:
    """Which FAQ entry an agent line comes from; None for any other line (the unknown
    answer, "pardon?", the greeting). A line cut by a barge-in carries only the words
    heard: the entry whose answer alone starts with them."""

    def __init__(self, config: Config) -> None:
        entries = config.faq.entries
        self._entries = {_key(e.answer): e.id for e in entries}
        by_action = {e.action: e.id for e in entries if e.action != "answer"}
        # The same intents answered without the entry's words: the handoff policy's line
        # and the agent's built-in handoff and goodbye.
        goodbye = DEFAULT_GOODBYE.format(business=config.faq.business_name)
        for text, action in ((config.policy.handoff_line, "handoff"),
                             (DEFAULT_HANDOFF, "handoff"), (goodbye, "goodbye")):
            if action in by_action:
                self._entries.setdefault(_key(text), by_action[action])
        # A looked-up answer ("Order {order_id} is {status}.") is its template's words
        # with anything in place of each field.
        self._templates = [(_template_pattern(e.tool_answer), e.id)
                           for e in entries if e.tool and e.tool_answer]

    def entry(self, text: str) -> str | None:
        key = _key(text)
        found = self._entries.get(key) or next(
            (entry for pattern, entry in self._templates if pattern.fullmatch(key)), None)
        if found is not None or len(key.split()) < _MIN_PREFIX_WORDS:
            return found
        starts = {entry for answer, entry in self._entries.items()
                  if answer.startswith(key + " ")}
        return starts.pop() if len(starts) == 1 else None


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile(" ".join(".+" if part.startswith("{") else re.escape(_key(part))
                               for part in parts if part.startswith("{") or _key(part)))


def _key(text: str) -> str:
    return " ".join(words(text))
