"""The conversation context of one call, kept within a token budget.

Recent turns are kept verbatim; when the estimate passes the budget, the older turns are
folded into a summary by the agent (a real LLM summary, or the FAQ agent's structured
one), so a 10-minute call costs about the same tokens per turn as a 1-minute call.
Only what the caller actually heard of an interrupted answer is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.log import get_logger
from engine.providers.base import Agent, ChatMessage, ProviderError

log = get_logger(__name__)


PASSAGES_HEADER = ("Knowledge for the caller's next question, one passage per line. Answer "
                   "only from it; when it does not answer, say you don't know.")


# Before a past turn's tool note: the tool exchange itself is not replayed, only this.
TOOLS_NOTE = "Tools the agent used for its next answer (tool -> result): "


def estimate_tokens(text: str) -> int:
    # ~4 characters per token for English; good enough for a budget.
    return len(text) // 4 + 1


@dataclass(slots=True)
class Turn:
    user: str
    assistant: str
    tools: str = ""  # what the agent looked up for this answer (session/tool_turns.py)


class ConversationContext:
    def __init__(self, system_prompt: str, max_tokens: int, keep_recent_turns: int,
                 call_sid: str = "", knowledge: str = "") -> None:
        self.system_prompt = system_prompt
        # The static knowledge block (engine/knowledge): right after the system prompt, the
        # same bytes every turn (the provider caches the prefix); outside the budget.
        self.knowledge = knowledge
        self.max_tokens = max_tokens
        self.keep_recent = max(1, keep_recent_turns)
        self.summary = ""
        self.turns: list[Turn] = []
        self.summaries_made = 0
        self.log = log.bind(call_sid=call_sid)

    def messages(self, user_text: str, passages: Sequence[str] = ()) -> list[ChatMessage]:
        """What the agent sees for the next reply; `passages` (retrieved knowledge for this
        turn) go just before the caller's words, after the cacheable prefix."""
        msgs = [ChatMessage("system", self.system_prompt)]
        if self.knowledge:
            msgs.append(ChatMessage("system", self.knowledge))
        if self.summary:
            msgs.append(ChatMessage("system", "Summary of the call so far: " + self.summary))
        for turn in self.turns:
            msgs.append(ChatMessage("user", turn.user))
            if turn.tools:
                msgs.append(ChatMessage("system", TOOLS_NOTE + turn.tools))
            if turn.assistant:
                msgs.append(ChatMessage("assistant", turn.assistant))
        if passages:
            msgs.append(ChatMessage("system", PASSAGES_HEADER + "\n" + "\n".join(passages)))
        msgs.append(ChatMessage("user", user_text))
        return msgs

    def add_turn(self, user: str, assistant_heard: str, tools: str = "") -> None:
        self.turns.append(Turn(user, assistant_heard, tools))

    def tokens(self) -> int:
        total = estimate_tokens(self.system_prompt) + estimate_tokens(self.summary)
        for turn in self.turns:
            total += estimate_tokens(turn.user) + estimate_tokens(turn.assistant) + 8
            if turn.tools:
                total += estimate_tokens(turn.tools) + 8
        return total

    def needs_summary(self) -> bool:
        return self.tokens() > self.max_tokens and len(self.turns) > self.keep_recent

    async def summarize(self, agent: Agent) -> None:
        """Fold the older turns into the summary. On failure, drop them (bounded anyway).
        The agent's chain books what the summary cost."""
        if not self.needs_summary():
            return
        older, recent = self.turns[:-self.keep_recent], self.turns[-self.keep_recent:]
        msgs: list[ChatMessage] = []
        if self.summary:
            msgs.append(ChatMessage("system", "Summary so far: " + self.summary))
        for turn in older:
            msgs.append(ChatMessage("user", turn.user))
            if turn.assistant:
                msgs.append(ChatMessage("assistant", turn.assistant))
        try:
            summary, _ = await agent.summarize(msgs)
        except ProviderError as exc:
            self.log.warning("context.summary_failed", error=str(exc), dropped=len(older))
            self.turns = recent
            return
        # The summary itself must stay bounded: keep its most recent part.
        limit = self.max_tokens * 2
        self.summary = summary[-limit:]
        self.turns = recent
        self.summaries_made += 1
        self.log.info("context.summarized", folded_turns=len(older), tokens=self.tokens())
