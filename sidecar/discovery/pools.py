"""The shaped pools of discovery answers by cache key, A/AAAA (discovery/shaping.py) and SRV
(discovery/srv_shaping.py): their one owner. A pool goes when the cache retires its key, and
its bytes are charged to that key in the cache."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from sidecar.core import wire
from sidecar.core.cache import Entry
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.shaping import HOLDER, ShapedAnswer, ShapeSettings, shape
from sidecar.discovery.srv_shaping import ShapedSrv, shape_srv


class Shaper:
    """The shaped pools of discovery answers, by cache key: their one owner."""

    def __init__(
        self,
        table: EndpointTable,
        rng: random.Random,
        counts: dict[tuple[str, str], int],
        charge: Callable[[bytes, str, int], None] | None = None,
    ) -> None:
        self.table = table
        self.rng = rng
        self.pools: dict[bytes, ShapedAnswer | ShapedSrv] = {}
        self.counts = counts  # (zone, action) -> shaped answers served (Counters)
        self.charge = charge  # TtlCache.charge: the pools' bytes count against max_bytes

    def __len__(self) -> int:
        return len(self.pools)

    def shape(
        self,
        key: bytes,
        entry: Entry,
        msg: bytes,
        reply: wire.Reply,
        zone: str,
        do: bool,
        settings: ShapeSettings,
        now: float,
    ) -> ShapedAnswer | ShapedSrv | None:
        """Prepare the pool of the entry just cached under `key`, if it is an address answer
        or an SRV answer (discovery/srv_shaping.py)."""
        table, counts = self.table, self.counts
        pool: ShapedAnswer | ShapedSrv | None = shape(
            entry, msg, reply, zone, do, table, settings, self.rng, counts, now
        ) or shape_srv(entry, msg, reply, zone, do, table, settings, counts, now)
        if pool is not None:
            self.pools[key] = pool
            if self.charge is not None:
                pool.charge = functools.partial(self.charge, key, HOLDER)
        return pool

    def of(self, key: bytes, entry: Entry) -> ShapedAnswer | ShapedSrv | None:
        """The pool drawn from `entry`, cached under `key`; None for any other entry (one the
        cache did not keep, served once as it came, while an older one stays for stale)."""
        pool = self.pools.get(key)
        return pool if pool is not None and pool.base is entry else None

    def srv_addresses(self, key: bytes, entry: Entry, ipv6: bool, now: float) -> list[str]:
        """The live targets' addresses (IPv6 or IPv4) of the SRV pool drawn from `entry`
        under `key` (ShapedSrv.live_addresses); none without such a pool."""
        pool = self.of(key, entry)
        return pool.live_addresses(ipv6, now) if isinstance(pool, ShapedSrv) else []

    def retire(self, key: bytes) -> None:
        """The cache let the entry under `key` go."""
        self.pools.pop(key, None)
