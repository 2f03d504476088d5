"""A business's API for the tool tests: a real aiohttp server on loopback that answers
order lookups, and misbehaves on demand (500, garbage, a hang, a slow or huge answer)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from engine.sim.standins.server import serve_local

Behaviour = Literal["ok", "500", "garbage", "hang", "huge"]
ORDERS = {"4471": "shipped", "5000": "being packed"}


@dataclass
class OrderApi:
    behaviour: Behaviour = "ok"
    plan: list[Behaviour] = field(default_factory=list)  # per request, before `behaviour`
    delay_s: float = 0.0  # before answering (ok)
    hang_s: float = 30.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/orders/status", self._status)
        self._runner, port = await serve_local(app, shutdown_timeout=0.2)
        self.url = f"http://127.0.0.1:{port}/orders/status"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        behaviour = self.plan.pop(0) if self.plan else self.behaviour
        if behaviour == "500":
            return web.json_response({"error": "database down"}, status=500)
        if behaviour == "garbage":
            return web.Response(text="<html>Bad gateway</html>", content_type="text/html")
        if behaviour == "hang":
            await asyncio.sleep(self.hang_s)
        if behaviour == "huge":  # valid JSON, streamed, far past any sane answer
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"pad": "')
            for _ in range(64):
                await response.write(b"x" * 65536)
            await response.write(b'"}')
            return response
        await asyncio.sleep(self.delay_s)
        order_id = str(self.requests[-1].get("order_id", ""))
        status = ORDERS.get(order_id)
        if status is None:
            return web.json_response({"order_id": order_id, "found": False})
        return web.json_response({"order_id": order_id, "status": status,
                                  "summary": f"order {order_id}: {status}"})
