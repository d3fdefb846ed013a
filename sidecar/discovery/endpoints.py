"""The endpoints behind discovery answers: health from probes (and Cloud Map), and latency.

Theory of operation
- Every address seen in an A/AAAA answer of a discovery zone becomes an endpoint of that zone.
  A new endpoint is "unknown" and due for a probe at once; after that it is probed every
  `interval` seconds, with +-20% jitter so that a fleet of sidecars does not probe in step.
- The first probe of an unknown endpoint decides its health; after that health has hysteresis:
  `rise` successes in a row make an unhealthy endpoint healthy, `fall` failures in a row a
  healthy one unhealthy (HAProxy's rise/fall). Cloud Map's UNHEALTHY overrides a good probe.
  The last Cloud Map statuses of each zone are kept, so an endpoint first seen after a refresh
  starts with Cloud Map's word instead of waiting for the next one.
- Latency is the smoothed probe round trip: an EWMA with weight 0.3, so a step change shows
  within a few probes.
- Passive health (discovery/passive.py) reports the application's own connections through
  `passive()`: a stalled connect counts as `fall` failures at once (the application has
  already waited `connect_timeout` for it), so the endpoint is left out of answers within a
  dump of the stall, fail-open included; a stalled transfer (repeated retransmission timeouts)
  counts as one failure, as a failed probe does; a dump in which the endpoint acked the
  application (and nothing stalled) ends the run of failures, as a good probe does, but only
  probes count towards `rise`. While the application has connections with RTT
  samples, the published latency is the kernel's (loss included) weighted 0.8 over the probe's;
  and an endpoint healthy with recent traffic is probed `stretch` times less often. Probes alone
  bring a demoted endpoint back (rise), as they do after a probe failure.
- An endpoint not seen in any answer for `forget_after` seconds is dropped; the table holds at
  most `max_endpoints` (the least recently seen go first), so memory is bounded whatever the
  upstream returns.
- `version` changes whenever something that can change an answer's shape changes: health,
  or latency moving to another band (half octaves above 10 ms). Shaped answers compare it to
  know when to look again, so the hot path never recomputes an order.
Time comes in as `now` (monotonic seconds); randomness from an injectable random.Random.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sidecar.discovery.passive import Traffic

UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"
LATENCY_WEIGHT = 0.3
KERNEL_WEIGHT = 0.8  # share of the kernel's RTT in the latency while the application has traffic
JITTER = 0.2
# An endpoint no answer served for this long (its names not asked) is probed UNASKED_STRETCH
# times less often: it is kept in case they come back, and until forget_after.
UNASKED_AFTER = 30.0
UNASKED_STRETCH = 5.0


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    forget_after: float = 300.0
    max_endpoints: int = 4096
    stretch: float = 1.0  # probe interval multiplier while healthy traffic is seen (passive)
    max_per_second: float = 0.0  # probes started per second at most (a token bucket); 0: off


@dataclass(slots=True)
class Endpoint:
    zone: str
    address: str
    port: int | None = None  # an SRV target's port; None: the zone's health check port
    state: str = UNKNOWN
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    latency: float | None = None  # seconds, what shaping uses: probe's, or kernel's mixed in
    probe_latency: float | None = None  # seconds, smoothed probe round trip
    kernel_latency: float | None = None  # seconds, smoothed, from the application's connections
    traffic_at: float | None = None  # last dump with a healthy connection of the application
    connections: int = 0  # the application's open connections, as of the last dump
    stalls: int = 0  # the application's stalled connections, all time
    retransmits: int = 0  # retransmitted segments of the open connections, last dump
    last_seen: float = 0.0
    first_seen: float = 0.0  # when an answer first named it (slow start counts from here)
    last_probe: float | None = None
    next_probe: float = 0.0
    probing: bool = False
    cloudmap: str | None = None  # HEALTHY / UNHEALTHY as Cloud Map says, None if not asked
    az: str | None = None  # its availability zone, as Cloud Map lists it
    # Put in answers by the Cloud Map registry, not by DNS: left out until its first probe
    # (which clears it).
    held: bool = False
    band: int | None = None  # latency band last published in `version`

    @property
    def healthy(self) -> bool | None:
        """True, False, or None while nothing is known (neither probes nor Cloud Map)."""
        if self.cloudmap == "UNHEALTHY" or self.state == UNHEALTHY:
            return False
        if self.state == HEALTHY:
            return True
        if self.cloudmap == "HEALTHY":
            return True
        return None

    @property
    def usable(self) -> bool:
        """Whether shaping may hand it out: not known unhealthy, nor held for its first probe."""
        return self.healthy is not False and not self.held

    @property
    def name(self) -> str:
        """How logs and metrics name it: the address, with the port of an SRV target."""
        if self.port is None:
            return self.address
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )

    @property
    def health_name(self) -> str:
        return {True: HEALTHY, False: UNHEALTHY, None: UNKNOWN}[self.healthy]

    @property
    def health_source(self) -> str:
        if self.cloudmap == "UNHEALTHY":
            return "cloudmap"
        return "probe" if self.state != UNKNOWN else ("cloudmap" if self.cloudmap else "none")

    def describe(self, now: float) -> dict[str, object]:
        return {
            "zone": self.zone,
            "address": self.address,
            "port": self.port,
            "health": self.health_name,
            "probe_state": self.state,
            "cloudmap": self.cloudmap,
            "health_source": self.health_source,
            "availability_zone": self.az,
            "held_for_first_probe": self.held,
            "latency_ms": _ms(self.latency),
            "probe_latency_ms": _ms(self.probe_latency),
            "last_probe_ago_s": None
            if self.last_probe is None
            else round(now - self.last_probe, 3),
            "last_seen_ago_s": round(now - self.last_seen, 3),
            "passive": {
                "connections": self.connections,
                "stalls": self.stalls,
                "retransmits": self.retransmits,
                "kernel_rtt_ms": _ms(self.kernel_latency),
                "traffic_ago_s": None
                if self.traffic_at is None
                else round(now - self.traffic_at, 3),
            },
        }

    def mix_latency(self, now: float, recent: float) -> None:
        """The published latency: the kernel's, weighted over the probe's, while the application
        had traffic within `recent` seconds; the probe's alone otherwise."""
        kernel, probe = self.kernel_latency, self.probe_latency
        if kernel is None or self.traffic_at is None or now - self.traffic_at > recent:
            self.latency = probe
        elif probe is None:
            self.latency = kernel
        else:
            self.latency = KERNEL_WEIGHT * kernel + (1 - KERNEL_WEIGHT) * probe


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _smoothed(old: float | None, sample: float) -> float:
    return sample if old is None else old + LATENCY_WEIGHT * (sample - old)


def latency_band(latency: float) -> int:
    """Half-octave bands of latency above 10 ms; everything faster is band 0. Shaping treats
    endpoints within max(10 ms, 25%) of the best alike (shaping.py), so finer changes, which
    probe noise makes every second, would only make every shaped answer be rebuilt."""
    if latency < 0.010:
        return 0
    return 1 + int(math.log2(latency / 0.010) * 2)


@dataclass
class EndpointTable:
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    rng: random.Random = field(default_factory=random.Random)
    # (zone, address, port or None) -> endpoint; a port for SRV targets only
    endpoints: dict[tuple[str, str, int | None], Endpoint] = field(default_factory=dict)
    version: int = 0
    # (zone, result) -> count; the process's Counters.endpoint_probes when served
    probes: dict[tuple[str, str], int] = field(default_factory=dict)
    # zone -> address -> HEALTHY/UNHEALTHY, as of the last Cloud Map refresh of that zone
    cloudmap_status: dict[str, dict[str, str]] = field(default_factory=dict)
    # zone -> address -> availability zone, as of the last Cloud Map refresh of that zone
    cloudmap_az: dict[str, dict[str, str]] = field(default_factory=dict)
    # The availability zone this task runs in (ECS task metadata); None: unknown, no affinity
    local_az: str | None = None
    # zone -> count; the process's Counters.endpoint_passive_demotions when served
    passive_demotions: dict[str, int] = field(default_factory=dict)
    # The probe rate budget: tokens left (up to one second's worth), as of `budget_at`.
    budget: float = math.inf
    budget_at: float = 0.0
    # called when an endpoint is added to an empty table: the probe loop and the passive reader
    # sleep, with no timer, until then
    on_first: list[Callable[[], None]] = field(default_factory=list)

    def __repr__(self) -> str:
        states: dict[str, int] = {}
        for endpoint in self.endpoints.values():
            states[endpoint.health_name] = states.get(endpoint.health_name, 0) + 1
        return f"<EndpointTable {len(self.endpoints)} endpoints {states} version={self.version}>"

    def get(self, zone: str, address: str, port: int | None = None) -> Endpoint | None:
        return self.endpoints.get((zone, address, port))

    def seen(
        self,
        zone: str,
        addresses: Iterable[str],
        now: float,
        port: int | None = None,
        *,
        held: bool = False,
    ) -> None:
        """Addresses that appeared in an answer (with `port`: as SRV targets at that port):
        new ones are added and due for a probe now; `held`: new ones are left out of answers
        until that probe (the registry's additions)."""
        for address in addresses:
            key = (zone, address, port)
            endpoint = self.endpoints.get(key)
            if endpoint is None:
                if not self.endpoints:
                    for wake in self.on_first:
                        wake()
                endpoint = self.endpoints[key] = Endpoint(
                    zone, address, port, next_probe=now, first_seen=now
                )
                endpoint.cloudmap = self.cloudmap_status.get(zone, {}).get(address)
                endpoint.az = self.cloudmap_az.get(zone, {}).get(address)
                endpoint.held = held
                self.version += 1
            else:  # most recently seen last, for eviction order
                self.endpoints[key] = self.endpoints.pop(key)
            endpoint.last_seen = now
        while len(self.endpoints) > self.settings.max_endpoints:
            del self.endpoints[next(iter(self.endpoints))]
            self.version += 1

    def due(self, now: float) -> list[Endpoint]:
        """Endpoints whose probe is due and not already running, as many as the probe rate
        budget allows (the rest stay due, most overdue first next time); marks them running."""
        allowed = self._allowance(now)
        ready = [e for e in self.endpoints.values() if not e.probing and e.next_probe <= now]
        if len(ready) > allowed:
            ready = sorted(ready, key=lambda e: e.next_probe)[: int(allowed)]
        if self.settings.max_per_second:
            self.budget -= len(ready)
        for endpoint in ready:
            endpoint.probing = True
        return ready

    def _allowance(self, now: float) -> float:
        """Probes that may start now: the token bucket of `max_per_second`, refilled."""
        rate = self.settings.max_per_second
        if not rate:
            return math.inf
        capacity = max(rate, 1.0)  # a second's worth: a burst of new endpoints goes at once
        self.budget = min(capacity, self.budget + (now - self.budget_at) * rate)
        self.budget_at = now
        return max(self.budget, 0.0) // 1

    def next_due(self) -> float | None:
        """The earliest next probe of an endpoint not being probed now; None if there is none."""
        return min((e.next_probe for e in self.endpoints.values() if not e.probing), default=None)

    def probed(
        self, endpoint: Endpoint, ok: bool, rtt: float | None, now: float, *, definite: bool = False
    ) -> bool:
        """Record a probe result; True when the endpoint's health changed. `definite`: a failure
        the endpoint answered itself (refused, or an HTTP 503 while it drains), which demotes it
        at once instead of after `fall` failures in a row (those are for timeouts: a lost packet
        is no verdict)."""
        s = self.settings
        endpoint.probing = False
        endpoint.last_probe = now
        interval = s.interval
        if endpoint.healthy and self._recent_traffic(endpoint, now):
            interval *= s.stretch
        if now - endpoint.last_seen > UNASKED_AFTER:
            interval *= UNASKED_STRETCH
        spread = interval * JITTER
        endpoint.next_probe = now + interval + self.rng.uniform(-spread, spread)
        self.probes[(endpoint.zone, "success" if ok else "failure")] = (
            self.probes.get((endpoint.zone, "success" if ok else "failure"), 0) + 1
        )
        before = endpoint.healthy
        if endpoint.held:
            endpoint.held = False
            self.version += 1  # a first verdict: answers that held it out look again
        if ok:
            endpoint.successes += 1
            endpoint.failures = 0
            if rtt is not None:
                endpoint.probe_latency = _smoothed(endpoint.probe_latency, rtt)
                endpoint.mix_latency(now, s.interval * s.stretch)
            # The first probe of an unknown endpoint decides at once (new endpoints must not
            # be handed out dead while rise/fall counts up); after that, hysteresis.
            if endpoint.state == UNKNOWN or (
                endpoint.state == UNHEALTHY and endpoint.successes >= s.rise
            ):
                endpoint.state = HEALTHY
        else:
            endpoint.failures += 1
            endpoint.successes = 0
            if definite:
                endpoint.failures = max(endpoint.failures, s.fall)
            if endpoint.state == UNKNOWN or (
                endpoint.state == HEALTHY and endpoint.failures >= s.fall
            ):
                endpoint.state = UNHEALTHY
        return self._settle(endpoint, before)

    def _settle(self, endpoint: Endpoint, before: bool | None) -> bool:
        """Publish a change of health or latency band in `version`; True if health changed."""
        changed = endpoint.healthy != before
        band = None if endpoint.latency is None else latency_band(endpoint.latency)
        if changed or band != endpoint.band:
            endpoint.band = band
            self.version += 1
        return changed

    def _recent_traffic(self, endpoint: Endpoint, now: float) -> bool:
        s = self.settings
        return (
            endpoint.traffic_at is not None and now - endpoint.traffic_at <= s.interval * s.stretch
        )

    def passive(self, traffic: dict[str, Traffic], now: float) -> list[tuple[Endpoint, str]]:
        """Apply one dump of the application's connections (address -> Traffic) to every
        endpoint; the endpoints demoted, with why."""
        s = self.settings
        demoted = []
        for endpoint in self.endpoints.values():
            seen = traffic.get(endpoint.address)
            before = endpoint.healthy
            endpoint.connections = seen.connections if seen else 0
            endpoint.retransmits = seen.retransmits if seen else 0
            if seen is not None and seen.latency is not None:
                endpoint.kernel_latency = _smoothed(endpoint.kernel_latency, seen.latency)
                endpoint.traffic_at = now
            if seen is not None and (seen.stalls or seen.timeouts):
                endpoint.stalls += seen.stalls + seen.timeouts
                endpoint.successes = 0
                endpoint.failures += seen.timeouts
                if seen.stalls:
                    endpoint.failures = max(endpoint.failures + 1, s.fall)
                if endpoint.state == UNKNOWN or endpoint.failures >= s.fall:
                    endpoint.state = UNHEALTHY
            elif seen is not None and seen.acked:
                endpoint.failures = 0  # the endpoint answers: later failures are not in a row
            endpoint.mix_latency(now, s.interval * s.stretch)
            if self._settle(endpoint, before) and before is not False:
                zone = endpoint.zone
                self.passive_demotions[zone] = self.passive_demotions.get(zone, 0) + 1
                demoted.append((endpoint, seen.reason if seen else ""))
        return demoted

    def set_cloudmap(
        self, zone: str, statuses: dict[str, str], azs: dict[str, str] | None = None
    ) -> list[Endpoint]:
        """Apply Cloud Map health (address -> HEALTHY/UNHEALTHY) and availability zones
        (address -> AZ) to known endpoints of a zone, and remember them for endpoints seen
        later; the endpoints whose health changed."""
        self.cloudmap_status[zone] = dict(statuses)
        azs = self.cloudmap_az[zone] = dict(azs or {})
        changed = []
        moved = False
        for (ep_zone, address, _port), endpoint in self.endpoints.items():
            if ep_zone != zone:
                continue
            az = azs.get(address, endpoint.az)
            if az != endpoint.az:
                endpoint.az, moved = az, True
            if address not in statuses:
                continue
            before = endpoint.healthy
            endpoint.cloudmap = statuses[address]
            if endpoint.healthy != before:
                changed.append(endpoint)
        if changed or moved:
            self.version += 1
        return changed

    def set_local_az(self, az: str | None) -> None:
        """The availability zone this task runs in (zone affinity, shaping.py)."""
        if az != self.local_az:
            self.local_az = az
            self.version += 1

    def forget(self, now: float) -> list[Endpoint]:
        """Drop endpoints not seen in any answer for `forget_after` seconds."""
        limit = now - self.settings.forget_after
        gone = [e for e in self.endpoints.values() if e.last_seen < limit]
        for endpoint in gone:
            del self.endpoints[(endpoint.zone, endpoint.address, endpoint.port)]
        if gone:
            self.version += 1
        return gone

    def describe(self, now: float) -> list[dict[str, object]]:
        return [e.describe(now) for e in self.endpoints.values()]
