"""A number in the caller's words ("order 4471", "four four seven one", "four thousand
four hundred and seventy one"), for an FAQ entry that looks something up by it.

Works on `normalize`d words, where number words are already digits; a run of digits is
read as one number (spoken digit by digit or in pairs), "hundred" and "thousand" scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.providers.faq.text import normalize

_SCALES = {"hundred": 100, "thousand": 1000}
MIN_DIGITS = 3  # "the one I ordered" is not an order number


@dataclass(frozen=True, slots=True)
class HeardNumber:
    value: str  # the digits, leading zeros kept
    rest: str  # the caller's words without it (for matching the question)


def _value(run: list[str]) -> str:
    if not any(w in _SCALES for w in run):
        return "".join(run)
    total = chunk = 0
    for word in run:
        if word == "hundred":
            chunk = max(chunk, 1) * 100
        elif word == "thousand":
            total += max(chunk, 1) * 1000
            chunk = 0
        elif word != "and":
            chunk += int(word)
    return str(total + chunk)


def _runs(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) of each run of number words."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, word in enumerate([*words, ""]):
        joins = (word.isdigit() or (start is not None and word in _SCALES)
                 or (start is not None and word == "and" and words[i - 1] in _SCALES
                     and i + 1 < len(words) and words[i + 1].isdigit()))
        if joins and start is None:
            start = i
        elif not joins and start is not None:
            runs.append((start, i))
            start = None
    return runs


def heard_number(text: str) -> HeardNumber | None:
    """The longest number in `text` with at least MIN_DIGITS digits, or None."""
    words = normalize(text)
    best: tuple[str, int, int] | None = None
    for start, end in _runs(words):
        value = _value(words[start:end])
        if len(value) >= MIN_DIGITS and (best is None or len(value) > len(best[0])):
            best = (value, start, end)
    if best is None:
        return None
    value, start, end = best
    return HeardNumber(value, " ".join(words[:start] + words[end:]))
