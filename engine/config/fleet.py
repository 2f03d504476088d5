"""The `[fleet]` section: call ownership through Redis (heartbeats, dead engines' calls
marked lost) and draining for rolling restarts."""

from __future__ import annotations

from pydantic import Field, model_validator

from engine.config.base import Section


class FleetConfig(Section):
    # Register this engine and its calls in Redis (needs redis.url) and watch the others.
    enabled: bool = False
    heartbeat_s: float = Field(default=2.0, gt=0)
    # An engine silent this long is dead and its calls are marked lost (Redis's own clock
    # measures it: the engine's key expires).
    dead_after_s: float = Field(default=7.0, gt=0)
    # One Redis operation waits at most this long; a slow Redis misses a heartbeat, it
    # never stalls a call.
    redis_op_timeout_s: float = Field(default=1.0, gt=0)
    # A console's command to a call another engine owns: the owner's reply must come
    # within this, or the console is told the owner may have stopped (and it never runs
    # the command later).
    command_timeout_s: float = Field(default=4.0, gt=0)
    # Draining (SIGTERM, `switchboard drain`): new calls get 503, calls in progress have
    # this long to finish, then each hears `drain_goodbye` and is hung up.
    drain_deadline_s: float = Field(default=120.0, ge=0)
    drain_goodbye: str = Field(
        default="I'm sorry, we have to end this call now. Please call us again. Goodbye.",
        min_length=1)
    # How long the goodbye may take before the call is cut anyway.
    drain_goodbye_timeout_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> FleetConfig:
        if self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"fleet.dead_after_s ({self.dead_after_s}) must be at least two "
                             f"heartbeats (fleet.heartbeat_s = {self.heartbeat_s})")
        return self
