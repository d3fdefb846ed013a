"""A resolver for listener tests that serve from the cache: its upstream is never reached."""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.addresses import HostPort
from sidecar.core.cache import CacheSettings, TtlCache
from sidecar.core.counters import Counters
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.forwarder import Forwarder
from sidecar.pipeline import Resolver
from sidecar.server.upstream import SocketExchanges


def cache_resolver(
    metrics: Counters, upstream_port: int = 53, clock: Callable[[], float] = time.monotonic
) -> Resolver:
    """A resolver with an empty cache (no prefetch) and one loopback upstream; its clock (the
    listeners' too) is `clock`."""
    return Resolver(
        TtlCache(CacheSettings(prefetch_percent=0)),
        ZoneRouter(UpstreamSet([HostPort("127.0.0.1", upstream_port)]), {}),
        Forwarder(SocketExchanges(metrics), metrics, attempt_timeout=1.0, clock=clock),
        metrics,
        query_timeout=4.0,
        clock=clock,
    )
