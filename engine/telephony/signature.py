"""X-Twilio-Signature checks for webhooks and the Media Streams handshake.

Twilio signs the URL it called, so behind a TLS-terminating proxy the URL must be
rebuilt from the configured public base URL (aiohttp's `request.url` is the internal
http:// one and ignores X-Forwarded-*). The WebSocket handshake is signed over the wss://
URL exactly as written in the TwiML, with no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

SIGNATURE_HEADER = "X-Twilio-Signature"


class SignatureChecker:
    def __init__(self, auth_token: str, public_base_url: str, enabled: bool = True) -> None:
        self.enabled = enabled
        # Without the account's auth token nothing can be verified: refuse everything
        # rather than accept what anyone can sign with an empty key.
        self.has_token = bool(auth_token)
        self._validator = RequestValidator(auth_token)
        self._public_base = public_base_url.rstrip("/")

    def public_url(self, request: web.Request) -> str:
        """The URL Twilio called: public base + the path and query it requested."""
        return self._public_base + request.rel_url.path_qs

    def ws_public_url(self, request: web.Request) -> str:
        base = self._public_base
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        return base + request.rel_url.path_qs

    def check(self, url: str, params: Mapping[str, str] | None,
              signature: str | None, settings_header: str | None = None) -> bool:
        if not self.enabled:
            return True
        if not signature or not self.has_token:
            return False
        algorithm = get_signature_algorithm(settings_header) if settings_header else None
        return bool(self._validator.validate(url, params or {}, signature, algorithm))

    def check_webhook(self, request: web.Request, params: Mapping[str, str]) -> bool:
        return self.check(self.public_url(request), params,
                          request.headers.get(SIGNATURE_HEADER),
                          request.headers.get(SIGNATURE_SETTINGS_HEADER))

    def check_websocket(self, request: web.Request) -> bool:
        return self.check(self.ws_public_url(request), {},
                          request.headers.get(SIGNATURE_HEADER),
                          request.headers.get(SIGNATURE_SETTINGS_HEADER))


def sign(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Compute the signature Twilio would send (used by the simulated caller)."""
    return str(RequestValidator(auth_token).compute_signature(url, params or {}))
