"""Caller text as the FAQ sees it: normalized words, their stems, and concepts.

Telephone speech recognition drops and swaps words, and callers paraphrase, so text is
compared by *concepts*, not strings: it is normalized (contractions, number words,
punctuation), stop words are dropped, the rest is stemmed and mapped through a small
customer-service synonym table ("price", "cost", "how much" are all "#price").
"""

from __future__ import annotations

import re

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


_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize(text: str) -> list[str]:
    """Lowercase words with contractions expanded and number words as digits."""
    text = text.lower().replace("’", "'").replace("‘", "'").replace("`", "'")
    text = text.replace("24/7", " 24 7 ").replace("&", " and ")
    # Whisper writes a spoken "four thousand four hundred..." as "4,471": one number.
    text = _THOUSANDS_RE.sub("", text)
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
CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
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
    for concept, forms in CONCEPT_WORDS.items():
        for form in forms:
            words = normalize(form)
            if len(words) == 1:
                single[stem(words[0])] = concept
            else:
                phrases[tuple(words)] = concept
    return single, phrases


CONCEPT_OF_STEM, _CONCEPT_PHRASES = _build_concepts()
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
            # A number is a value the caller gives (an order, a phone number), not a word
            # of the question: "where is my order 4 4 7 1" asks what "where is my order" does.
            if w in _STOP_WORDS or w.isdigit():
                continue
            s = stem(w)
            out.append((CONCEPT_OF_STEM.get(s, s), w))
    return out


def content_tokens(text: str) -> list[str]:
    """Topic-bearing tokens of `text`: concepts ('#price') and stems of other words."""
    return [token for token, _ in analyze(text)]
