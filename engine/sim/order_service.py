"""A small order service the demo starts: the business's API a tool looks orders up in.

A real HTTP server (aiohttp) on this machine: `POST /orders/status` with the JSON body
`{"order_id": "4471"}` answers `{"order_id": "4471", "status": "shipped", "eta":
"Thursday"}`; an unknown order is a 404 with `{"error": ...}`, a body that is not such an
object a 400. With `token` set, requests must carry `Authorization: Bearer <token>`.
Every request is kept (`requests`) so tests can read what the engine sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.log import get_logger
from engine.sim.standins.server import serve_local

log = get_logger(__name__)

STATUS_PATH = "/orders/status"


@dataclass(frozen=True, slots=True)
class Order:
    status: str
    eta: str


DEMO_ORDERS: dict[str, Order] = {
    "4471": Order("shipped", "Thursday"),
    "1002": Order("being packed", "next Monday"),
    "3090": Order("delivered", "yesterday"),
    "5555": Order("delayed at the warehouse", "in about a week"),
}

# What a tool is told about the service (the [[tools]] entry's parameters).
ORDER_STATUS_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "description": "The order number",
                                "pattern": "^[0-9]{3,10}$"}},
    "required": ["order_id"],
    "additionalProperties": False,
}


class OrderService:
    """The demo's order service; `await start()` returns its status URL."""

    def __init__(self, orders: dict[str, Order] | None = None, token: str = "") -> None:
        self.orders = dict(DEMO_ORDERS if orders is None else orders)
        self.token = token
        self.requests: list[dict[str, Any]] = []  # the JSON bodies received, in order
        self.url = ""
        self._runner: web.AppRunner | None = None

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(STATUS_PATH, self._status)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner, bound = await serve_local(self.build_app(), host, port)
        self.url = f"http://{host}:{bound}{STATUS_PATH}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _status(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = json.loads(await request.text())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("order_id"), str | int):
            return web.json_response({"error": "send {\"order_id\": \"...\"}"}, status=400)
        self.requests.append(body)
        order_id = str(body["order_id"])
        order = self.orders.get(order_id)
        if order is None:
            log.debug("order_service.unknown_order")
            return web.json_response({"error": f"no order {order_id}"}, status=404)
        return web.json_response({"order_id": order_id, "status": order.status,
                                  "eta": order.eta})
