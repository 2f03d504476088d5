"""The OpenAI stand-in scripted to answer only from what it was given.

`ground(server)` makes every chat reply the best knowledge passage present in the
request's messages (the lines `[id] text` the engine sends, engine/knowledge): the
passage sharing the most topic words with the caller's last message, its answer part
for an FAQ passage ("Q: … A: answer"). When no passage shares a topic word it says it
does not know. So whether a reply is right measures what the prompt carried.
"""

from __future__ import annotations

import re
from typing import Any

from engine.knowledge.passages import Passage
from engine.knowledge.ranking import LexicalRanker
from engine.sim.standins.openai_api import OpenAIStandin

DONT_KNOW = "I don't know, but I can connect you with a specialist."
_PASSAGE_LINE = re.compile(r"^\[(?P<id>[^\]\s]+)\] (?P<text>.+)$", re.MULTILINE)


def passages_in(messages: list[dict[str, Any]]) -> list[Passage]:
    """The knowledge passages the request's system messages carry, in order."""
    found: dict[str, Passage] = {}
    for message in messages:
        if message.get("role") != "system":
            continue
        for m in _PASSAGE_LINE.finditer(str(message.get("content", ""))):
            found.setdefault(m["id"], Passage(m["id"], m["text"], (m["text"],)))
    return list(found.values())


def grounded_reply(messages: list[dict[str, Any]]) -> str:
    question = next((str(m.get("content", "")) for m in reversed(messages)
                     if m.get("role") == "user"), "")
    passages = passages_in(messages)
    best = LexicalRanker(passages).rank(question, 1) if passages else []
    if not best:
        return DONT_KNOW
    text = passages[best[0][0]].text
    return text.split(" A: ", 1)[1] if text.startswith("Q: ") and " A: " in text else text


def ground(server: OpenAIStandin) -> OpenAIStandin:
    server.reply_to_messages = grounded_reply
    return server
