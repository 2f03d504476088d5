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

The streamed reply goes through the SDK client's own lower-level call,
`client.post("/chat/completions", stream=True, stream_cls=AsyncStream[object])`: the
same HTTP client, auth, base URL, timeouts, error mapping and SSE decoding (with its
in-stream error events) as `chat.completions.create`, but the body is sent as built (it
is plain JSON already; `create` walks it against the request's TypedDicts, about 1 ms
per request for a few messages) and each chunk stays the decoded JSON dict instead of a
`ChatCompletionChunk` model (~4 pydantic objects per token). At 250 calls the two were
about 7 % of the engine's CPU (bench/README.md). `summarize` keeps the typed `create`.

Function calling: with `tools`, the request offers them; tool-call deltas are assembled
as they stream (`openai_tool_calls.py`) and yielded as `ToolCallRequest`s once the reply
finishes with them, then `AgentDone(action="tool_calls")` with the round's usage. A
stream cut while a call's arguments were still coming ends like a cut text reply
(`truncated`, usage estimated): half a call is never run.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from engine.config import Config
from engine.providers.base import (
    AgentDone,
    AgentEvent,
    ChatMessage,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from engine.providers.builtin.openai_common import (
    ENV,
    PROVIDER,
    OpenAISettings,
    ReasoningEffort,
    api_key,
    estimate_tokens,
    first_byte_deadline,
    openai,
)
from engine.providers.builtin.openai_tool_calls import (
    ToolCallAssembler,
    message_body,
    tools_body,
)
from engine.providers.registry import Billing, BillingUnit, ProviderSpec, register

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

# A streamed chunk as the SDK decoded it: {"choices": [{"delta": {"content": ...}}],
# "usage": {...} | None, ...} (the ChatCompletionChunk schema, as JSON).
Chunk = dict[str, Any]

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
                 first_token_timeout_s: float = 1.5, max_retries: int = 0,
                 summary_instruction: str = DEFAULT_SUMMARY_INSTRUCTION,
                 reasoning_effort: ReasoningEffort = "none") -> None:
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.reasoning_effort = reasoning_effort
        # Until the first text arrives the whole wait is bounded, connecting included.
        self._first_token = first_byte_deadline("llm", first_token_timeout_s)
        self.summary_instruction = summary_instruction
        # One client for the process: its connection pool keeps TLS connections warm.
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url,
                                          timeout=timeout_s, max_retries=max_retries)

    @staticmethod
    def _messages(messages: list[ChatMessage]) -> list[ChatCompletionMessageParam]:
        out: list[Any] = [message_body(m) for m in messages]
        return out

    def _request_options(self) -> dict[str, Any]:
        """The reply limit, and the reasoning effort when one is set. Reasoning models
        refuse `max_tokens` (they take `max_completion_tokens`); without an effort the
        classic request goes out, as other models and compatible servers expect."""
        if not self.reasoning_effort:
            return {"max_tokens": self.max_tokens}
        return {"reasoning_effort": self.reasoning_effort,
                "max_completion_tokens": self.max_tokens}

    def _estimated_usage(self, messages: list[ChatMessage], reply: str,
                         tool_chars: int = 0) -> Usage:
        prompt = 3 + sum(4 + estimate_tokens(m.content)
                         + sum(estimate_tokens(c.arguments) for c in m.tool_calls)
                         for m in messages)
        return Usage(provider=PROVIDER, kind="llm", model=self.model, input_tokens=prompt,
                     output_tokens=estimate_tokens(reply) + tool_chars // 4, estimated=True)

    def _usage_from(self, chunk: Chunk) -> Usage | None:
        u = chunk.get("usage") if isinstance(chunk, dict) else None
        if not isinstance(u, dict):
            return None
        details = u.get("prompt_tokens_details")
        cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        return Usage(provider=PROVIDER, kind="llm", model=self.model,
                     input_tokens=int(u.get("prompt_tokens") or 0),
                     cached_input_tokens=int(cached),
                     output_tokens=int(u.get("completion_tokens") or 0))

    @staticmethod
    def _texts(chunk: Chunk, calls: ToolCallAssembler) -> list[str]:
        """The chunk's new text, per choice (usually one; none in the usage chunk); its
        tool-call pieces go to `calls`."""
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices or not isinstance(choices, list):
            return []
        texts = []
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            text = delta.get("content")
            if text and isinstance(text, str):
                texts.append(text)
            pieces = delta.get("tool_calls")
            if pieces:
                calls.add(pieces)
            if choice.get("finish_reason") == "tool_calls":
                calls.finished = True
        return texts

    async def _open_stream(self, messages: list[ChatMessage],
                           tools: Sequence[ToolSpec]) -> openai.AsyncStream[Chunk]:
        """The streamed request through the SDK client's `post` (see the module doc)."""
        body = {"model": self.model, "messages": self._messages(messages),
                "temperature": self.temperature, "stream": True,
                "stream_options": {"include_usage": True}, **self._request_options()}
        if tools:
            body["tools"] = tools_body(tools)
        stream: openai.AsyncStream[Any] = await self._client.post(
            "/chat/completions", body=body, cast_to=object, stream=True,
            stream_cls=openai.AsyncStream[object])
        return stream

    async def respond(self, messages: list[ChatMessage],
                      tools: Sequence[ToolSpec] = ()) -> AsyncGenerator[AgentEvent, None]:
        request = self._first_token.request(self.model)
        stream: openai.AsyncStream[Chunk] | None = None
        reply_parts: list[str] = []
        calls = ToolCallAssembler()
        usage: Usage | None = None
        pending: list[str] = []
        try:
            async with request.first_byte():
                stream = await self._open_stream(messages, tools)
                iterator = stream.__aiter__()
                while not pending and not calls.started:
                    chunk = await anext(iterator, None)
                    if chunk is None:  # the reply was empty
                        break
                    usage = self._usage_from(chunk) or usage
                    pending = self._texts(chunk, calls)
            for text in pending:
                reply_parts.append(text)
                yield TextDelta(text)
            requested: list[ToolCallRequest] = []
            whole = True  # the stream ended as the server meant it to
            if pending or calls.started:
                try:
                    async for chunk in iterator:
                        usage = self._usage_from(chunk) or usage
                        for text in self._texts(chunk, calls):
                            reply_parts.append(text)
                            yield TextDelta(text)
                        if calls.finished and not requested:
                            requested = calls.requests()
                            for call in requested:
                                yield call
                except self._first_token.errors as exc:
                    # Output went out (text, or a call begun: billed either way): finish
                    # with what we have (see module doc); half a call is dropped.
                    request.cut(exc, received_chars=sum(map(len, reply_parts)))
                    whole = False
                if whole and not requested and calls.started:  # no finish_reason: at the end
                    requested = calls.requests()
                    for call in requested:
                        yield call
            if usage is None:
                usage = self._estimated_usage(messages, "".join(reply_parts),
                                              calls.characters())
            yield AgentDone(usage=usage, timing=request.timing(
                produced=bool(reply_parts or requested)),
                action="tool_calls" if requested else "answer", truncated=not whole)
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
        except self._first_token.errors as exc:  # bounded by the SDK's timeout
            raise self._first_token.failed(exc, self.model, request="summary") from exc
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
        first_token_timeout_s=config.providers.request_deadline_s("agent"),
        max_retries=settings.max_retries, summary_instruction=config.policy.summary_instruction,
        reasoning_effort=settings.llm_reasoning_effort)


SPEC = register(ProviderSpec(name=PROVIDER, kind="agent", settings=OpenAISettings, build=build,
                             env=ENV, billing=(Billing(BillingUnit.TOKENS),)))
