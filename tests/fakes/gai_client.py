"""A glibc client for the discovery tests, meant to run inside a network namespace.

    python -m tests.fakes.gai_client --dns 127.0.0.1:53 --name resource-server.local \
        --count 100 [--metrics 127.0.0.1:9153 [--expect ADDR ...]]

1. waits until the DNS server at --dns answers `name A` with addresses (dnspython, direct);
2. with --metrics and --expect, waits until /debug/endpoints there shows every --expect
   address probed;
3. calls socket.getaddrinfo(name, 80, AF_INET, SOCK_STREAM) --count times. glibc has no cache,
   so each call is a fresh resolution through the resolv.conf of the namespace, and glibc
   sorts the addresses (RFC 6724) before handing them back;
4. prints one JSON object: {"orders": [[addr, ...], ...], "endpoints": <debug JSON or null>,
   "queries": <how much the sidecar's dns_sidecar_requests_total grew during step 3, or null>}.

Exit code 3 with a message on stderr when a wait runs out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


class WaitExpired(Exception):
    pass


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _get(metrics: tuple[str, int], path: str) -> bytes:
    """GET over http.client (no proxy settings can send it elsewhere)."""
    conn = http.client.HTTPConnection(metrics[0], metrics[1], timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def wait_dns(server: tuple[str, int], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no reply"
    while time.monotonic() < deadline:
        query = dns.message.make_query(name, dns.rdatatype.A)
        try:
            reply = dns.query.udp(query, server[0], port=server[1], timeout=0.5)
        except (dns.exception.Timeout, OSError) as exc:
            last = repr(exc)
        else:
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                return
            last = dns.rcode.to_text(reply.rcode())
        time.sleep(0.05)
    raise WaitExpired(f"{name} A not answered by {server}: {last}")


def wait_probed(metrics: tuple[str, int], expect: list[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    table: Any = None
    while time.monotonic() < deadline:
        try:
            table = json.loads(_get(metrics, "/debug/endpoints"))
        except OSError:
            table = None
        else:
            health = {e["address"]: e["health"] for e in table["endpoints"]}
            if all(health.get(address, "unknown") != "unknown" for address in expect):
                return table
        time.sleep(0.05)
    raise WaitExpired(f"endpoints {expect} not all probed: {table}")


def requests_total(metrics: tuple[str, int]) -> float:
    """The sum of dns_sidecar_requests_total over all its label sets, from /metrics."""
    text = _get(metrics, "/metrics").decode()
    return sum(
        float(line.rsplit(None, 1)[1])
        for line in text.splitlines()
        if line.startswith(("dns_sidecar_requests_total{", "dns_sidecar_requests_total "))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dns", required=True, help="HOST:PORT of the sidecar (for the wait)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--metrics", help="HOST:PORT of the sidecar's metrics listener")
    parser.add_argument("--expect", action="append", default=[], metavar="ADDR")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    metrics = _split(args.metrics) if args.metrics else None
    table = None
    try:
        wait_dns(_split(args.dns), args.name, args.timeout)
        if metrics is not None and args.expect:
            table = wait_probed(metrics, args.expect, args.timeout)
    except WaitExpired as exc:
        print(f"gai_client: {exc}", file=sys.stderr)
        return 3
    before = requests_total(metrics) if metrics is not None else 0.0
    orders = []
    for _ in range(args.count):
        infos = socket.getaddrinfo(args.name, 80, socket.AF_INET, socket.SOCK_STREAM)
        orders.append([str(info[4][0]) for info in infos])
    queries = None
    if metrics is not None:
        # A reader thread counts a reply it answered from a row a moment after sending it
        # (FastPath.hand_off, drained at the scrape): a scrape made as the last answer lands
        # can miss it (99 of 100 once in CI). So: until the count is in, or 2 s.
        deadline = time.monotonic() + 2.0
        queries = requests_total(metrics) - before
        while queries < args.count and time.monotonic() < deadline:
            time.sleep(0.01)
            queries = requests_total(metrics) - before
    json.dump({"orders": orders, "endpoints": table, "queries": queries}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
