"""Whether the caller's words so far make a finished turn: the cue semantic endpointing
acts on (`session/hearing.py`).

- "complete": a question or answer that stands on its own ("What time do you open?",
  "No thanks.", "Yes"): the turn may end after a short silence.
- "trailing": the words stop where more must follow: a conjunction or preposition, a
  hesitation ("um", "so"), a list or a number being dictated ("my number is 4 1 5"), a
  comma: wait longer.
- "unknown": neither; the usual silence ends the turn.

Plain rules on the transcript's last words and punctuation (recognizers punctuate);
measured on the bundled scenarios and on pauses inside sentences (tests/test_hearing.py).
"""

from __future__ import annotations

import re
from typing import Literal

Completeness = Literal["complete", "trailing", "unknown"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WORD = re.compile(r"[a-z0-9']+")
# Words after which a sentence cannot end.
_TRAILING_WORDS = _words("""
and or but so because if then than that which who whose where when while although though
unless until since as like to of for from with without about at by in on into onto over
under after before between through the a an my your our their his her its this these those
is are was were am be been being has have had do does did can could will would shall should
may might must um uh er erm ah hmm mm also plus is it's i'm i i'd i'll we we're you you're
let let's just maybe number
""")
# Digits and number words: a number being read out is rarely finished at a pause.
_NUMBER_WORDS = _words("""
zero oh one two three four five six seven eight nine ten eleven twelve twenty thirty
forty fifty sixty seventy eighty ninety hundred thousand double triple
""")
# Short replies that are whole turns on their own, with or without punctuation.
_SHORT_ANSWERS = _words("""
yes yeah yep no nope okay ok sure thanks thank you bye goodbye hello hi correct right
exactly perfect great fine please
""")


def completeness(text: str) -> Completeness:
    """How finished `text` (the turn's transcript so far) sounds; see the module."""
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    if not words:
        return "unknown"
    last = words[-1]
    if stripped.endswith((",", "-", "–", "—", "...", "…", ":")):
        return "trailing"
    if stripped.endswith("?") and len(words) > 1:
        return "complete"
    if last in _TRAILING_WORDS or last.isdigit() or last in _NUMBER_WORDS:
        return "trailing"
    if stripped.endswith(("?", "!", ".")):
        return "complete"
    if all(w in _SHORT_ANSWERS for w in words):
        return "complete"
    return "unknown"
