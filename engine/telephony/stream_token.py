"""Per-call media stream tokens: what binds a Media Streams socket to its call.

Twilio signs the WebSocket handshake over the fixed stream URL only, so one captured
handshake would otherwise open streams for any CallSid. Every <Connect><Stream> we answer
carries a token as a <Parameter> (Twilio echoes it in `start.customParameters`): an
HMAC-SHA256 of the account and the CallSid under a server secret. The engine takes a
`start` only with the token of that very call.

Nothing is stored: the token is recomputed from the secret, so it holds after a restart and
on every engine sharing the secret (SWITCHBOARD_STREAM_SECRET, or else one derived from
TWILIO_AUTH_TOKEN, which a fleet already shares).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from engine.config import Config
from engine.log import get_logger

log = get_logger(__name__)

# The <Parameter> name the token travels under.
TOKEN_PARAMETER = "streamToken"

# Keeps the key derived from the auth token apart from any other use of that token.
_DERIVATION_LABEL = b"switchboard media stream token v1"


class StreamTokens:
    """Issues and checks the token of one call's media stream."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_config(cls, config: Config) -> StreamTokens:
        """The configured secret, else a key derived from the Twilio auth token, else (no
        auth token: nothing is signed either) a key of this process alone."""
        secret = config.engine.stream_secret.get_secret_value()
        if secret:
            return cls(secret.encode())
        auth_token = config.twilio.auth_token.get_secret_value()
        if auth_token:
            return cls(hmac.new(auth_token.encode(), _DERIVATION_LABEL, hashlib.sha256).digest())
        log.warning("stream_tokens.process_key", detail="neither SWITCHBOARD_STREAM_SECRET "
                    "nor TWILIO_AUTH_TOKEN is set: media streams of this engine's calls will "
                    "not be taken after a restart or by another engine")
        return cls(secrets.token_bytes(32))

    def issue(self, call_sid: str, account_sid: str) -> str:
        message = f"{account_sid}:{call_sid}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def valid(self, call_sid: str, account_sid: str, token: str) -> bool:
        """Whether `token` is this call's (compared in constant time)."""
        expected = self.issue(call_sid, account_sid).encode()
        return hmac.compare_digest(expected, token.encode("utf-8", "replace"))
