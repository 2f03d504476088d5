"""Match a caller's (speech-recognized) question to an FAQ entry, or say it does not know.

Telephone speech recognition drops and swaps words ("speak to our representative",
"you're opening out" for "what are your opening hours"), and callers paraphrase. The
matcher therefore compares *concepts*, not strings: text is normalized (contractions,
number words, punctuation), stop words are dropped, the rest is stemmed and mapped
through a small customer-service synonym table, and words the FAQ has never seen are
snapped to the nearest known word with rapidfuzz (misrecognized spellings only: long
words, high similarity). Scores weigh each concept by how specific it is to one entry
(IDF), and a question word the FAQ does not know counts *against* the match, so
"what's the price of gold" does not become the pricing answer.

`detect_intent` (handoff / goodbye) is independent of the FAQ so the call policy can use
it on any transcript, whatever agent answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rapidfuzz import fuzz, process

from engine.config import FaqEntry

Intent = Literal["handoff", "goodbye"]
MatchMethod = Literal["intent", "lexical", "fuzzy", "embedding"]

# --- normalization ------------------------------------------------------------------

_CONTRACTIONS: dict[str, str] = {
    "won't": "will not", "can't": "can not", "cannot": "can not", "shan't": "shall not",
    "ain't": "is not", "let's": "let us", "y'all": "you all", "gonna": "going to",
    "wanna": "want to", "gotta": "got to", "whats": "what is", "wheres": "where is",
    "hows": "how is", "thats": "that is", "im": "i am", "dont": "do not",
    "doesnt": "does not", "didnt": "did not", "cant": "can not", "wont": "will not",
    "youre": "you are", "theyre": "they are", "isnt": "is not", "arent": "are not",
}
_SUFFIXES = (("n't", " not"), ("'re", " are"), ("'ve", " have"), ("'ll", " will"),
             ("'d", " would"), ("'m", " am"), ("'s", ""))

_UNITS = {"zero": 0, "oh": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
          "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
          "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
          "seventeen": 17, "eighteen": 18, "nineteen": 19}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
         "seventy": 70, "eighty": 80, "ninety": 90}

_WORD_RE = re.compile(r"[a-z0-9']+")


# "'s" is "is" after these; otherwise a possessive ("today's") and dropped.
_IS_BEFORE = frozenset({"what", "where", "when", "how", "who", "that", "it", "there",
                        "here", "he", "she", "this"})


def _expand(word: str) -> str:
    if word in _CONTRACTIONS:
        return _CONTRACTIONS[word]
    if word.endswith("'s") and word[:-2] in _IS_BEFORE:
        return word[:-2] + " is"
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix):
            return word[: -len(suffix)] + repl
    return word


def _numbers_to_digits(words: list[str]) -> list[str]:
    """'twenty four seven' -> '24 7'; 'oh' stays a word unless between digits."""
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _TENS:
            value = _TENS[w]
            if i + 1 < len(words) and words[i + 1] in _UNITS and 0 < _UNITS[words[i + 1]] < 10:
                value += _UNITS[words[i + 1]]
                i += 1
            out.append(str(value))
        elif w in _UNITS and w != "oh":
            out.append(str(_UNITS[w]))
        else:
            out.append(w)
        i += 1
    return out


def normalize(text: str) -> list[str]:
    """Lowercase words with contractions expanded and number words as digits."""
    text = text.lower().replace("’", "'").replace("‘", "'").replace("`", "'")
    text = text.replace("24/7", " 24 7 ").replace("&", " and ")
    words: list[str] = []
    for raw in _WORD_RE.findall(text):
        raw = raw.strip("'")
        if raw:
            words.extend(_expand(raw).split())
    return _numbers_to_digits(words)


# --- stop words, stemming, concepts -------------------------------------------------

# Function words plus the filler of spoken requests ("I'd like to know ..."): they carry
# no topic. Kept as a set of surface forms, checked before stemming.
_STOP_TEXT = """
a an the and or but if of at by for with about against between into through during before
after above below to from up down in out on off over under again further then once here
there all any both each few more most other some such no nor not only own same so than
too very s t can will just should now i me my myself we our ours ourselves you your yours
yourself yourselves he him his himself she her hers herself it its itself they them their
theirs themselves what which who whom this that these those am is are was were be been
being have has had having do does did doing would could shall may might must ok okay
please hi hello hey um uh erm hmm like want wanted wanting need needs know tell let
wonder wondering question ask asking help thanks thank yes yeah well also really actually
just maybe get got going go give say said think trying try one there's is it im
sir madam sorry mean anything something way much many lot oh guys folks still currently
exactly
"""
_STOP_WORDS = frozenset(_STOP_TEXT.split())

# Concept table: a canonical token (prefixed "#") for words a caller may use for the same
# thing. Applied to FAQ questions and caller text alike, keyed by stem.
_CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    # "close" stays a plain word: it is also "close my account".
    "#hours": ("hour", "open", "opening", "opens", "schedule",
               "business hours", "weekend", "weekday", "monday", "tuesday", "wednesday",
               "thursday", "friday", "saturday", "sunday", "morning", "evening",
               "afternoon", "holiday", "holidays", "tonight"),
    "#location": ("address", "location", "located", "where are you", "directions",
                  "situated", "headquarters", "store", "shop", "office", "branch",
                  "visit"),
    "#price": ("price", "pricing", "cost", "costs", "fee", "charge", "expensive", "cheap",
               "how much", "rate", "rates", "tariff", "dollar", "dollars", "pay",
               "month", "monthly", "per month", "a month"),
    "#plan": ("plan", "plans", "package", "packages", "tier", "tiers", "bundle", "offer",
              "offers", "option", "options"),
    "#cancel": ("cancel", "cancellation", "cancelation", "terminate", "termination",
                "unsubscribe", "quit", "discontinue", "end my", "stop my"),
    "#subscription": ("subscription", "subscriptions", "membership", "contract",
                      "account", "service", "subscribe", "subscribed"),
    "#order": ("order", "orders", "ordered", "parcel", "shipment", "purchase",
               "purchased", "bought", "item"),
    "#delivery": ("deliver", "delivery", "delivered", "ship", "shipping", "shipped",
                  "track", "tracking", "arrive", "arrived", "arriving", "status",
                  "dispatched", "eta"),
    "#refund": ("refund", "refunds", "refunded", "reimburse", "reimbursement",
                "money back"),
    "#return": ("return", "returns", "returning", "exchange", "send back", "send it back",
                "bring back", "broken", "damaged", "faulty", "defective"),
    "#person": ("representative", "operator", "human", "agent", "person", "someone",
                "somebody", "anybody", "anyone", "advisor", "adviser", "supervisor",
                "manager", "staff", "live agent", "real person", "customer service"),
    "#talk": ("speak", "talk", "connect", "transfer", "put me through", "chat"),
    "#bye": ("bye", "goodbye", "good bye", "bye bye", "hang up", "that is all",
             "that is it", "nothing else", "all set", "have a nice day",
             "have a good day"),
}

_VOWELS = set("aeiouy")


def stem(word: str) -> str:
    """A light suffix stripper: enough to join opening(s)/open, plans/plan, cancelled/cancel."""
    if len(word) <= 3 or word.isdigit():
        return word
    w = word
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if w.endswith("ied") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("ing") and len(w) > 5 and _VOWELS & set(w[:-3]):
        w = w[:-3]
    elif w.endswith("ed") and len(w) > 4 and _VOWELS & set(w[:-2]):
        w = w[:-2]
    elif w.endswith("ation") and len(w) > 7:
        w = w[:-5]
    elif w.endswith("ly") and len(w) > 4:
        w = w[:-2]
    # Doubled final consonant left by a stripped suffix: shipp -> ship, cancell -> cancel.
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in _VOWELS and w[-1] not in "sz":
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def _build_concepts() -> tuple[dict[str, str], dict[tuple[str, ...], str]]:
    single: dict[str, str] = {}
    phrases: dict[tuple[str, ...], str] = {}
    for concept, forms in _CONCEPT_WORDS.items():
        for form in forms:
            words = normalize(form)
            if len(words) == 1:
                single[stem(words[0])] = concept
            else:
                phrases[tuple(words)] = concept
    return single, phrases


_CONCEPT_OF_STEM, _CONCEPT_PHRASES = _build_concepts()
_MAX_PHRASE = max(len(p) for p in _CONCEPT_PHRASES)


def analyze(text: str) -> list[tuple[str, str]]:
    """(token, surface) pairs of the topic-bearing words of `text`.

    A token is a concept ('#price') or the stem of another word; the surface form is kept
    so misrecognized words can be compared with known words as they were spoken.
    """
    words = normalize(text)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        for size in range(min(_MAX_PHRASE, len(words) - i), 1, -1):
            concept = _CONCEPT_PHRASES.get(tuple(words[i:i + size]))
            if concept:
                out.append((concept, " ".join(words[i:i + size])))
                i += size
                break
        else:
            w = words[i]
            i += 1
            if w in _STOP_WORDS:
                continue
            s = stem(w)
            out.append((_CONCEPT_OF_STEM.get(s, s), w))
    return out


def content_tokens(text: str) -> list[str]:
    """Topic-bearing tokens of `text`: concepts ('#price') and stems of other words."""
    return [token for token, _ in analyze(text)]


# --- intents --------------------------------------------------------------------------

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
        weak = _CONCEPT_OF_STEM.get(s) == "#person" or w.startswith("repr")
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
    if len([t for t in content_tokens(text) if t != "#bye"]) > 1:
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


# --- matcher --------------------------------------------------------------------------


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
        for concept, forms in _CONCEPT_WORDS.items():
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
