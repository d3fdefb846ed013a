"""The Cloud Map registry through the sidecar, seen by a glibc client: run inside a fresh
network and mount namespace by tests/integration/test_registry.py (never on its own):

    unshare --net --mount --propagation private -- \
        python -m tests.fakes.registry_lab SCENARIO WORKDIR

Everything is on the namespace's own loopback, where nothing can leave: moto in server mode
(127.0.0.1:5000) with namespace `local` and service `resource-server`; a scripted upstream
(127.0.0.1:5300) that answers for the zone; backends on 127.0.6.N (health checks at port 8080,
the application's connections at port 9000, counted on the client side); the sidecar on
127.0.0.1:53, which WORKDIR/resolv.conf (bind-mounted over /etc/resolv.conf in this mount
namespace only) names; for `azs`, a fake ECS task metadata endpoint. The client loop calls
glibc's getaddrinfo for resource-server.local and connects to the first address, as an
application does. Prints one JSON object with what it saw; the test makes the assertions.

Scenarios:
- all12 [--no-cloudmap]: 12 registered backends, the upstream a random 8 of the 12 (TTL 60);
- deregister: 4 backends, DNS lists all 4 throughout; one is deregistered in Cloud Map, then
  a fifth registered (DNS never lists it);
- nxdomain: 3 backends; the upstream answers NXDOMAIN for 30 s in the middle of the loop;
- azs: 6 backends, 2 in each of us-east-1a/b/c; the task is in us-east-1a, where one
  backend is dead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import dns.exception
import dns.message
import dns.query

from tests.fakes.backends import BackendPool
from tests.fakes.moto_server import admin_client, running_moto
from tests.fakes.scripted_upstream import Answer, NxDomain, RandomSubset, ScriptedUpstream

NAME = "resource-server.local"
SERVICE = "resource-server"
MOTO = "http://127.0.0.1:5000"
UPSTREAM_PORT = 5300
METADATA_PORT = 5100
HEALTH_PORT = 8080
APP_PORT = 9000
REGION = "us-east-1"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def address(i: int) -> str:
    return f"127.0.6.{i}"


# --- the parts ---------------------------------------------------------------------------------


class Registry:
    """Namespace `local`, service `resource-server`, in moto."""

    def __init__(self) -> None:
        self.client: Any = admin_client(MOTO, REGION)
        self.client.create_private_dns_namespace(Name="local", Vpc="vpc-0123456789abcdef0")
        (namespace,) = self.client.list_namespaces()["Namespaces"]
        self.service_id = self.client.create_service(
            Name=SERVICE,
            NamespaceId=namespace["Id"],
            DnsConfig={"DnsRecords": [{"Type": "A", "TTL": 5}], "RoutingPolicy": "MULTIVALUE"},
        )["Service"]["Id"]

    def register(self, instance_id: str, ip: str, az: str | None = None) -> None:
        attributes = {"AWS_INSTANCE_IPV4": ip, "AWS_INSTANCE_PORT": str(APP_PORT)}
        if az is not None:
            attributes["AVAILABILITY_ZONE"] = az
        self.client.register_instance(
            ServiceId=self.service_id, InstanceId=instance_id, Attributes=attributes
        )

    def deregister(self, instance_id: str) -> None:
        self.client.deregister_instance(ServiceId=self.service_id, InstanceId=instance_id)


def serve_metadata(az: str) -> ThreadingHTTPServer:
    """ECS task metadata v4: GET /v4/task-1/task says the task's availability zone."""
    body = json.dumps(
        {
            "TaskARN": f"arn:aws:ecs:{REGION}:123456789012:task/lab/0123456789abcdef",
            "AvailabilityZone": az,
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/v4/task-1/task"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", METADATA_PORT), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    return server


SIDECARS: list[subprocess.Popen[bytes]] = []


def start_sidecar(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    log = (workdir / "sidecar.log").open("wb")
    environment = {
        **os.environ,
        "AWS_ENDPOINT_URL_SERVICEDISCOVERY": MOTO,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        **(env or {}),
    }
    upstream = f"127.0.0.1:{UPSTREAM_PORT}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--listen", "127.0.0.1:53", "--upstream", upstream,
         "--zone", f"local={upstream}", "--metrics-listen", "127.0.0.1:9153",
         "--health-check", f"local=tcp:{HEALTH_PORT}", "--endpoint-probe-interval", "0.5",
         "--log-format", "text", "--drain-seconds", "0", *args],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
    )  # fmt: skip
    SIDECARS.append(proc)
    deadline = time.monotonic() + 20
    query = dns.message.make_query("local.", "SOA")
    while True:
        try:
            dns.query.udp(query, "127.0.0.1", port=53, timeout=0.5)
            return proc
        except (OSError, dns.exception.Timeout):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not start") from None


def metric(name: str) -> dict[str, float]:
    """The samples of one metric family of the sidecar, by their label text."""
    with NO_PROXY.open("http://127.0.0.1:9153/metrics", timeout=2.0) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


# --- the client --------------------------------------------------------------------------------


class Client:
    """An application: getaddrinfo, then a connection to the first address."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.calls = 0
        self.failures: list[tuple[float, str]] = []  # (seconds into the loop, why)
        self.connects: list[tuple[float, str]] = []  # (seconds into the loop, address)

    def once(self) -> None:
        self.calls += 1
        at = time.monotonic() - self.start
        try:
            infos = socket.getaddrinfo(NAME, APP_PORT, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            self.failures.append((at, f"getaddrinfo: {exc}"))
            return
        first = str(infos[0][4][0])
        try:
            with socket.create_connection((first, APP_PORT), timeout=1.0):
                pass
        except OSError as exc:
            self.failures.append((at, f"connect {first}: {exc}"))
            return
        self.connects.append((at, first))

    def run(
        self, seconds: float, pause: float = 0.01, during: Callable[[float], None] | None = None
    ) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.once()
            if during is not None:
                during(time.monotonic() - self.start)
            time.sleep(pause)

    def shares(self, since: float = 0.0) -> dict[str, int]:
        return dict(Counter(a for at, a in self.connects if at >= since))


# --- the scenarios -------------------------------------------------------------------------------


def all12(workdir: Path, registry: Registry, upstream: ScriptedUpstream, cloudmap: bool) -> Any:
    addresses = [address(i) for i in range(1, 13)]
    upstream.set(NAME, RandomSubset(tuple(f"A {a}" for a in addresses), count=8, ttl=60))
    for i, ip in enumerate(addresses, 1):
        registry.register(f"task-{i:02d}", ip)
    args = ["--cloudmap", "local=local", "--cloudmap-interval", "1"] if cloudmap else []
    start_sidecar(workdir, *args)
    client = Client()
    client.run(3.0)  # first answers, first Cloud Map look, first probes
    warm = len(client.connects)
    client.run(6.0)
    answer = dns.query.udp(dns.message.make_query(NAME, "A"), "127.0.0.1", port=53, timeout=1)
    return {
        "warm_up_connects": warm,
        "shares": client.shares(since=3.0),
        "failures": client.failures,
        "answer_size": sum(len(rrset) for rrset in answer.answer),
        "registry_answers": metric("dns_sidecar_registry_answers_total"),
        "upstream_queries": upstream.count(NAME),
    }


def deregister(workdir: Path, registry: Registry, upstream: ScriptedUpstream) -> Any:
    addresses = [address(i) for i in range(1, 5)]
    upstream.set(NAME, Answer(tuple(f"A {a}" for a in addresses), ttl=60))  # DNS keeps all 4
    for i, ip in enumerate(addresses, 1):
        registry.register(f"task-{i}", ip)
    interval = 2.0
    start_sidecar(workdir, "--cloudmap", "local=local", "--cloudmap-interval", str(interval))
    client = Client()
    client.run(4.0)
    before = client.shares()
    registry.deregister("task-1")
    gone_at = time.monotonic() - client.start
    client.run(5.0)
    last = max((at for at, a in client.connects if a == address(1)), default=None)
    registry.register("task-5", address(5))  # a task the registry knows before DNS does
    new_at = time.monotonic() - client.start
    client.run(5.0)
    first = min((at for at, a in client.connects if a == address(5)), default=None)
    return {
        "registered_at": new_at,
        "first_connect_to_new": first,
        "interval": interval,
        "before": before,
        "deregistered_at": gone_at,
        "last_connect_to_it": last,
        "after_shares": dict(
            Counter(a for at, a in client.connects if gone_at + interval * 1.2 <= at < new_at)
        ),
        "failures": client.failures,
        "calls": metric("dns_sidecar_cloudmap_calls_total"),
    }


def nxdomain(workdir: Path, registry: Registry, upstream: ScriptedUpstream) -> Any:
    addresses = [address(i) for i in range(1, 4)]
    upstream.set(NAME, Answer(tuple(f"A {a}" for a in addresses), ttl=2))
    for i, ip in enumerate(addresses, 1):
        registry.register(f"task-{i}", ip)
    start_sidecar(workdir, "--cloudmap", "local=local", "--cloudmap-interval", "1")
    client = Client()
    client.run(3.0)
    upstream.set(NAME, NxDomain(soa_ttl=300, minimum=300))  # as the VPC resolver keeps it
    started = time.monotonic() - client.start
    client.run(30.0, pause=0.02)
    upstream.set(NAME, Answer(tuple(f"A {a}" for a in addresses), ttl=2))
    ended = time.monotonic() - client.start
    client.run(2.0)
    during = [c for c in client.connects if started <= c[0] <= ended]
    return {
        "nxdomain_from": started,
        "nxdomain_until": ended,
        "calls": client.calls,
        "connects_during": len(during),
        "failures": client.failures,
        "shares_during": dict(Counter(a for _, a in during)),
        "upstream_nxdomains": upstream.count(NAME),
        "registry_answers": metric("dns_sidecar_registry_answers_total"),
    }


def azs(workdir: Path, registry: Registry, upstream: ScriptedUpstream) -> Any:
    zone_of = {address(i): f"us-east-1{'aabbcc'[i - 1]}" for i in range(1, 7)}
    dead = address(1)  # in us-east-1a, the task's own AZ
    upstream.set(NAME, Answer(tuple(f"A {a}" for a in zone_of), ttl=60))
    for i, (ip, az) in enumerate(zone_of.items(), 1):
        registry.register(f"task-{i}", ip, az)
    serve_metadata("us-east-1a")
    metadata = f"http://127.0.0.1:{METADATA_PORT}/v4/task-1"
    start_sidecar(
        workdir,
        "--cloudmap", "local=local", "--cloudmap-interval", "1",
        env={"ECS_CONTAINER_METADATA_URI_V4": metadata},
    )  # fmt: skip
    client = Client()
    client.run(3.0)  # the first answers come before any probe: the dead one may be in them
    client.run(8.0)
    shares = client.shares(since=3.0)
    total = sum(shares.values())
    by_az: Counter[str] = Counter()
    for ip, count in shares.items():
        by_az[zone_of[ip]] += count
    return {
        "dead": dead,
        "shares": shares,
        "by_az": {az: round(count / total, 3) for az, count in sorted(by_az.items())},
        "connects": total,
        "failures": [f for f in client.failures if f[0] >= 3.0],
        "warm_up_failures": [f for f in client.failures if f[0] < 3.0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("all12", "deregister", "nxdomain", "azs"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--no-cloudmap", action="store_true")
    options = parser.parse_args()
    workdir: Path = options.workdir
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    os.environ.pop("ECS_CONTAINER_METADATA_URI_V4", None)
    try:
        with (
            running_moto("127.0.0.1", 5000, workdir / "moto.log"),
            BackendPool() as pool,
            ScriptedUpstream(port=UPSTREAM_PORT) as upstream,
        ):
            for i in range(1, 13):
                if options.scenario == "azs" and i == 1:
                    continue  # the dead backend: nothing listens, connections are refused
                pool.start(address(i), HEALTH_PORT)
                pool.start(address(i), APP_PORT)
            registry = Registry()
            if options.scenario == "all12":
                result = all12(workdir, registry, upstream, not options.no_cloudmap)
            elif options.scenario == "deregister":
                result = deregister(workdir, registry, upstream)
            elif options.scenario == "nxdomain":
                result = nxdomain(workdir, registry, upstream)
            else:
                result = azs(workdir, registry, upstream)
    finally:
        for proc in SIDECARS:
            proc.terminate()
            proc.wait(timeout=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
