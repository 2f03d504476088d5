"""A stand-in for ElevenLabs streaming text-to-speech.

POST /v1/text-to-speech/{voice_id}/stream?output_format=ulaw_8000&… with header
`xi-api-key`, answered with raw audio bytes streamed in chunks, so the official
`elevenlabs` SDK runs unchanged against it via `base_url=server.base_url`.

`usage_log` is the bill: the characters of every request it accepted (the moment it
starts answering), heard or abandoned; a request refused with an error is not billed.
`bill()` gives the same as the engine's `Usage`.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from engine.audio.codec import int16_to_ulaw
from engine.providers.base import Usage
from engine.sim.standins.server import TIMEOUT_SLEEP_S, StandinServer, speech_like_pcm

_PCM_FORMAT = re.compile(r"pcm_(\d+)$")

_ERRORS: dict[int, tuple[str, str]] = {
    401: ("invalid_api_key", "Invalid API key"),
    422: ("invalid_request", "The request could not be processed."),
    429: ("too_many_concurrent_requests",
          "Too many concurrent requests for your subscription tier."),
    500: ("internal_server_error", "An internal server error occurred."),
}


def error_response(status: int, message: str | None = None) -> web.Response:
    status_name, default_message = _ERRORS.get(status, ("error", "Request failed."))
    return web.json_response({"detail": {"status": status_name,
                                         "message": message or default_message}},
                             status=status)


def validation_error(field: str, message: str, value: Any) -> web.Response:
    """Body validation failures come back FastAPI-style: a list of problems."""
    return web.json_response({"detail": [{"type": "missing", "loc": ["body", field],
                                          "msg": message, "input": value}]}, status=422)


class ElevenLabsStandin(StandinServer):
    """Extra knobs: `seconds_per_char` (audio length), `audio_chunk_bytes`."""

    def __init__(self, *, api_key: str | None = "xi-test") -> None:
        super().__init__(api_key=api_key)
        self.seconds_per_char = 0.06
        self.audio_chunk_bytes = 800  # 100 ms of mu-law 8 kHz
        # One entry per accepted request: {"model_id": ..., "characters": ...}.
        self.usage_log: list[dict[str, Any]] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/text-to-speech/{voice_id}/stream", self._stream)
        return app

    def bill(self) -> list[Usage]:
        """Everything billed so far, as the engine's `Usage`."""
        return [Usage("elevenlabs", "tts", entry["model_id"], characters=entry["characters"])
                for entry in self.usage_log]

    def _audio(self, text: str, output_format: str) -> tuple[bytes, str] | None:
        seconds = len(text) * self.seconds_per_char
        if output_format == "ulaw_8000":
            return int16_to_ulaw(speech_like_pcm(seconds, 8000)), "audio/basic"
        match = _PCM_FORMAT.match(output_format)
        if match:
            rate = int(match.group(1))
            return speech_like_pcm(seconds, rate).astype("<i2").tobytes(), "audio/pcm"
        return None

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        body, record = await self.json_request(request)
        if self.mode == "401" or not self.key_ok(request.headers.get("xi-api-key")):
            return error_response(401)
        if self.mode in ("422", "429", "500"):
            return error_response(int(self.mode))
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return validation_error("text", "Field required", body)
        output_format = request.query.get("output_format", "mp3_44100_128")
        audio = self._audio(body["text"], output_format)
        if audio is None:
            return error_response(422, f"stand-in: output_format {output_format!r} "
                                  "is not generated")
        if self.mode == "timeout":
            await self.sleep(TIMEOUT_SLEEP_S)
            return error_response(500)
        data, content_type = audio
        await self.sleep(self.latency_s)
        characters = len(body["text"])
        self.usage_log.append({"model_id": str(body.get("model_id", "")),
                               "characters": characters})
        return await self.stream_audio(request, record, data, {
            "Content-Type": content_type,
            "x-character-count": str(characters),
            "request-id": uuid.uuid4().hex,
        })
