"""A local stand-in for Twilio's REST API (the Calls resource), for tests and the demo.

Speaks the real wire format: `POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`, form
fields (`Twiml`, `Status`, `Url`), HTTP Basic auth with the account SID and auth token,
JSON call resources, and Twilio's error bodies (20003 authenticate, 20404 not found,
21220 call not in progress). Simulated callers register their calls here and are told
when the engine redirects (transfers) or completes (hangs up) them, as a real Twilio
would end the media stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from aiohttp import BasicAuth, web

from engine.log import get_logger
from engine.sim.standins.server import serve_local

log = get_logger(__name__)

CallListener = Callable[[str, dict[str, str]], Awaitable[None] | None]


@dataclass
class StandInCall:
    sid: str
    from_number: str
    to_number: str
    status: str = "in-progress"
    twiml: list[str] = field(default_factory=list)
    listener: CallListener | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    form: dict[str, str]
    authorized: bool
    at: float


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message,
                              "more_info": f"https://www.twilio.com/docs/errors/{code}",
                              "status": status}, status=status)


class TwilioApiStandIn:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.calls: dict[str, StandInCall] = {}
        self.requests: list[RecordedRequest] = []
        self.fail_next: list[tuple[int, int, str]] = []  # queued (status, code, message)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    def register_call(self, sid: str, from_number: str = "", to_number: str = "",
                      listener: CallListener | None = None) -> StandInCall:
        call = StandInCall(sid, from_number, to_number, listener=listener)
        self.calls[sid] = call
        return call

    def updates_for(self, sid: str) -> list[RecordedRequest]:
        suffix = f"/Calls/{sid}.json"
        return [r for r in self.requests if r.path.endswith(suffix) and r.authorized]

    async def wait_for_update(self, sid: str, timeout: float = 10.0) -> RecordedRequest:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: bool(self.updates_for(sid)))
        return self.updates_for(sid)[-1]

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update)
        app.router.add_get("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._fetch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner, bound = await serve_local(self.build_app(), host, port)
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        try:
            auth = BasicAuth.decode(header)
        except ValueError:
            return False
        return auth.login == self.account_sid and auth.password == self.auth_token

    def _resource(self, call: StandInCall) -> dict[str, object]:
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call.sid}.json"
        now = formatdate(usegmt=True)
        return {"sid": call.sid, "account_sid": self.account_sid, "status": call.status,
                "from": call.from_number, "to": call.to_number, "direction": "inbound",
                "api_version": "2010-04-01", "date_created": now, "date_updated": now,
                "uri": uri}

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(self._resource(call))

    async def _update(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        authorized = self._authorized(request)
        self.requests.append(RecordedRequest("POST", request.path, form, authorized,
                                             time.time()))
        async with self._changed:
            self._changed.notify_all()
        if not authorized:
            return _error(401, 20003, "Authenticate")
        if request.match_info["account"] != self.account_sid:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        if self.fail_next:
            status, code, message = self.fail_next.pop(0)
            return _error(status, code, message)
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        if call.status != "in-progress":
            return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        if form.get("Status") == "completed":
            call.status = "completed"
        elif "Twiml" in form or "Url" in form:
            call.twiml.append(form.get("Twiml", form.get("Url", "")))
        else:
            return _error(400, 21218, "Invalid update: Twiml, Url or Status required")
        log.info("standin.call_updated", call_sid=call.sid, fields=sorted(form))
        if call.listener is not None:
            # Like Twilio: answer the request first, then end the media stream.
            result = call.listener(call.sid, form)
            if asyncio.iscoroutine(result):
                task = asyncio.get_running_loop().create_task(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return web.json_response(self._resource(call))
