"""A stand-in for the OpenAI API: chat completions, transcriptions and speech.

Speaks the real wire format (SSE chunks, usage chunk, multipart uploads, error bodies) so
the official `openai` SDK runs unchanged against it via `base_url=server.base_url`.

`usage_log` is the bill: what the vendor would charge per request (`BilledRequest`), and
`bill()` the same as the engine's `Usage`. A chat request is billed once accepted (its
prompt by the stand-in's own count) for the completion tokens it sent, all of them or
those sent before the client went away (or the stream was cut); a transcription for what
its usage reports; speech for its characters. A request refused with an error status is
not billed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from engine.providers.base import Usage
from engine.sim.standins.openai_realtime import RealtimeTranscriptionEndpoint
from engine.sim.standins.openai_tools import (
    ToolRule,
    call_deltas,
    conversation_problem,
    message_with_calls,
    offered_tools,
    plan_reply,
)
from engine.sim.standins.openai_wire import (
    LOGPROB_MODELS as _LOGPROB_MODELS,
)
from engine.sim.standins.openai_wire import (
    BilledRequest,
    ChatBill,
    Completion,
    SegmentSpec,
    common_prefix,
    error_response,
    estimate_tokens,
    unsupported_options,
    wav_seconds,
)
from engine.sim.standins.server import (
    TIMEOUT_SLEEP_S,
    RecordedRequest,
    StandinServer,
    speech_like_pcm,
)

TTS_SAMPLE_RATE = 24000  # OpenAI's `pcm` response format: 24 kHz, 16-bit, mono
_TOKEN_RE = re.compile(r"\s*\S+")

class OpenAIStandin(StandinServer):
    """POST /v1/chat/completions, /v1/audio/transcriptions, /v1/audio/speech.

    Extra knobs: `reply` (text, or a function of the last user message), `cached_tokens`
    (None: emulate prefix caching), `transcript` (text, or a function of audio seconds),
    `segments`, `avg_logprob`, `no_speech_prob`, `compression_ratio`, `token_logprob`,
    `speech_seconds_per_char`, `audio_chunk_bytes`.
    """

    def __init__(self, *, api_key: str | None = "sk-test") -> None:
        super().__init__(api_key=api_key)
        self.reply: str | Callable[[str], str] = "Sure, I can help with that."
        # Or a function of the whole request's messages (openai_grounded.py); wins if set.
        self.reply_to_messages: Callable[[list[dict[str, Any]]], str] | None = None
        self.cached_tokens: int | None = None
        # Scripted function calling (openai_tools.py): the first rule that applies wins.
        self.tool_rules: list[ToolRule] = []
        self.tool_chunk_chars = 7  # a call's arguments are streamed in pieces this long
        self.transcript: str | Callable[[float], str] = "I would like to check my order."
        self.segments: list[SegmentSpec] | None = None
        self.avg_logprob = -0.2
        self.no_speech_prob = 0.01
        self.compression_ratio = 1.3
        self.token_logprob = -0.05
        self.audio_tokens_per_second = 10.0
        self.speech_seconds_per_char = 0.06
        self.audio_chunk_bytes = 4800  # 100 ms of 24 kHz PCM16
        self.last_usage: dict[str, Any] | None = None
        self.usage_log: list[BilledRequest] = []  # what the vendor bills, per request
        self._seen_prompts: list[str] = []
        self.realtime = RealtimeTranscriptionEndpoint(self)  # GET /v1/realtime

    def url_for(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/v1"

    def bill(self) -> list[Usage]:
        """Everything billed so far, as the engine's `Usage`."""
        return [billed.as_usage() for billed in self.usage_log]

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_post("/v1/audio/speech", self._speech)
        self.realtime.add_routes(app)
        return app

    # --- shared ---------------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The error the current mode or a wrong key calls for, if any."""
        auth = request.headers.get("Authorization", "")
        presented = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if self.mode == "401" or not self.key_ok(presented):
            return error_response(401)
        if self.mode in ("429", "500", "422"):
            return error_response(int(self.mode))
        return None

    # --- chat -----------------------------------------------------------------------

    def _reply_for(self, messages: list[dict[str, Any]]) -> str:
        if self.reply_to_messages is not None:
            return self.reply_to_messages(messages)
        if isinstance(self.reply, str):
            return self.reply
        last_user = next((str(m.get("content", "")) for m in reversed(messages)
                          if m.get("role") == "user"), "")
        return self.reply(last_user)

    def _prompt_usage(self, messages: list[dict[str, Any]]) -> tuple[int, int]:
        prompt_tokens = 3 + sum(4 + estimate_tokens(str(m.get("content", ""))) for m in messages)
        if self.cached_tokens is not None:
            return prompt_tokens, min(self.cached_tokens, prompt_tokens)
        # Like OpenAI: a prefix seen before is cached in 128-token steps from 1024 tokens.
        serialized = json.dumps(messages, sort_keys=True)
        common = max((len(common_prefix(serialized, seen)) for seen in self._seen_prompts),
                     default=0)
        self._seen_prompts = [*self._seen_prompts[-63:], serialized]
        cached = (estimate_tokens(serialized[:common]) // 128) * 128
        return prompt_tokens, (min(cached, prompt_tokens) if cached >= 1024 else 0)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, record = await self.json_request(request)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error_response(400, "'messages' is a required property", param="messages")
        messages: list[dict[str, Any]] = body["messages"]
        problem = conversation_problem(body)
        if problem is not None:
            return error_response(400, problem, param="messages")
        plan = plan_reply(self.tool_rules, messages, offered_tools(body))
        tokens = _TOKEN_RE.findall(plan.text if plan else self._reply_for(messages))
        # Accepted: billed from here on, whatever becomes of the answer.
        bill = ChatBill(str(body.get("model", "")), *self._prompt_usage(messages))
        try:
            return await self._answer_chat(request, record, body, tokens, bill,
                                           plan.calls if plan else [])
        finally:
            self._log_chat(bill)

    def _log_chat(self, bill: ChatBill) -> None:
        if bill.billed and not bill.logged:
            bill.logged = True
            self.usage_log.append(BilledRequest("chat", bill.model, bill.usage()))

    async def _answer_chat(self, request: web.Request, record: RecordedRequest,
                           body: dict[str, Any], tokens: list[str], bill: ChatBill,
                           calls: list[tuple[str, str, str]]) -> web.StreamResponse:
        if self.mode == "timeout":
            await self.sleep(TIMEOUT_SLEEP_S)
            bill.billed = False  # answered with an error after all
            return error_response(500)
        completion = Completion(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()),
                                 str(body.get("model", "")))
        await self.sleep(self.latency_s)
        # One completion token per streamed delta: a text token, or a piece of a call.
        deltas = [{"content": token} for token in tokens] + call_deltas(
            calls, self.tool_chunk_chars)
        finish = "tool_calls" if calls else "stop"
        usage = self.last_usage = bill.usage(len(deltas))
        if not body.get("stream"):
            bill.completion_tokens = len(deltas)
            return web.json_response({
                "id": completion.id, "object": "chat.completion", "created": completion.created,
                "model": completion.model, "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                             "message": message_with_calls("".join(tokens), calls)}],
                "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._stream_chat(request, record, completion, deltas, finish, bill,
                                       usage if include_usage else None)

    async def _stream_chat(self, request: web.Request, record: RecordedRequest,
                           completion: Completion, deltas: list[dict[str, Any]], finish: str,
                           bill: ChatBill, usage: dict[str, Any] | None
                           ) -> web.StreamResponse:
        """SSE chunks: the role, one delta (a token, a piece of a tool call) each
        `token_interval_s`, the finish, then (when asked for) the usage chunk. Mode "cut"
        drops the connection halfway. `bill` counts the deltas sent."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        with_usage = usage is not None
        try:
            await response.prepare(request)
            await _sse(response, completion.chunk(
                {"role": "assistant", "content": "", "refusal": None}, with_usage=with_usage))
            cut_at = len(deltas) // 2 if self.mode == "cut" else None
            for i, delta in enumerate(deltas):
                if cut_at is not None and i == max(cut_at, 1):
                    self.drop_connection(request)
                    return response
                if i:
                    await self.sleep(self.token_interval_s)
                await _sse(response, completion.chunk(delta, with_usage=with_usage))
                bill.completion_tokens += 1
            self._log_chat(bill)  # all generated: billed even if the client leaves now
            await _sse(response, completion.chunk({}, finish, with_usage=with_usage))
            if usage is not None:
                await _sse(response, {"id": completion.id, "object": "chat.completion.chunk",
                                      "created": completion.created, "model": completion.model,
                                      "system_fingerprint": "fp_standin", "choices": [],
                                      "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.mark_disconnected(record)
            raise
        return response

    # --- transcriptions -------------------------------------------------------------

    async def _read_upload(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        """The multipart form (a file field becomes its name, type and size) and the
        uploaded file's bytes, recorded in `requests`."""
        post = await request.post()
        form: dict[str, Any] = {}
        wav_bytes = b""
        for key, value in post.items():
            if isinstance(value, web.FileField):
                wav_bytes = value.file.read()
                form[key] = {"filename": value.filename, "content_type": value.content_type,
                             "size": len(wav_bytes)}
            else:
                form.setdefault(key, []).append(str(value))
        form = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in form.items()}
        self.requests.append(await self.record(request, form=form))
        return form, wav_bytes

    async def _transcriptions(self, request: web.Request) -> web.Response:
        form, wav_bytes = await self._read_upload(request)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        model = str(form.get("model", ""))
        if not model:
            return error_response(400, "you must provide a model parameter", param="model")
        if "file" not in form:
            return error_response(400, "Missing file", param="file")
        seconds = wav_seconds(form["file"], wav_bytes)
        if seconds is None:
            return error_response(400, "Invalid file format. Supported formats: ['flac', 'm4a', "
                                  "'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']",
                                  param="file", code="invalid_value")
        response_format = str(form.get("response_format", "json"))
        include = form.get("include[]", form.get("include", []))
        include = [include] if isinstance(include, str) else list(include)
        unsupported = unsupported_options(model, response_format, include)
        if unsupported is not None:
            return unsupported
        if self.mode == "timeout":
            await self.sleep(TIMEOUT_SLEEP_S)
            return error_response(500)
        await self.sleep(self.latency_s)
        text = self.transcript if isinstance(self.transcript, str) else self.transcript(seconds)
        usage = self._transcription_usage(model, seconds, text)  # billed in every format
        if response_format == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        if response_format == "verbose_json":
            return web.json_response({"task": "transcribe", "language": "english",
                                      "duration": seconds, "text": text,
                                      "segments": self._segments(text, seconds),
                                      "usage": usage})
        result: dict[str, Any] = {"text": text, "usage": usage}
        if "logprobs" in include:
            result["logprobs"] = [{"token": tok, "logprob": self.token_logprob,
                                   "bytes": list(tok.encode())}
                                  for tok in _TOKEN_RE.findall(text)]
        return web.json_response(result)

    def _transcription_usage(self, model: str, seconds: float, text: str) -> dict[str, Any]:
        """Per second of audio (whisper, gpt-transcribe) or per token (the gpt-4o models)."""
        if model.startswith(_LOGPROB_MODELS):
            audio_tokens = math.ceil(seconds * self.audio_tokens_per_second)
            out_tokens = estimate_tokens(text)
            usage: dict[str, Any] = {
                "type": "tokens", "input_tokens": audio_tokens, "output_tokens": out_tokens,
                "total_tokens": audio_tokens + out_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}
        else:
            usage = {"type": "duration", "seconds": math.ceil(seconds)}
        self.last_usage = usage
        self.usage_log.append(BilledRequest("transcription", model, usage))
        return usage

    def _segments(self, text: str, seconds: float) -> list[dict[str, Any]]:
        specs = self.segments
        if specs is None:
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s] or [""]
            total_chars = sum(len(s) for s in sentences) or 1
            specs = [SegmentSpec(s, seconds * len(s) / total_chars, self.avg_logprob,
                                 self.no_speech_prob, self.compression_ratio) for s in sentences]
        out: list[dict[str, Any]] = []
        start = 0.0
        for i, spec in enumerate(specs):
            end = start + spec.duration_s
            out.append({"id": i, "seek": int(start * 100), "start": round(start, 2),
                        "end": round(end, 2), "text": " " + spec.text,
                        "tokens": list(range(50364, 50364 + estimate_tokens(spec.text))),
                        "temperature": 0.0, "avg_logprob": spec.avg_logprob,
                        "compression_ratio": spec.compression_ratio,
                        "no_speech_prob": spec.no_speech_prob})
            start = end
        return out

    # --- speech ---------------------------------------------------------------------

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body, record = await self.json_request(request)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict):
            return error_response(400, "We could not parse the JSON body of your request.")
        for required in ("model", "input", "voice"):
            if not body.get(required):
                return error_response(400, f"Missing required parameter: '{required}'.",
                                      param=required, code="missing_required_parameter")
        if body.get("response_format", "mp3") != "pcm":
            return error_response(400, "stand-in: only response_format 'pcm' is generated",
                                  param="response_format", code="unsupported_value")
        if self.mode == "timeout":
            await self.sleep(TIMEOUT_SLEEP_S)
            return error_response(500)
        text = str(body["input"])
        seconds = len(text) * self.speech_seconds_per_char
        audio = speech_like_pcm(seconds, TTS_SAMPLE_RATE).astype("<i2").tobytes()
        await self.sleep(self.latency_s)
        # Accepted: the characters are billed whether or not the audio is heard.
        self.usage_log.append(BilledRequest("speech", str(body["model"]),
                                            {"characters": len(text)}))
        return await self.stream_audio(request, record, audio, {"Content-Type": "audio/pcm"})


async def _sse(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload)}\n\n".encode())
