"""The agent backed by an OpenAI (or OpenAI-compatible) chat completions endpoint.

Streams the reply token by token through the official SDK and reports the usage the
server sends in its final chunk (`stream_options.include_usage`).

A stream cut after some text arrived ends with `AgentDone(usage.estimated=True)` rather
than an error: those deltas may already be on their way to the caller, the tokens are
billed anyway, and the ledger should count them. A failure before the first delta raises
`ProviderError`, so a fallback agent can answer instead.

Reasoning models (the gpt-5 family) think before their first token unless asked not to:
`reasoning_effort` carries the configured effort (the lowest, "none", by default) and the
reply limit goes as `max_completion_tokens`. An empty effort sends the classic request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import (
    AgentDone,
    AgentEvent,
    ChatMessage,
    ProviderError,
    TextDelta,
    Timing,
    Usage,
)
from engine.providers.builtin.openai_common import (
    ENV,
    PROVIDER,
    OpenAISettings,
    ReasoningEffort,
    api_key,
    estimate_tokens,
    map_openai_error,
    openai,
)
from engine.providers.registry import Billing, BillingUnit, ProviderSpec, register

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

log = get_logger(__name__)

DEFAULT_SUMMARY_INSTRUCTION = (
    "Summarize the phone conversation so far in at most three short sentences. Keep the "
    "caller's name, request, any numbers they gave, and what was already answered."
)


class OpenAIChatAgent:
    """Agent over `POST /chat/completions` (streamed)."""

    name = "openai"
    runs_locally = False  # a cut request is read on for its usage (engine.providers.drains)

    def __init__(self, api_key: str, base_url: str, model: str = "gpt-5.4-mini",
                 temperature: float = 0.3, max_tokens: int = 200, timeout_s: float = 8.0,
                 first_token_timeout_s: float = 3.0, max_retries: int = 0,
                 summary_instruction: str = DEFAULT_SUMMARY_INSTRUCTION,
                 reasoning_effort: ReasoningEffort = "none") -> None:
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.reasoning_effort = reasoning_effort
        self.first_token_timeout_s = first_token_timeout_s
        self.summary_instruction = summary_instruction
        # One client for the process: its connection pool keeps TLS connections warm.
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url,
                                          timeout=timeout_s, max_retries=max_retries)

    @staticmethod
    def _messages(messages: list[ChatMessage]) -> list[ChatCompletionMessageParam]:
        out: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        return out

    def _request_options(self) -> dict[str, Any]:
        """The reply limit, and the reasoning effort when one is set. Reasoning models
        refuse `max_tokens` (they take `max_completion_tokens`); without an effort the
        classic request goes out, as other models and compatible servers expect."""
        if not self.reasoning_effort:
            return {"max_tokens": self.max_tokens}
        return {"reasoning_effort": self.reasoning_effort,
                "max_completion_tokens": self.max_tokens}

    def _estimated_usage(self, messages: list[ChatMessage], reply: str) -> Usage:
        prompt = 3 + sum(4 + estimate_tokens(m.content) for m in messages)
        return Usage(provider=PROVIDER, kind="llm", model=self.model, input_tokens=prompt,
                     output_tokens=estimate_tokens(reply), estimated=True)

    def _usage_from(self, chunk: ChatCompletionChunk) -> Usage | None:
        u = chunk.usage
        if u is None:
            return None
        details = u.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        return Usage(provider=PROVIDER, kind="llm", model=self.model,
                     input_tokens=u.prompt_tokens, cached_input_tokens=cached,
                     output_tokens=u.completion_tokens)

    async def respond(self, messages: list[ChatMessage]) -> AsyncGenerator[AgentEvent, None]:
        started = time.monotonic()
        stream: openai.AsyncStream[ChatCompletionChunk] | None = None
        iterator: AsyncIterator[ChatCompletionChunk] | None = None
        first_token_s: float | None = None
        reply_parts: list[str] = []
        usage: Usage | None = None
        pending: list[str] = []
        try:
            # Until the first text arrives the whole wait is bounded, connect included.
            try:
                async with asyncio.timeout(self.first_token_timeout_s):
                    stream = await self._client.chat.completions.create(
                        model=self.model, messages=self._messages(messages),
                        temperature=self.temperature, stream=True,
                        stream_options={"include_usage": True}, **self._request_options())
                    iterator = stream.__aiter__()
                    while not pending:
                        chunk = await iterator.__anext__()
                        usage = self._usage_from(chunk) or usage
                        pending = [c.delta.content for c in chunk.choices if c.delta.content]
            except TimeoutError as exc:
                raise ProviderError(PROVIDER, f"no first token within "
                                    f"{self.first_token_timeout_s:.2f}s",
                                    retryable=True) from exc
            except StopAsyncIteration:
                pass  # the reply was empty
            except openai.OpenAIError as exc:
                err = map_openai_error(exc)
                log.warning("llm_request_failed", provider=PROVIDER, model=self.model,
                            status=err.status, retryable=err.retryable, error=str(err))
                raise err from exc
            first_token_s = time.monotonic() - started if pending else None
            for text in pending:
                reply_parts.append(text)
                yield TextDelta(text)
            if iterator is not None and pending:
                try:
                    async for chunk in iterator:
                        usage = self._usage_from(chunk) or usage
                        for choice in chunk.choices:
                            if choice.delta.content:
                                reply_parts.append(choice.delta.content)
                                yield TextDelta(choice.delta.content)
                except openai.OpenAIError as exc:
                    # Text already went out: finish with what we have (see module doc).
                    log.warning("llm_stream_cut", provider=PROVIDER, model=self.model,
                                error=str(map_openai_error(exc)),
                                received_chars=sum(map(len, reply_parts)))
            if usage is None:
                usage = self._estimated_usage(messages, "".join(reply_parts))
            yield AgentDone(usage=usage, timing=Timing(first_byte_s=first_token_s,
                                                       total_s=time.monotonic() - started))
        finally:
            # Barge-in closes this generator: close the HTTP response so the server stops.
            if stream is not None:
                await stream.close()

    async def summarize(self, messages: list[ChatMessage]) -> tuple[str, Usage]:
        transcript = "\n".join(f"{m.role}: {m.content}" for m in messages if m.role != "system")
        request: list[ChatMessage] = [ChatMessage("system", self.summary_instruction),
                                      ChatMessage("user", transcript)]
        try:
            completion = await self._client.chat.completions.create(
                model=self.model, messages=self._messages(request),
                temperature=self.temperature, **self._request_options())
        except openai.OpenAIError as exc:
            err = map_openai_error(exc)
            log.warning("llm_summarize_failed", provider=PROVIDER, model=self.model,
                        status=err.status, error=str(err))
            raise err from exc
        summary = (completion.choices[0].message.content or "").strip() \
            if completion.choices else ""
        u = completion.usage
        if u is None:
            usage = self._estimated_usage(request, summary)
        else:
            details = u.prompt_tokens_details
            usage = Usage(provider=PROVIDER, kind="llm", model=self.model,
                          input_tokens=u.prompt_tokens,
                          cached_input_tokens=(details.cached_tokens or 0) if details else 0,
                          output_tokens=u.completion_tokens)
        return summary, usage

    async def warm_up(self) -> None:
        """Nothing to load; the first request opens the connection."""

    async def aclose(self) -> None:
        await self._client.close()


def build(settings: OpenAISettings, config: Config) -> OpenAIChatAgent:
    return OpenAIChatAgent(
        api_key(settings), settings.base_url, model=settings.llm_model,
        temperature=settings.llm_temperature, max_tokens=settings.llm_max_tokens,
        timeout_s=settings.timeout_s,
        # The chain stops waiting at its first-token timeout, then reads the request on
        # for its usage (engine.providers.drains): the request itself lives for both.
        first_token_timeout_s=(config.providers.llm_first_token_timeout_s
                               + config.providers.drain_timeout_s),
        max_retries=settings.max_retries, summary_instruction=config.policy.summary_instruction,
        reasoning_effort=settings.llm_reasoning_effort)


SPEC = register(ProviderSpec(name=PROVIDER, kind="agent", settings=OpenAISettings, build=build,
                             env=ENV, billing=(Billing(BillingUnit.TOKENS),)))
