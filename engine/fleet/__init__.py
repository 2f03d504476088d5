"""The fleet: engines that own their calls in Redis (membership.py), watch each other
and mark a dead one's calls lost (watcher.py, lost.py), and drain for rolling restarts
(drain.py). `fleet_membership` builds this engine's membership from the config."""

from __future__ import annotations

import socket
from collections.abc import Callable

from engine.config import Config
from engine.fleet.lost import LostCallMarker
from engine.fleet.membership import EngineCard, FleetMembership
from engine.fleet.redis_link import FleetKeys, FleetRedis, fleet_client
from engine.fleet.watcher import DeadEngineWatcher
from engine.hub import OpsHub
from engine.log import get_logger

log = get_logger(__name__)


def fleet_membership(config: Config, hub: OpsHub, load: Callable[[], int],
                     draining: Callable[[], bool]) -> FleetMembership | None:
    """This engine's membership when `[fleet] enabled` and `redis.url` are set, else None
    (a single engine needs none)."""
    fleet = config.fleet
    if not fleet.enabled:
        return None
    if not config.redis.url:
        log.warning("fleet.disabled", reason="fleet.enabled needs redis.url (or REDIS_URL)")
        return None
    link = FleetRedis(fleet_client(config.redis.url, fleet.redis_op_timeout_s,
                                   "switchboard-fleet"),
                      FleetKeys(f"{config.redis.key_prefix}:fleet"), fleet.redis_op_timeout_s)
    name = config.engine.engine_id or f"{socket.gethostname()}:{config.engine.port}"
    card = EngineCard(hub.engine_id, name, config.public_base_url())
    watcher = DeadEngineWatcher(link, hub.engine_id, LostCallMarker(hub.publish, hub.history),
                                claim_ttl_s=max(60.0, 10 * fleet.dead_after_s))
    return FleetMembership(link, card, fleet, load=load, draining=draining, watcher=watcher)
