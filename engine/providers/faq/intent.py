"""The caller's intent beyond a question: asking for a person, or signing off.

Independent of the FAQ, so the call policy can use it on any transcript whatever agent
answers: "can I speak to a representative" is a handoff, "that's all, bye" a goodbye,
while "can I pay in person" and "that's it, I want to cancel" are neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from rapidfuzz import fuzz, process

from engine.providers.faq.text import CONCEPT_OF_STEM, content_tokens, normalize, stem

Intent = Literal["handoff", "goodbye"]

# Words that on their own ask for a human ("representative", "operator"); weaker words
# ("person", "someone") need a verb of contact nearby ("speak to someone"), so that
# "can I pay in person" is not a handoff.
_STRONG_PERSON = frozenset({"representative", "operator", "human", "advisor", "adviser",
                            "supervisor", "manager", "agent"})
_CONTACT_VERBS = frozenset({"speak", "talk", "connect", "transfer", "put", "reach",
                            "chat", "call", "get"})
_STRONG_STEMS = frozenset(stem(w) for w in _STRONG_PERSON)
_CONTACT_STEMS = frozenset(stem(w) for w in _CONTACT_VERBS)
_NEGATIONS = frozenset({"not", "no", "never", "without"})
_BYE_WORDS = frozenset({"bye", "goodbye", "byebye"})
_BYE_PHRASES = (("hang", "up"), ("that", "is", "all"), ("that", "is", "it"),
                ("nothing", "else"), ("that", "will", "be", "all"),
                ("have", "a", "nice", "day"), ("have", "a", "good", "day"),
                ("good", "bye"), ("all", "set"))
# "by" is how ASR often writes a short "bye": only trusted at the end of a short sign-off.
_SIGN_OFF_LEAD = frozenset({"ok", "okay", "thanks", "thank", "you", "good", "alright",
                            "right", "great", "cheers", "bye"})
# Words a sign-off carries without being about anything ("okay, never mind, goodbye").
_SIGN_OFF_FILLER = frozenset({"#bye", "never", "mind", "nevermind", "anyway", "anyways"})


def _contains(words: Sequence[str], phrase: Sequence[str]) -> int:
    n = len(phrase)
    for i in range(len(words) - n + 1):
        if tuple(words[i:i + n]) == tuple(phrase):
            return i
    return -1


def _negated(words: Sequence[str], index: int) -> bool:
    return any(w in _NEGATIONS for w in words[max(0, index - 6):index])


def detect_intent(text: str) -> Intent | None:
    """'handoff' when the caller asks for a person, 'goodbye' when they sign off."""
    words = normalize(text)
    if not words:
        return None
    for i, w in enumerate(words):
        s = stem(w)
        # Long words are compared as heard: "represented" is a recognition of
        # "representative".
        strong = s in _STRONG_STEMS or (
            len(w) >= 7 and process.extractOne(w, _STRONG_PERSON, scorer=fuzz.ratio,
                                               score_cutoff=80.0) is not None)
        # Phone recognition keeps the start of "representative" and garbles the rest
        # ("speak to the reprimand of him"): with a contact verb near, that is enough.
        weak = CONCEPT_OF_STEM.get(s) == "#person" or w.startswith("repr")
        if not (strong or weak):
            continue
        # "agent" alone is ambiguous ("travel agent"), so treat it like a weak word
        # unless it is "live/real/human agent".
        if s == "agent" and not (i > 0 and words[i - 1] in {"live", "real", "human"}):
            strong = False
        window = words[max(0, i - 6):i]
        contact = any(stem(x) in _CONTACT_STEMS for x in window)
        qualified = i > 0 and words[i - 1] in {"real", "live", "actual"}
        if (strong or contact or qualified) and not _negated(words, i):
            return "handoff"
    # "customer service" is a person only when the caller wants to reach it
    # ("what are your customer service hours" is a question about hours).
    idx = _contains(words, ("customer", "service"))
    if idx >= 0 and not _negated(words, idx):
        window = words[max(0, idx - 6):idx]
        if any(stem(x) in _CONTACT_STEMS for x in window):
            return "handoff"
    # A sign-off is an utterance about nothing else: "that's it, I want to cancel my
    # subscription" is a complaint, not a goodbye.
    if len([t for t in content_tokens(text) if t not in _SIGN_OFF_FILLER]) > 1:
        return None
    if any(w in _BYE_WORDS for w in words):
        return "goodbye"
    for phrase in _BYE_PHRASES:
        idx = _contains(words, phrase)
        # "No, that's all" is a sign-off; only "not"/"don't" negate one ("don't hang up").
        if idx >= 0 and not any(w in {"not", "never"} for w in words[max(0, idx - 2):idx]):
            return "goodbye"
    if (words[-1] == "by" and 2 <= len(words) <= 5
            and all(w in _SIGN_OFF_LEAD for w in words[:-1])):
        return "goodbye"
    return None
