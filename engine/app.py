"""The engine process: wires config, the telephony edge, sessions and providers into an
aiohttp application.

Follow a frame (six files): `telephony/media_stream.py` parses it and calls
`CallSession.on_audio` (`session/call_session.py`), which hands it to turn-taking
(`session/turn_taking.py`: endpointer, barge-in, transcript). A finished turn is answered
by `session/replying.py`, whose sentences `session/speaking.py` synthesizes into the
stream's outbound queue; `telephony/outbound.py` paces it to Twilio in 20 ms frames.

The engine builds the telephony side of the session's ports: the Twilio REST call control
(`CallControl`) here, and per stream an `OutboundPlayer` (`AudioOut`) from its pacer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from engine import __version__
from engine.config import Config
from engine.fleet import fleet_membership
from engine.fleet.console_backend import fleet_console
from engine.fleet.drain import Drainer
from engine.hub import OpsHub
from engine.log import get_logger
from engine.providers.base import TextToSpeech
from engine.record.database import HistoryError
from engine.session.call_session import CallSession, Conversation
from engine.session.registry import CallRegistry
from engine.telephony.collector import FullCollections
from engine.telephony.malformed_http import log_malformed_http_as_warnings
from engine.telephony.media_stream import MediaStreamHandler
from engine.telephony.outbound import Pacer
from engine.telephony.rest import TwilioCallControl
from engine.telephony.signature import SignatureChecker
from engine.telephony.stream_token import StreamTokens
from engine.telephony.webhooks import MAX_BODY_BYTES, TwilioWebhooks

log = get_logger(__name__)

# A webhook waits this long at most for the history to say whether its call has ended.
HISTORY_LOOKUP_TIMEOUT_S = 2.0

ConversationFactory = Callable[[CallSession], Conversation | None]


class GreetingOnly:
    """Greets the caller and listens; the placeholder when no pipeline is configured."""

    def __init__(self, session: CallSession) -> None:
        self.session = session

    def on_audio(self, ulaw: bytes) -> None:
        pass

    def on_dtmf(self, digit: str) -> None:
        pass

    async def start(self) -> None:
        await self.session.voice.speak(self.session.config.engine.greeting)

    def set_listening(self, active: bool) -> None:
        pass

    def take_over(self) -> None:
        pass

    def hand_back(self) -> None:
        pass

    def interrupt(self, reason: str) -> None:
        pass

    def cost_cap_reached(self) -> None:
        session = self.session
        session.spawn(session.say_goodbye_and_hang_up(session.config.policy.cost_cap_goodbye,
                                                      "call cost cap reached"), "cost_cap")

    async def aclose(self) -> None:
        pass


class Engine:
    """Everything one engine process owns."""

    def __init__(self, config: Config, tts: TextToSpeech | None = None,
                 conversation_factory: ConversationFactory | None = None,
                 hub: OpsHub | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        # A voice passed in is its giver's to close (wiring closes the chains it built;
        # providers shared by several engines stay open); one made here is closed here.
        self._owns_tts = tts is None
        if tts is None:
            from engine.providers.builtin.tts_espeak import EspeakTTS, espeak_settings

            esp = espeak_settings(config)
            tts = EspeakTTS(voice=esp.voice, rate_wpm=esp.rate_wpm)
        self.tts = tts
        self.conversation_factory = conversation_factory or GreetingOnly
        self.hub = hub or OpsHub.from_config(config)
        tw = config.twilio
        self.signatures = SignatureChecker(tw.auth_token.get_secret_value(),
                                           config.public_base_url(),
                                           enabled=not config.engine.allow_unsigned_requests)
        self.stream_tokens = StreamTokens.from_config(config)
        self.pacer = Pacer(lead_s=config.engine.outbound_lead_ms / 1000)
        self.collections = FullCollections(self.pacer)
        self.control: TwilioCallControl | None = None
        self.registry = CallRegistry(self._new_session, config.engine.ended_call_retention_s,
                                     ended_on_record=self._ended_in_history)
        self.hub.registry = self.registry
        self.bad_messages: dict[str, int] = {}
        self.calls_total = 0
        self.accepting = True
        # Rolling restarts (fleet/drain.py) and call ownership in Redis (fleet/).
        self.drainer = Drainer(self.registry.live, config.fleet)
        self.fleet = fleet_membership(config, self.hub, lambda: len(self.registry),
                                      lambda: self.drainer.draining)
        self.webhooks = TwilioWebhooks(config, self.registry, self.signatures,
                                       self.stream_tokens, accepting=lambda: self.accepting,
                                       count_bad=self.count_bad, gate=self.hub,
                                       draining=lambda: self.drainer.draining)
        self.media = MediaStreamHandler(config, self.registry, self.pacer, self.signatures,
                                        self.stream_tokens, count_bad=self.count_bad)
        self.deps: Any = None  # the pipeline's shared providers, when one is wired
        self.supervisor_api: Any = None  # the console API, when one is wired
        self.on_started: list[Callable[[], Awaitable[None]]] = []
        self.on_stopping: list[Callable[[], Awaitable[None]]] = []
        # A fleet engine's console API serves the fleet's calls and routes commands.
        self.fleet_console = fleet_console(config, self.hub, self.fleet)
        if self.fleet is not None:  # leaves the fleet before the bus closes
            self.on_started.append(self.fleet.start)
            if self.fleet_console is not None:
                self.on_started.append(self.fleet_console.start)
                self.on_stopping.append(self.fleet_console.stop)
            self.on_stopping.append(self.fleet.stop)

    @property
    def supervisor_backend(self) -> Any:
        """What the supervisor API serves: the fleet's calls, or this engine's."""
        return self.fleet_console if self.fleet_console is not None else self.hub

    # -- sessions -------------------------------------------------------------------------

    def _new_session(self, call_sid: str, from_number: str, to_number: str) -> CallSession:
        assert self.control is not None, "engine not started"
        session = CallSession(call_sid, self.config, self.tts, self.control, observer=self.hub,
                              from_number=from_number, to_number=to_number)
        self.hub.call_created(session)
        if self.fleet is not None:
            self.fleet.track(session)
        session.conversation = self.conversation_factory(session)
        self.calls_total += 1
        return session

    async def _ended_in_history(self, call_sid: str) -> bool:
        """Whether the history has this call as ended (older than the registry keeps).
        An unreadable history lets the call through: a live caller is never turned away
        for it, and recent calls are still known in memory."""
        history = self.hub.history
        if history is None:
            return False
        try:
            stored = await asyncio.wait_for(history.get_call(call_sid),
                                            HISTORY_LOOKUP_TIMEOUT_S)
        except (TimeoutError, sqlite3.Error, HistoryError) as exc:
            log.warning("engine.history_lookup_failed", call_sid=call_sid,
                        error=str(exc) or type(exc).__name__)
            return False
        return stored is not None and stored.ended_at is not None

    def count_bad(self, reason: str) -> None:
        self.bad_messages[reason] = self.bad_messages.get(reason, 0) + 1
        self.hub.metrics.bad_message(reason)

    # -- HTTP -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        degraded: list[str] = []
        if not self.signatures.enabled:
            degraded.append("signature checks disabled")
        if self.control is not None and not self.control.configured:
            degraded.append("twilio credentials not configured")
        providers = []
        if self.deps is not None:
            for chain in self.deps.all_chains():
                for health in chain.health():
                    providers.append({"name": health.name, "kind": health.kind,
                                      "healthy": health.healthy,
                                      "last_error": health.last_error})
                    if not health.healthy:
                        degraded.append(f"{health.kind} provider {health.name} failing")
        budget = self._budget_health(degraded)
        record = await self.hub.record_health(degraded)  # history and bus, each on its own
        drain = self.drainer.status()
        body = {
            "status": "draining" if self.drainer.draining else
                      "degraded" if degraded else "ok",
            "drain": drain,
            "fleet": self.fleet.health() if self.fleet is not None else None,
            "degraded": degraded,
            "version": __version__,
            "active_calls": len(self.registry),
            "calls_total": self.calls_total,
            "uptime_s": round(time.time() - self.started_at, 1),
            "pacer": {"ticks": self.pacer.ticks, "late_ticks": self.pacer.late_ticks},
            "escalations": self.hub.escalations,
            "bad_messages": self.bad_messages,
            "providers": providers,
            "budget": budget,
            **record,
        }
        # Draining: 503 takes the engine out of a load balancer's rotation.
        return web.json_response(body, status=503 if self.drainer.draining else 200)

    def _budget_health(self, degraded: list[str]) -> dict[str, Any]:
        """The budget now; a limit reached, or totals Redis cannot confirm, degrade."""
        hub = self.hub
        hub.budget.state()  # reports a change (a limit that lifted at midnight) first
        reading = hub.budget.reading()
        if reading.state not in ("ok", "warning"):
            limit = reading.driver
            degraded.append(f"budget {reading.state}: {limit.limit} limit "
                            f"${limit.limit_usd:.2f} reached ({limit.period})")
        if reading.totals == "offline":
            degraded.append("budget totals offline: Redis unreachable, a conservative "
                            "share is enforced")
        daily, monthly = reading.daily, reading.monthly
        return {"state": reading.state, "totals": reading.totals,
                "daily_usd": float(daily.spent_usd), "daily_limit_usd": float(daily.limit_usd),
                "monthly_usd": float(monthly.spent_usd),
                "monthly_limit_usd": float(monthly.limit_usd),
                "turned_away": hub.turned_away}

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.hub.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def build_app(self) -> web.Application:
        log_malformed_http_as_warnings()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/twilio/voice", self.webhooks.voice)
        app.router.add_get("/twilio/voice", self.webhooks.voice)  # webhooks set to GET
        app.router.add_post("/twilio/status", self.webhooks.call_status)
        app.router.add_post("/twilio/stream-status", self.webhooks.stream_status)
        app.router.add_get("/twilio/media", self.media.handle)
        app.router.add_get("/healthz", self.healthz)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.control = TwilioCallControl.from_config(self.config, self.stream_tokens)
        if not self.signatures.enabled:
            for _ in range(3):
                log.warning("engine.SIGNATURE_CHECKS_DISABLED",
                            detail="engine.allow_unsigned_requests=true: anyone can post "
                                   "webhooks and open media streams. Local development only.")
        if not self.control.configured:
            log.warning("engine.twilio_credentials_missing",
                        detail="set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        if self.signatures.enabled and not self.signatures.has_token:
            log.error("engine.no_auth_token",
                      detail="TWILIO_AUTH_TOKEN is not set: every webhook and media stream "
                             "will be refused (403) until it is")
        # Start-up objects are frozen, and full collections wait for the pacer's safe
        # point (telephony/collector.py): at 250 calls one stalls the loop for ~45 ms.
        self.collections.start()
        self.pacer.start()
        await self.hub.start()
        if self.supervisor_api is not None:  # `switchboard drain` asks through it
            self.supervisor_api.drainer = self.drainer
        for hook in self.on_started:
            await hook()
        log.info("engine.started", public_url=self.config.public_base_url(),
                 media_url=self.config.media_stream_url(), version=__version__)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.accepting = False
        await self.drainer.aclose()
        calls = self.registry.live()
        if calls:
            log.info("engine.shutdown_ending_calls", calls=len(calls))
        await asyncio.gather(*(s.end("engine shutting down") for s in calls),
                             return_exceptions=True)
        if self.deps is not None:
            # What the ended calls left running is booked before the bus and history go.
            deadline = self.config.providers.drain_timeout_s
            await asyncio.gather(*(chain.settle_abandoned(deadline)
                                   for chain in self.deps.all_chains()))
        await self.hub.stop()  # after the last booking: the fleet's totals get it
        for hook in self.on_stopping:
            await hook()
        await self.hub.drain()
        await self.pacer.stop()
        self.collections.stop()
        if self.control is not None:
            await self.control.aclose()
        if self._owns_tts:
            await self.tts.aclose()
        log.info("engine.stopped")
