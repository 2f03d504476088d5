"""The OpenAI stand-in's wire pieces: error bodies, the bill's records, chat chunks and
the helpers of the transcription endpoint (openai_api.py serves them)."""

from __future__ import annotations

import io
import math
import uuid
import wave
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.providers.base import Usage

LOGPROB_MODELS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe")
JSON_ONLY_MODELS = (*LOGPROB_MODELS, "gpt-transcribe")

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    401: ("invalid_request_error", "invalid_api_key",
          "Incorrect API key provided. You can find your API key at "
          "https://platform.openai.com/account/api-keys."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None,
          "The server had an error while processing your request. Sorry about that!"),
}


def estimate_tokens(text: str) -> int:
    """About four characters per token for English: the stand-in's tokenizer."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def error_response(status: int, message: str | None = None, *, type_: str | None = None,
                   code: str | None = None, param: str | None = None) -> web.Response:
    default_type, default_code, default_message = _ERRORS.get(
        status, ("invalid_request_error", None, "Invalid request."))
    body = {"error": {"message": message or default_message, "type": type_ or default_type,
                      "param": param, "code": code if code is not None else default_code}}
    return web.json_response(body, status=status)


@dataclass(slots=True)
class SegmentSpec:
    """One whisper `verbose_json` segment the stand-in should return."""

    text: str
    duration_s: float
    avg_logprob: float = -0.2
    no_speech_prob: float = 0.01
    compression_ratio: float = 1.3


@dataclass(slots=True, frozen=True)
class BilledRequest:
    """One request as the vendor bills it: the endpoint ("chat", "transcription",
    "speech"), the model, and the usage (the API's own usage object; speech:
    {"characters": n})."""

    endpoint: str
    model: str
    usage: dict[str, Any]

    def as_usage(self) -> Usage:
        """The same, as the engine's `Usage` (what a price table prices)."""
        u = self.usage
        if self.endpoint == "chat":
            return Usage("openai", "llm", self.model, input_tokens=u["prompt_tokens"],
                         cached_input_tokens=u["prompt_tokens_details"]["cached_tokens"],
                         output_tokens=u["completion_tokens"])
        if self.endpoint == "speech":
            return Usage("openai", "tts", self.model, characters=u["characters"])
        if u["type"] == "tokens":
            return Usage("openai", "stt", self.model, input_tokens=u["input_tokens"],
                         output_tokens=u["output_tokens"])
        return Usage("openai", "stt", self.model, audio_seconds=float(u["seconds"]))


@dataclass(slots=True)
class ChatBill:
    """What one accepted chat request costs: its prompt, and the completion tokens sent."""

    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    billed: bool = True  # False once it ends with an error response
    logged: bool = False

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        """The usage object (the one the API sends), for `completion_tokens` (the tokens
        sent so far when None)."""
        completion = self.completion_tokens if completion_tokens is None else completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens,
                                          "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}


@dataclass(slots=True, frozen=True)
class Completion:
    """What every chunk of one streamed chat completion repeats."""

    id: str
    created: int
    model: str

    def chunk(self, delta: dict[str, Any], finish: str | None = None, *,
              with_usage: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_standin",
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}
        if with_usage:
            out["usage"] = None
        return out


def common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def wav_seconds(file_info: dict[str, Any], wav_bytes: bytes) -> float | None:
    """The upload's length in seconds (its format noted in `file_info`), None if not WAV."""
    try:
        with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
            file_info.update(sample_rate=wav.getframerate(), channels=wav.getnchannels(),
                             sample_width=wav.getsampwidth())
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError):
        return None


def unsupported_options(model: str, response_format: str,
                         include: list[str]) -> web.Response | None:
    """What OpenAI refuses: verbose formats on the gpt-4o models, logprobs elsewhere."""
    if model.startswith(JSON_ONLY_MODELS) and response_format not in ("json", "text"):
        return error_response(400, f"response_format '{response_format}' is not compatible "
                              f"with model '{model}'. Use 'json' or 'text' instead.",
                              param="response_format", code="unsupported_value")
    if "logprobs" in include and (not model.startswith(LOGPROB_MODELS)
                                  or response_format != "json"):
        return error_response(400, f"logprobs are not supported with model '{model}' "
                              f"and response_format '{response_format}'.",
                              param="include", code="unsupported_value")
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def error_event(type_: str, code: str | None, message: str, *, param: str | None = None,
                event_id: str | None = None) -> dict[str, Any]:
    """An `error` server event (RealtimeErrorEvent)."""
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": type_, "code": code, "message": message, "param": param,
                      "event_id": event_id}}
