"""Cloud Map polling for discovery zones (optional: needs boto3, the `cloudmap` extra).

Theory of operation
- One CloudMapSource per discovery zone configured with a Cloud Map namespace. The pipeline
  calls `add_service` with the label directly below the zone of every name asked for
  (`resource-server` for `resource-server.local`); only those services are ever looked up.
  Names Cloud Map does not know (ServiceNotFound) are dropped and not taken back for a minute,
  and at most MAX_SERVICES are tracked, so stray lookups cannot grow the work without bound.
- `run_cloudmap` looks at each service every `interval` seconds, on a schedule of its own
  (+-20% jitter after each lookup, so a fleet deployed at once does not poll in lockstep), in
  a worker thread (boto3 blocks). A lookup asks DiscoverInstancesRevision first and calls
  DiscoverInstances(HealthStatus=ALL) only when the revision moved, or at every HEALTH_EVERY-th
  lookup (health changes do not move the revision; Cloud Map applies them after 30 s anyway).
  A service asked for the first time is looked up at a random moment within one interval of
  that ask (not at once: a fleet deployed together would call in the same second), and then
  one interval after each lookup. A service no lookup asked for within `forget_after` seconds
  is no longer polled.
- The source owns each service's listing (discovery/registry.py: every instance, and when
  Cloud Map last confirmed it; a revision found unchanged confirms it too). If a call fails
  the previous listing is kept, and ages: the pipeline believes a listing over DNS only while
  it was confirmed within FRESH_ROUNDS intervals. After each round the zone's merged health
  (UNHEALTHY wins; UNKNOWN says nothing) and availability zones go to
  EndpointTable.set_cloudmap, and `on_change` is told each service whose instances changed,
  so the answers made from them are made again at once (Resolver.registry_changed).
- Throttling (ThrottlingException, RequestLimitExceeded, TooManyRequestsException) doubles the
  wait, up to 5 minutes, and postpones every service's next lookup by it; lookups without
  throttling halve it, at most once per wait, back down to `interval` (up fast, down slowly:
  the account's bucket is shared by every caller). Other errors are
  logged at most once a minute per distinct message, and the loop goes on. Every call is
  counted by API and outcome (`calls`, the process's Counters.cloudmap_calls).
- Calls: per service, 6 a minute at the default 10 s (4 revisions and 2 full lookups), about
  the same as jitter leaves them on average. DiscoverInstances is throttled per account and
  Region at a refill of 1,000 a second (a bucket of 2,000), shared by every caller: if both
  APIs count against it, 10,000 service pollers fit, e.g. 2,000 tasks with 5 services each.

AWS side
- boto3 is imported only when a client is first needed, so the sidecar runs without it unless
  Cloud Map is configured. Credentials come from boto3's default chain: in ECS, the task role.
- Region: the `region` argument, else AWS_REGION, else AWS_DEFAULT_REGION (ECS sets both on
  Fargate), else the region of the task ARN (or the availability zone less its letter) in the
  ECS task metadata (ECS_CONTAINER_METADATA_URI_V4/task), else boto3's own configuration.
- DiscoverInstances goes to the `data-servicediscovery` endpoint: botocore puts the `data-` host
  prefix in front of whatever endpoint it uses, a custom `endpoint_url` included (which would
  make http://127.0.0.1:5000 into http://data-127.0.0.1:5000). With an explicit `endpoint_url`
  the client is made with Config(inject_host_prefix=False).
- NamespaceName is the namespace's HttpName, which for a private DNS namespace is normally its
  name (`local`).
- The IAM permissions needed are servicediscovery:DiscoverInstances and
  servicediscovery:DiscoverInstancesRevision.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sidecar import logs
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.registry import (
    Instance,
    Listing,
    availability_zones,
    instances_of,
    statuses,
)

log = logging.getLogger("dns_sidecar")

DEFAULT_INTERVAL = 10.0
DEFAULT_FORGET_AFTER = 300.0
HEALTH_EVERY = 3  # lookups between two full ones of a service whose revision stood still
JITTER = 0.2  # each round's wait is the interval times 1 +- this
MAX_BACKOFF = 300.0
ERROR_LOG_EVERY = 60.0  # seconds between two logs of the same error message
NOT_FOUND_HOLD = 60.0  # a service Cloud Map does not know is not taken back for this long
MAX_SERVICES = 256
MAX_RESULTS = 1000  # DiscoverInstances' maximum; the default is 100
THROTTLING_CODES = frozenset(
    {"ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)
NOT_FOUND_CODES = frozenset({"ServiceNotFound"})
METADATA_TIMEOUT = 2.0
# A listing Cloud Map confirmed within this many intervals is believed over DNS (registry.py);
# older (Cloud Map failing or throttling us), DNS answers stand as they come.
FRESH_ROUNDS = 3
DISCOVER = "DiscoverInstances"
REVISION = "DiscoverInstancesRevision"
OUTCOMES = ("ok", "throttled", "not_found", "error")


class DiscoveryClient(Protocol):
    """The part of a boto3 servicediscovery client used here (tests inject fakes)."""

    def discover_instances(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def discover_instances_revision(self, **kwargs: Any) -> Mapping[str, Any]: ...


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError (duck-typed: botocore is not imported)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping):
            code = error.get("Code")
            return str(code) if code is not None else None
    return None


def region_from_task_metadata(metadata: Mapping[str, Any]) -> str | None:
    """The region of an ECS task, from its v4 task metadata: the TaskARN's region field, else
    the AvailabilityZone less its letter (us-east-1a, and us-west-2-lax-1a, give the parent)."""
    arn = metadata.get("TaskARN")
    if isinstance(arn, str):
        parts = arn.split(":")
        if len(parts) > 3 and parts[0] == "arn" and parts[3]:
            return parts[3]
    zone = metadata.get("AvailabilityZone")
    if isinstance(zone, str):
        match = re.match(r"[a-z]{2}(?:-[a-z]+)+-\d+", zone)
        if match:
            return match.group(0)
    return None


def task_metadata(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The ECS task metadata (v4, `/task`) of the task we run in; None outside ECS or when it
    cannot be read (logged). Blocking: call it in a worker thread."""
    env = os.environ if env is None else env
    base = env.get("ECS_CONTAINER_METADATA_URI_V4")
    if not base:
        return None
    import json  # lazy: only Cloud Map needs them, once
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # link-local: no proxy
    try:
        with opener.open(base.rstrip("/") + "/task", timeout=METADATA_TIMEOUT) as response:
            metadata = json.loads(response.read())
    except (OSError, ValueError) as exc:
        log.warning(
            "cloudmap: the ECS task metadata could not be read",
            extra={"fields": {"error": str(exc)}},
        )
        return None
    return metadata if isinstance(metadata, dict) else None


def local_zone(metadata: Mapping[str, Any] | None) -> str | None:
    """The task's availability zone, from its task metadata."""
    zone = None if metadata is None else metadata.get("AvailabilityZone")
    return zone if isinstance(zone, str) and zone else None


def resolve_region(explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The region to use (see the module docstring); None leaves it to boto3's configuration.
    Reads the ECS task metadata over HTTP only when nothing else says."""
    env = os.environ if env is None else env
    for region in (explicit, env.get("AWS_REGION"), env.get("AWS_DEFAULT_REGION")):
        if region:
            return region
    metadata = task_metadata(env)
    return None if metadata is None else region_from_task_metadata(metadata)


class CloudMapSource:
    """The Cloud Map services of one discovery zone and their last known instance health.

    `discover` is blocking and thread-safe (it runs in a worker thread); everything else is
    meant to be called from the event loop's thread."""

    def __init__(
        self,
        zone: str,
        namespace: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: DiscoveryClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.zone = zone
        self.namespace = namespace
        self.endpoint_url = endpoint_url
        self.region = region
        self.clock = clock
        self._client = client
        self._client_lock = threading.Lock()
        self._services: dict[str, str] = {}  # lowercased -> the name as first asked
        self._asked_at: dict[str, float] = {}  # lowercased -> when a lookup last asked for it
        self.revisions: dict[str, int] = {}  # service -> InstancesRevision of its last lookup
        self.rounds: dict[str, int] = {}  # service -> lookups since its last full lookup
        # lowercased -> when its next lookup is due. Each service keeps its own schedule: the
        # first lookup at a random moment within `first_spread` seconds of the first ask (so a
        # fleet started together does not call all at once; answers follow DNS meanwhile),
        # then one jittered wait after each lookup, so a first lookup is never followed by a
        # round that happens to come moments later.
        self._due_at: dict[str, float] = {}
        self.first_spread = 0.0  # set by run_cloudmap: the interval
        self.rng = random.Random()
        self._not_found: dict[str, float] = {}  # lowercased -> when it may be taken back
        self.listings: dict[str, Listing] = {}  # service -> its instances, last confirmed
        self.wake: asyncio.Event | None = None  # set by run_cloudmap while it runs
        self.fresh_for = FRESH_ROUNDS * DEFAULT_INTERVAL  # set by run_cloudmap
        # (zone, api, outcome) -> calls made; the process's Counters.cloudmap_calls when served
        self.calls: dict[tuple[str, str, str], int] = {}
        # Told (zone, service) when a service's instances change: the answers made from them
        # are made again (the pipeline's Resolver.registry_changed).
        self.on_change: Callable[[str, str], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<CloudMapSource zone={self.zone} namespace={self.namespace} "
            f"services={len(self._services)}>"
        )

    # --- the services asked for ---------------------------------------------------------------

    def add_service(self, name: str) -> bool:
        """Record a service that has been asked for; True when it is new (then looked up soon)."""
        key = name.strip().rstrip(".").lower()
        if not key:
            return False
        if key in self._services:
            self._asked_at[key] = self.clock()
            return False
        hold = self._not_found.get(key)
        if hold is not None:
            if self.clock() < hold:
                return False
            del self._not_found[key]
        if len(self._services) >= MAX_SERVICES:
            return False
        self._services[key] = name.strip().rstrip(".")
        self._asked_at[key] = self.clock()
        self._due_at[key] = self.clock() + self.rng.uniform(0, self.first_spread)
        if self.wake is not None:
            self.wake.set()
        return True

    def services(self) -> list[str]:
        return list(self._services.values())

    def due(self) -> list[str]:
        """The services whose lookup is due now."""
        now = self.clock()
        return [name for key, name in self._services.items() if self._due_at[key] <= now]

    def next_due(self) -> float | None:
        """When the next lookup is due; None without services."""
        return min(self._due_at.values(), default=None)

    def schedule(self, names: list[str], wait: float) -> None:
        """The next lookup of each of `names` one jittered `wait` from now."""
        now = self.clock()
        for name in names:
            key = name.lower()
            if key in self._due_at:  # not dropped meanwhile
                self._due_at[key] = now + wait * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def postpone(self, wait: float) -> None:
        """No lookup of any service sooner than one jittered `wait` from now (throttled)."""
        now = self.clock()
        for key, due in self._due_at.items():
            self._due_at[key] = max(due, now + wait * self.rng.uniform(1 - JITTER, 1 + JITTER))

    def forget_unasked(self, forget_after: float) -> list[str]:
        """Stop polling the services no lookup asked for within `forget_after` seconds."""
        limit = self.clock() - forget_after
        gone = [name for key, name in self._services.items() if self._asked_at[key] < limit]
        for name in gone:
            self._forget(name)
        return gone

    def _forget(self, name: str) -> None:
        key = name.lower()
        self._services.pop(key, None)
        self._asked_at.pop(key, None)
        self._due_at.pop(key, None)
        self.listings.pop(name, None)
        self.revisions.pop(name, None)
        self.rounds.pop(name, None)

    def drop_service(self, name: str) -> None:
        """Forget a service Cloud Map does not know; it is not taken back for a while."""
        self._forget(name)
        key = name.lower()
        self._not_found[key] = self.clock() + NOT_FOUND_HOLD
        if len(self._not_found) > 4 * MAX_SERVICES:  # bounded: drop the expired holds
            now = self.clock()
            self._not_found = {k: t for k, t in self._not_found.items() if t > now}

    def zone_statuses(self) -> dict[str, str]:
        """Every service's last known statuses, merged (UNHEALTHY wins)."""
        return statuses(i for listing in self.listings.values() for i in listing.instances)

    def zone_azs(self) -> dict[str, str]:
        """Every listed address's availability zone."""
        return availability_zones(
            i for listing in self.listings.values() for i in listing.instances
        )

    def listing(self, service: str, now: float) -> Listing | None:
        """The service's instances if Cloud Map confirmed them within `fresh_for` seconds
        (`service` as asked: the label below the zone, any case); else None."""
        name = self._services.get(service.lower())
        listing = None if name is None else self.listings.get(name)
        if listing is None or now - listing.confirmed_at > self.fresh_for:
            return None
        return listing

    def listed(self, service: str, instances: tuple[Instance, ...]) -> bool:
        """Cloud Map listed these instances now; True when they differ from the last ones."""
        before = self.listings.get(service)
        self.listings[service] = Listing(instances, self.clock())
        return before is None or before.instances != instances

    def confirmed(self, service: str) -> None:
        """The revision did not move: the last listing is current."""
        before = self.listings.get(service)
        if before is not None:
            self.listings[service] = Listing(before.instances, self.clock())

    def count(self, api: str, outcome: str) -> None:
        key = (self.zone, api, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1

    def ages(self, now: float) -> list[tuple[str, float]]:
        """(service, seconds since Cloud Map last confirmed its instances) of every service
        looked up at least once."""
        return [(service, now - listing.confirmed_at) for service, listing in self.listings.items()]

    # --- AWS ----------------------------------------------------------------------------------

    def client(self) -> DiscoveryClient:
        """The servicediscovery client, made once on first use (imports boto3)."""
        with self._client_lock:
            if self._client is None:
                import boto3  # only when Cloud Map is configured
                from botocore.config import Config

                options: dict[str, Any] = {
                    "connect_timeout": 3,
                    "read_timeout": 5,
                    # one retry at most (botocore: max_attempts counts retries only): a
                    # throttled call must not become three requests to a shared bucket
                    "retries": {"mode": "standard", "total_max_attempts": 2},
                }
                if self.endpoint_url is not None:
                    options["inject_host_prefix"] = False
                session = boto3.session.Session()
                self._client = session.client(
                    "servicediscovery",
                    region_name=resolve_region(self.region),
                    endpoint_url=self.endpoint_url,
                    config=Config(**options),
                )
            return self._client

    def discover(self, service: str) -> tuple[Instance, ...]:
        """The service's instances (blocking); notes their revision."""
        response = self.client().discover_instances(
            NamespaceName=self.namespace,
            ServiceName=service,
            HealthStatus="ALL",
            MaxResults=MAX_RESULTS,
        )
        revision = response.get("InstancesRevision")
        if isinstance(revision, int):
            self.revisions[service] = revision
        return instances_of(response.get("Instances") or [])

    def revision_moved(self, service: str) -> bool:
        """Whether the service's instances changed since its last full lookup (blocking)."""
        response = self.client().discover_instances_revision(
            NamespaceName=self.namespace, ServiceName=service
        )
        return response.get("InstancesRevision") != self.revisions.get(service)

    def full_lookup_due(self, service: str) -> bool:
        """Whether this round must call DiscoverInstances without asking the revision first:
        never looked up, no revision known, or HEALTH_EVERY lookups since the last one."""
        return (
            service not in self.listings
            or service not in self.revisions
            or (self.rounds.get(service, 0) + 1 >= HEALTH_EVERY)
        )


class _ErrorLog:
    """Logs a warning at most once per `every` seconds for each distinct message."""

    def __init__(self, clock: Callable[[], float], every: float = ERROR_LOG_EVERY) -> None:
        self.clock = clock
        self.every = every
        self.last: dict[str, float] = {}

    def warning(self, msg: str, key: str, fields: dict[str, object]) -> None:
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.every:
            return
        if len(self.last) > 1000:
            self.last = {k: t for k, t in self.last.items() if now - t < self.every}
        self.last[key] = now
        log.warning(msg, extra={"fields": fields})


async def _refresh(
    source: CloudMapSource, table: EndpointTable, services: list[str], errors: _ErrorLog
) -> bool:
    """Look up `services`, apply the zone's statuses and tell who made answers from a listing
    that changed; True when Cloud Map throttled us."""
    throttled = False
    changed = []
    for service in services:
        api = REVISION
        try:
            if not source.full_lookup_due(service):
                moved = await asyncio.to_thread(source.revision_moved, service)
                source.count(REVISION, "ok")
                if not moved:
                    source.confirmed(service)
                    source.rounds[service] = source.rounds.get(service, 0) + 1
                    continue
            api = DISCOVER
            instances = await asyncio.to_thread(source.discover, service)
            source.count(DISCOVER, "ok")
            source.rounds[service] = 0
        except Exception as exc:
            code = error_code(exc)
            fields: dict[str, object] = {
                "zone": source.zone,
                "namespace": source.namespace,
                "service": service,
                "api": api,
                "error": str(exc),
                "error_code": code or type(exc).__name__,
            }
            if code in THROTTLING_CODES:
                source.count(api, "throttled")
                throttled = True
                errors.warning("cloudmap throttled", "throttled", fields)
                break  # the rest of the round waits too
            if code in NOT_FOUND_CODES:
                source.count(api, "not_found")
                source.drop_service(service)
                log.debug("cloudmap service not found", extra={"fields": fields})
                continue
            source.count(api, "error")
            errors.warning("cloudmap refresh failed", str(exc), fields)
            continue
        if source.listed(service, instances):
            changed.append(service)
    now = source.clock()
    for endpoint in table.set_cloudmap(source.zone, source.zone_statuses(), source.zone_azs()):
        logs.endpoint_changed(
            endpoint.zone,
            endpoint.name,
            endpoint.health_name,
            now,
            source="cloudmap",
            cloudmap=endpoint.cloudmap,
        )
    logs.endpoint_summaries(now)
    if source.on_change is not None:
        for service in changed:
            source.on_change(source.zone, service)
    return throttled


async def learn_local_az(table: EndpointTable) -> None:
    """Zone affinity: the task's availability zone from the ECS task metadata, once."""
    az = local_zone(await asyncio.to_thread(task_metadata))
    table.set_local_az(az)
    log.info("zone affinity", extra={"fields": {"local_az": az}})


async def run_cloudmap(
    source: CloudMapSource,
    table: EndpointTable,
    *,
    interval: float = DEFAULT_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    max_backoff: float = MAX_BACKOFF,
    forget_after: float = DEFAULT_FORGET_AFTER,
    rng: random.Random | None = None,
) -> None:
    """Forever: refresh the listing of each service asked for every `interval` seconds on
    its own jittered schedule (the first lookup at a random moment within one interval of the
    first ask), backing off on throttling; services not asked for within `forget_after`
    seconds are dropped. With no service, it waits with no timer."""
    if interval <= 0:
        raise ValueError("the Cloud Map refresh interval must be positive")
    rng = rng or random.Random()
    errors = _ErrorLog(clock)
    source.fresh_for = FRESH_ROUNDS * interval
    source.first_spread, source.rng = interval, rng
    wake = source.wake = asyncio.Event()
    wait = interval
    relieved_at = clock()
    try:
        while True:
            source.forget_unasked(forget_after)
            batch = source.due()
            if batch:
                if await _refresh(source, table, batch, errors):
                    wait = min(wait * 2, max_backoff)
                    relieved_at = clock()
                    source.postpone(wait)  # every service waits, not only this batch's
                elif wait > interval and clock() - relieved_at >= wait * (1 - JITTER):
                    wait = max(interval, wait / 2)  # up fast, down slowly: once per wait
                    relieved_at = clock()
                source.schedule(batch, wait)
            wake.clear()
            due = source.next_due()
            if due is None:
                await wake.wait()  # no service asked for: no timer
                continue
            timeout = due - clock()
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        await wake.wait()
                except TimeoutError:
                    pass
    finally:
        source.wake = None
