"""A speculative reply: the agent starts on the caller's words at a pause, before the
turn has ended, so its first tokens are there when it does.

`session/hearing.py` judges the words at each pause of the caller. When they do not end
the turn at once (they trail off and wait `trailing_silence_ms`, or are neither finished
nor trailing and wait the usual `endpoint_silence_ms`), `turn_taking.py` starts a
`Speculation` on them (`turns.speculative_reply`): the prompt is built as for a real reply
(`Replying.prompt`) and the agent's first round is read into a buffer by a task. Nothing
is spoken and no tool runs (an answer the answer cache holds needs no head start).

- The turn ends with the same words: the reply is served from the buffer, then from the
  same stream as it goes on (`SpeculatedAgent`); the agent was asked once.
- The caller goes on speaking, or the turn ends with other words: the speculation is
  discarded. Its request was made, so it is billed: closing the stream lets the agent's
  chain read it on for its usage, as for a reply cut by a barge-in.

Only the first round is speculated: tool calls it asks for are buffered like text, and
`tool_turns.py` runs them once the turn is real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

from engine.log import get_logger
from engine.providers.base import (
    Agent,
    AgentEvent,
    ChatMessage,
    ProviderError,
    ToolSpec,
    Usage,
)

if TYPE_CHECKING:
    from engine.session.call_session import CallSession
    from engine.session.replying import Prompt

log = get_logger(__name__)


class Speculation:
    """One speculative first round of the agent, read into a buffer."""

    def __init__(self, session: CallSession, text: str, agent: Agent,
                 prompt: Callable[[str, Agent], Awaitable[Prompt]],
                 tools: Sequence[ToolSpec]) -> None:
        self.text = text
        self.agent = agent
        self.tools = tuple(tools)
        self.log = log.bind(call_sid=session.call_sid)
        self.prompt: Prompt | None = None
        self.events: list[AgentEvent] = []
        self.error: ProviderError | None = None
        self.finished = False
        self.taken = False
        self._ready = asyncio.Event()  # the prompt is built (or failed)
        self._more = asyncio.Event()
        self._task = session.spawn(self._read(prompt), "speculation")

    async def _read(self, build: Callable[[str, Agent], Awaitable[Prompt]]) -> None:
        try:
            prompt = self.prompt = await build(self.text, self.agent)
            self._ready.set()
            if prompt.cached is not None:
                return  # the answer cache answers at once: nothing to start early
            async with aclosing(self.agent.respond(list(prompt.messages),
                                                   self.tools)) as stream:
                async for event in stream:
                    self.events.append(event)
                    self._more.set()
        except ProviderError as exc:
            self.error = exc
        finally:
            self.finished = True
            self._ready.set()
            self._more.set()

    async def prompt_for(self, text: str, agent: Agent,
                         messages: Callable[[str, Sequence[str]], list[ChatMessage]]
                         ) -> Prompt | None:
        """The speculation's prompt when the turn asks the same of the same agent (the
        context unchanged since), else None."""
        if self.taken or text != self.text or agent is not self.agent:
            return None
        await self._ready.wait()
        prompt = self.prompt
        if prompt is None or (prompt.cached is None
                              and messages(text, prompt.passages) != prompt.messages):
            return None
        return prompt

    def matches(self, agent: Agent, messages: list[ChatMessage],
                tools: Sequence[ToolSpec]) -> bool:
        return (not self.taken and self.prompt is not None and agent is self.agent
                and tuple(tools) == self.tools and messages == self.prompt.messages)

    async def replay(self) -> AsyncGenerator[AgentEvent, None]:
        """What the agent has written so far, then the rest as it comes. Closed early (a
        barge-in), the speculative stream is closed too."""
        self.taken = True
        self.log.debug("turn.speculation_used", buffered=len(self.events),
                       finished=self.finished)
        sent = 0
        try:
            while True:
                while sent < len(self.events):
                    sent += 1
                    yield self.events[sent - 1]
                if self.finished:
                    if self.error is not None:
                        raise self.error
                    return
                self._more.clear()
                await self._more.wait()
        finally:
            if not self.finished:
                await self.discard()

    def cancel(self) -> None:
        """Stop reading: the request stays on the bill (the chain reads it on)."""
        if not self.taken:
            asked = self.prompt is not None and self.prompt.cached is None
            self.log.debug("turn.speculation_discarded", agent_asked=asked)
        self._task.cancel()

    async def discard(self) -> None:
        """`cancel`, and wait until the stream is closed."""
        if self._task.done():
            return
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class SpeculatedAgent:
    """The turn's agent, whose first request is the speculation's when it is the same
    request; any other (a later tool round, other words) goes to the agent itself."""

    def __init__(self, agent: Agent, speculation: Speculation) -> None:
        self._agent = agent
        self._speculation = speculation
        self.name = agent.name
        self.runs_locally = agent.runs_locally

    @property
    def model(self) -> str:
        return self._agent.model

    def respond(self, messages: list[ChatMessage],
                tools: Sequence[ToolSpec] = ()) -> AsyncGenerator[AgentEvent, None]:
        if self._speculation.matches(self._agent, messages, tools):
            return self._speculation.replay()
        return self._agent.respond(messages, tools)

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        return await self._agent.summarize(messages)

    async def warm_up(self) -> None:
        await self._agent.warm_up()

    async def aclose(self) -> None:
        """The agent is the engine's, not this turn's: left open."""
