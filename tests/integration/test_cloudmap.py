"""Cloud Map health against moto in server mode: a real HTTP endpoint on loopback.

Nothing here may leave the machine: moto listens on 127.0.0.1, every client is given that
endpoint_url and dummy credentials, and a guard makes any name lookup or connection to a
non-loopback address fail the test (a client that forgot its endpoint, or botocore's `data-`
host prefix on a custom endpoint, would otherwise look up a real name).

moto behaviour relied on (moto 5.x, servicediscovery): instances start HEALTHY;
UpdateInstanceCustomHealthStatus sets an instance's status to HEALTHY or UNHEALTHY and
DiscoverInstances(HealthStatus=ALL) reports it in each instance's HealthStatus, with the
Attributes as registered; an unknown service gives ServiceNotFound. The server tells services
apart by the credential scope of the signature, so requests to http://127.0.0.1:PORT work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.discovery.cloudmap import (
    HEALTH_EVERY,
    CloudMapSource,
    resolve_region,
    run_cloudmap,
)
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.registry import statuses
from tests.fakes.moto_server import admin_client as moto_admin_client
from tests.fakes.moto_server import running_moto
from tests.fakes.nsd import free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
SERVICE = "resource-server"
ADDRESSES = {"task-1": "127.0.5.1", "task-2": "127.0.5.2", "task-3": "127.0.5.3"}
INTERVAL = 0.5
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- no traffic off loopback ------------------------------------------------------------------


def _loopback(host: object) -> bool:
    if host is None or host == "localhost":
        return True
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails any lookup of a name, or connection to an address, that is not loopback."""
    refused: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _loopback(host):
            refused.append(f"lookup {host!r}")
            raise OSError(f"test guard: lookup of non-loopback {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and not _loopback(address[0]):
            refused.append(f"connect {address!r}")
            raise OSError(f"test guard: connection to non-loopback {address!r} refused")
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield refused
    assert refused == [], "something tried to leave loopback"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials and region; no profile, config file, proxy, container or instance
    credentials, endpoint override or ECS metadata that could send a client elsewhere."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "ECS_")) or name.lower() in {
            "http_proxy",
            "https_proxy",
            "all_proxy",
        }:
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --- moto server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`moto_server` as a subprocess on 127.0.0.1; its base URL."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    try:
        with running_moto("127.0.0.1", free_port("127.0.0.1"), log_path) as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


def admin_client(url: str) -> Any:
    assert url.startswith("http://127.0.0.1:")
    return moto_admin_client(url, REGION)


class CloudMap:
    """A fresh namespace `local` with `resource-server` (custom health checks) in moto."""

    def __init__(self, url: str) -> None:
        self.url = url
        NO_PROXY_OPENER.open(urllib.request.Request(url + "/moto-api/reset", method="POST"))
        self.client = admin_client(url)
        self.client.create_private_dns_namespace(Name="local", Vpc="vpc-0123456789abcdef0")
        (namespace,) = self.client.list_namespaces()["Namespaces"]
        self.service_id = self.client.create_service(
            Name=SERVICE,
            NamespaceId=namespace["Id"],
            DnsConfig={"DnsRecords": [{"Type": "A", "TTL": 60}], "RoutingPolicy": "MULTIVALUE"},
            HealthCheckCustomConfig={"FailureThreshold": 1},
        )["Service"]["Id"]
        for instance_id, address in ADDRESSES.items():
            self.register(instance_id, {"AWS_INSTANCE_IPV4": address})

    def register(self, instance_id: str, attributes: dict[str, str]) -> None:
        self.client.register_instance(
            ServiceId=self.service_id,
            InstanceId=instance_id,
            Attributes={**attributes, "AVAILABILITY_ZONE": "us-east-1a"},
        )

    def set_health(self, instance_id: str, status: str) -> None:
        self.client.update_instance_custom_health_status(
            ServiceId=self.service_id, InstanceId=instance_id, Status=status
        )


@pytest.fixture
def cloudmap(moto_url: str) -> CloudMap:
    return CloudMap(moto_url)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What the dns_sidecar logger emits at INFO and above (whether or not it propagates)."""
    out: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(record)

    logger = logging.getLogger("dns_sidecar")
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def fields(records: list[logging.LogRecord], msg: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in records if r.getMessage() == msg]


async def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# --- against moto -----------------------------------------------------------------------------


def test_discover_reports_cloudmap_health(cloudmap: CloudMap) -> None:
    cloudmap.set_health("task-2", "UNHEALTHY")
    cloudmap.register("task-4", {"AWS_INSTANCE_IPV6": "0:0:0:0:0:0:0:1"})  # read as ::1
    source = CloudMapSource("local", "local", endpoint_url=cloudmap.url, region=REGION)
    assert statuses(source.discover(SERVICE)) == {
        "127.0.5.1": "HEALTHY",
        "127.0.5.2": "UNHEALTHY",
        "127.0.5.3": "HEALTHY",
        "::1": "HEALTHY",
    }
    client: Any = source.client()
    assert client.meta.endpoint_url == cloudmap.url
    assert client.meta.config.inject_host_prefix is False  # else: data-127.0.0.1
    assert source.client() is client  # made once
    cloudmap.set_health("task-2", "HEALTHY")
    cloudmap.set_health("task-3", "UNHEALTHY")
    assert statuses(source.discover(SERVICE))["127.0.5.2"] == "HEALTHY"
    assert statuses(source.discover(SERVICE))["127.0.5.3"] == "UNHEALTHY"


def test_run_cloudmap_applies_health_within_one_refresh(
    cloudmap: CloudMap, records: list[logging.LogRecord]
) -> None:
    table = EndpointTable()
    source = CloudMapSource("local", "local", endpoint_url=cloudmap.url, region=REGION)

    def health(address: str) -> bool | None:
        endpoint = table.get("local", address)
        assert endpoint is not None
        return endpoint.healthy

    async def scenario() -> None:
        await asyncio.to_thread(cloudmap.set_health, "task-2", "UNHEALTHY")
        table.seen("local", ["127.0.5.1", "127.0.5.2"], time.monotonic())
        task = asyncio.create_task(run_cloudmap(source, table, interval=INTERVAL))
        try:
            await asyncio.sleep(0.05)
            assert source.add_service(SERVICE)  # as the pipeline does on a lookup
            await until(lambda: health("127.0.5.2") is False, INTERVAL + 1.0)
            assert health("127.0.5.1") is True  # Cloud Map's HEALTHY, no probe yet
            # An endpoint first seen after the refresh starts with Cloud Map's word.
            table.seen("local", ["127.0.5.3"], time.monotonic())
            assert health("127.0.5.3") is True

            # A task Cloud Map marks UNHEALTHY is unhealthy within HEALTH_EVERY refresh
            # periods (a health change does not move the revision; jitter +-20%).
            await asyncio.to_thread(cloudmap.set_health, "task-1", "UNHEALTHY")
            within = HEALTH_EVERY * INTERVAL * 1.2 + 0.4
            took = await until(lambda: health("127.0.5.1") is False, within + 1.0)
            assert took <= within
            await asyncio.to_thread(cloudmap.set_health, "task-2", "HEALTHY")
            await until(lambda: health("127.0.5.2") is True, within + 1.0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    changes = fields(records, "endpoint health changed")
    assert all(c["zone"] == "local" and c["source"] == "cloudmap" for c in changes)
    assert [(c["address"], c["health"]) for c in changes] == [
        ("127.0.5.1", "healthy"),  # from unknown: nothing probed it yet
        ("127.0.5.2", "unhealthy"),
        ("127.0.5.1", "unhealthy"),
        ("127.0.5.2", "healthy"),
    ]  # 127.0.5.3 was born knowing: no transition
    assert fields(records, "cloudmap refresh failed") == []


class CountingClient:
    """The real boto3 client (to moto), with its calls counted by API."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def discover_instances(self, **kwargs: Any) -> Any:
        self.calls.append("full")
        return self.client.discover_instances(**kwargs)

    def discover_instances_revision(self, **kwargs: Any) -> Any:
        self.calls.append("revision")
        return self.client.discover_instances_revision(**kwargs)


def test_the_revision_is_asked_first_and_a_change_of_instances_is_looked_up_at_once(
    cloudmap: CloudMap,
) -> None:
    table = EndpointTable()
    real = CloudMapSource("local", "local", endpoint_url=cloudmap.url, region=REGION).client()
    counting = CountingClient(real)
    source = CloudMapSource("local", "local", client=counting)

    async def scenario() -> None:
        task = asyncio.create_task(run_cloudmap(source, table, interval=0.2))
        try:
            source.add_service(SERVICE)
            await asyncio.sleep(2.0)  # ~10 rounds
            before = list(counting.calls)
            await asyncio.to_thread(cloudmap.register, "task-9", {"AWS_INSTANCE_IPV4": "127.0.5.9"})
            await until(lambda: "127.0.5.9" in source.zone_statuses(), 0.5)
            counting.calls.append("registered")
            assert before[0] == "full"  # the first lookup
            rounds = before[1:]
            # Between full lookups (every HEALTH_EVERY-th round), revisions only.
            assert rounds.count("full") <= len(rounds) // HEALTH_EVERY + 1, rounds
            assert rounds.count("revision") >= len(rounds) // 2, rounds
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_unknown_services_are_dropped_and_held(cloudmap: CloudMap) -> None:
    table = EndpointTable()
    source = CloudMapSource("local", "local", endpoint_url=cloudmap.url, region=REGION)

    async def scenario() -> None:
        task = asyncio.create_task(run_cloudmap(source, table, interval=INTERVAL))
        try:
            source.add_service("no-such-service")
            source.add_service(SERVICE)
            await until(lambda: SERVICE in source.listings, 2.0)
            assert source.services() == [SERVICE]
            assert not source.add_service("no-such-service")  # not taken back at once
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert list(source.listings) == [SERVICE]
    assert source.zone_statuses() == dict.fromkeys(ADDRESSES.values(), "HEALTHY")


# --- scripted fakes: throttling and errors ----------------------------------------------------


class ScriptedClient:
    """A stand-in for the boto3 client: raises or answers as scripted, and notes call times."""

    def __init__(self, script: list[Exception | dict[str, Any]], then: Exception | None = None):
        self.script = script
        self.then = then
        self.calls: list[float] = []
        self.revisions = 0

    def discover_instances_revision(self, **kwargs: Any) -> dict[str, Any]:
        """A revision that always moved: every round goes on to the scripted lookup."""
        self.revisions += 1
        return {"InstancesRevision": -self.revisions}

    def discover_instances(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["NamespaceName"] == "local" and kwargs["HealthStatus"] == "ALL"
        self.calls.append(time.monotonic())
        step = self.script.pop(0) if self.script else self.then
        if isinstance(step, Exception):
            raise step
        return step or {"Instances": []}


def client_error(code: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    error: Exception = ClientError(
        {"Error": {"Code": code, "Message": message}}, "DiscoverInstances"
    )
    return error


def answer(status: str) -> dict[str, Any]:
    return {
        "Instances": [
            {
                "InstanceId": "t",
                "HealthStatus": status,
                "Attributes": {"AWS_INSTANCE_IPV4": "10.1.0.1"},
            }
        ]
    }


def run_for(
    source: CloudMapSource,
    table: EndpointTable,
    seconds: float,
    interval: float,
    max_backoff: float = 300.0,
) -> None:
    async def scenario() -> None:
        source.add_service(SERVICE)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await run_cloudmap(source, table, interval=interval, max_backoff=max_backoff)

    asyncio.run(scenario())


def test_throttling_doubles_the_wait_up_to_the_cap_then_halves_it_back_to_interval(
    records: list[logging.LogRecord],
) -> None:
    fake = ScriptedClient(
        [
            client_error("ThrottlingException", "Rate exceeded"),
            client_error("RequestLimitExceeded", "Rate exceeded"),
            client_error("TooManyRequestsException", "Rate exceeded"),
            answer("UNHEALTHY"),
        ],
        then=None,
    )
    table = EndpointTable()
    table.seen("local", ["10.1.0.1"], 0.0)
    source = CloudMapSource("local", "local", client=fake)
    run_for(source, table, 1.5, interval=0.1, max_backoff=0.4)
    gaps = [b - a for a, b in zip(fake.calls, fake.calls[1:], strict=False)]
    assert len(gaps) >= 5, gaps
    # Each wait +-20% (jitter), the rest being the calls' own time.
    assert 0.15 <= gaps[0] < 0.35  # 2 x interval
    assert 0.31 <= gaps[1] < 0.6  # 4 x interval = the cap
    assert 0.31 <= gaps[2] < 0.6  # capped
    assert 0.15 <= gaps[3] < 0.35  # a success: halved, down slowly
    assert 0.07 <= gaps[4] < 0.2  # halved again: the interval
    endpoint = table.get("local", "10.1.0.1")
    assert endpoint is not None and endpoint.cloudmap == "UNHEALTHY"
    assert len(fields(records, "cloudmap throttled")) == 1  # once a minute


def test_other_errors_are_logged_once_per_message_and_the_loop_goes_on(
    records: list[logging.LogRecord],
) -> None:
    boom = client_error("InternalServerError", "boom")
    fake = ScriptedClient([boom, boom, boom, ConnectionError("reset"), answer("HEALTHY")], boom)
    table = EndpointTable()
    table.seen("local", ["10.1.0.1"], 0.0)
    source = CloudMapSource("local", "local", client=fake)
    run_for(source, table, 1.0, interval=0.05)
    assert len(fake.calls) >= 10  # no backoff for these
    failures = fields(records, "cloudmap refresh failed")
    assert [f["error_code"] for f in failures] == ["InternalServerError", "ConnectionError"]
    assert failures[0]["zone"] == "local" and failures[0]["service"] == SERVICE
    endpoint = table.get("local", "10.1.0.1")
    assert endpoint is not None and endpoint.cloudmap == "HEALTHY"  # kept after later errors
    assert fields(records, "cloudmap throttled") == []


# --- region from the ECS task metadata ---------------------------------------------------------


def test_region_from_the_ecs_task_metadata_endpoint() -> None:
    """Like ECS_CONTAINER_METADATA_URI_V4, served on loopback: GET <uri>/task."""
    import http.server
    import json
    import threading

    body = json.dumps(
        {
            "TaskARN": "arn:aws:ecs:eu-west-3:111122223333:task/default/0123456789abcdef",
            "AvailabilityZone": "eu-west-3c",
        }
    ).encode()
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(200 if self.path == "/v4/abc-123/task" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/v4/abc-123"
        assert resolve_region(None, {"ECS_CONTAINER_METADATA_URI_V4": uri}) == "eu-west-3"
        assert resolve_region(None, {"ECS_CONTAINER_METADATA_URI_V4": uri + "x"}) is None
        assert paths == ["/v4/abc-123/task", "/v4/abc-123x/task"]
    finally:
        server.shutdown()
        server.server_close()


# --- boto3 stays optional ---------------------------------------------------------------------


def test_importing_the_sidecar_does_not_import_boto3() -> None:
    code = (
        "import sys, sidecar.app, sidecar.pipeline, sidecar.cli, sidecar.discovery.cloudmap; "
        "loaded = [m for m in ('boto3', 'botocore') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- end to end: the sidecar process, moto server, real TCP backends, real nsd ---------------


def test_sidecar_leaves_out_what_cloudmap_calls_unhealthy(
    cloudmap: CloudMap, moto_url: str, tmp_path: Path
) -> None:
    """Probes say every endpoint is fine; Cloud Map says task-2 is not: within HEALTH_EVERY
    refresh periods (1 s here, +-20%: health does not move the revision, so it is read at the
    periodic full lookup) task-2's address is no longer handed out, and comes back after."""
    import dns.exception
    import dns.message
    import dns.query

    from tests.fakes.nsd import running_nsd

    port = free_port("127.0.5.1")
    listeners = []
    for address in ADDRESSES.values():
        sock = socket.socket()
        sock.bind((address, port))
        sock.listen(64)
        listeners.append(sock)
    zone = "$TTL 60\n@ SOA ns admin 1 3600 600 86400 30\n@ NS ns\nns A 127.0.0.1\n" + "".join(
        f"{SERVICE} A {address}\n" for address in ADDRESSES.values()
    )
    listen_port = free_port("127.0.5.9")
    env = {**os.environ, "AWS_ENDPOINT_URL_SERVICEDISCOVERY": moto_url}
    try:
        with running_nsd({"local": zone}, tmp_path / "nsd", host="127.0.5.8") as nsd:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sidecar",
                    "--listen", f"127.0.5.9:{listen_port}",
                    "--metrics-listen", f"127.0.5.9:{free_port('127.0.5.9')}",
                    "--upstream", nsd.address,
                    "--health-check", f"local=tcp:{port}",
                    "--cloudmap", "local=local",
                    "--cloudmap-interval", "1",
                    "--drain-seconds", "0",
                    "--log-format", "text",
                ],
                env=env,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            try:

                def addresses() -> set[str]:
                    query = dns.message.make_query(f"{SERVICE}.local.", "A")
                    reply = dns.query.udp(query, "127.0.5.9", port=listen_port, timeout=1.0)
                    return {item.address for rrset in reply.answer for item in rrset}

                deadline = time.monotonic() + 10
                while True:  # up, asked once (the service is now known), all healthy
                    try:
                        if addresses() == set(ADDRESSES.values()):
                            break
                    except (OSError, dns.exception.Timeout):
                        pass
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "the sidecar never answered"
                    time.sleep(0.1)
                cloudmap.set_health("task-2", "UNHEALTHY")
                marked = time.monotonic()
                limit = HEALTH_EVERY * 1.2 + 1.0  # full lookups' period plus a probe tick
                while "127.0.5.2" in addresses():
                    assert time.monotonic() - marked < limit, f"still handed out after {limit}"
                    time.sleep(0.05)
                left_out_after = time.monotonic() - marked
                assert left_out_after < limit
                assert all("127.0.5.2" not in addresses() for _ in range(50))
                cloudmap.set_health("task-2", "HEALTHY")
                marked = time.monotonic()
                while "127.0.5.2" not in addresses():
                    assert time.monotonic() - marked < limit, f"not back after {limit}"
                    time.sleep(0.05)
            finally:
                proc.terminate()
                _, stderr = proc.communicate(timeout=10)
            assert proc.returncode == 0, stderr.decode()
            assert b"source=cloudmap" in stderr
    finally:
        for sock in listeners:
            sock.close()


class PerServiceClient:
    """Answers every call at once and notes (time, service) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def discover_instances_revision(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((time.monotonic(), kwargs["ServiceName"]))
        return {"InstancesRevision": 1}

    def discover_instances(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((time.monotonic(), kwargs["ServiceName"]))
        return {"InstancesRevision": 1, **answer("HEALTHY")}


def test_each_service_is_looked_up_once_an_interval_from_a_first_lookup_spread_over_one() -> None:
    """Services asked for while the loop runs: each first lookup within one interval of the
    ask, then one jittered interval after each lookup, never a second call moments after
    the first (a fleet started together would otherwise call twice in its first interval)."""
    client = PerServiceClient()
    source = CloudMapSource("local", "local", client=client)
    table = EndpointTable()
    interval = 0.3

    async def scenario() -> None:
        task = asyncio.create_task(run_cloudmap(source, table, interval=interval))
        await asyncio.sleep(0.05)
        asked = time.monotonic()
        for i in range(20):
            source.add_service(f"s{i}")
        await asyncio.sleep(1.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        by_service: dict[str, list[float]] = {}
        for at, service in client.calls:
            by_service.setdefault(service, []).append(at)
        assert len(by_service) == 20
        firsts = sorted(times[0] - asked for times in by_service.values())
        assert firsts[-1] <= interval + 0.05  # every first lookup within one interval
        assert firsts[10] - firsts[0] > interval / 4  # spread, not all at once
        gaps = [b - a for times in by_service.values() for a, b in itertools.pairwise(times)]
        assert gaps and min(gaps) >= interval * 0.8 - 0.01, sorted(gaps)[:5]
        assert max(gaps) <= interval * 1.2 + 0.05

    asyncio.run(scenario())
