"""A discovery zone as the resolver sees it: how its answers are shaped, and where its Cloud
Map registry is. Built by discovery_wiring.py from the configuration, read by the resolver
(pipeline.py), which imports it for its types only: a plain module, kept out of the compiled
ones (docs/architecture.md, "Compiled modules") so that a sidecar without a discovery zone
loads none of the discovery package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.discovery.registry import Listing
    from sidecar.discovery.shaping import ShapeSettings


class Registry(Protocol):
    """A discovery zone's Cloud Map registry (discovery/cloudmap.py's CloudMapSource)."""

    def listing(self, service: str, now: float) -> Listing | None: ...

    def ages(self, now: float) -> list[tuple[str, float]]: ...


@dataclass(frozen=True)
class DiscoveryZone:
    """A zone whose A/AAAA answers are shaped by endpoint health and latency."""

    shaping: ShapeSettings
    # With Cloud Map: called with each service name asked for (the label below the zone).
    asked: Callable[[str], object] | None = None
    # An A/AAAA question of a name with only SRV records is answered with the addresses of
    # its live SRV targets (host mode, fixed ports): see Resolver._synthesize_address.
    synthesize_a: bool = False
    # NXDOMAIN and NODATA are cached at most this long here (the VPC resolver keeps a private
    # zone's NXDOMAIN 300 s; a service with no records for a moment of a deploy comes back).
    negative_ttl: int = 5
    # With Cloud Map: the registry whose instances answer for the zone's services
    # (discovery/registry.py): all of them, none deregistered, none hidden by an NXDOMAIN.
    registry: Registry | None = None
