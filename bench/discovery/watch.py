"""Samples a sidecar once a second, inside the client namespace: its endpoint table, and the
first address of `--answers` answers for the service name.

    python -m bench.discovery.watch --metrics 127.0.0.1:9153 --dns 127.0.0.1:53 \
        --name resource-server.local --out FILE

Same protocol as the clients: prints "ready", waits for "go START T0 END" (monotonic seconds),
then from START to END writes one line per sample to --out,
"t<TAB>JSON of /debug/endpoints<TAB>first addresses, comma-separated", and prints "done".
The report reads from it the latencies the probes measured (what the sidecar's weighting saw)
and how the sidecar's own answers were spread, apart from what the application then did.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype


def fetch(host: str, port: int) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/debug/endpoints")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def firsts(server: tuple[str, int], name: str, count: int) -> list[str]:
    """The first A record of `count` answers for `name` ("-" for a failed query)."""
    out = []
    for _ in range(count):
        query = dns.message.make_query(name, dns.rdatatype.A)
        try:
            reply = dns.query.udp(query, server[0], port=server[1], timeout=0.5)
        except (dns.exception.Timeout, OSError):
            out.append("-")
            continue
        first = [
            rd.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset
        ]
        out.append(first[0] if first else "-")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sample a sidecar's /debug/endpoints")
    parser.add_argument("--metrics", required=True, help="HOST:PORT of the sidecar's HTTP")
    parser.add_argument("--dns", required=True, help="HOST:PORT of the sidecar's DNS")
    parser.add_argument("--name", required=True)
    parser.add_argument("--answers", type=int, default=32, help="queries per sample")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    host, _, port = args.metrics.rpartition(":")
    dns_host, _, dns_port = args.dns.rpartition(":")
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 4 or line[0] != "go":
        print(f"watch: expected 'go START T0 END', got {line!r}", file=sys.stderr)
        return 2
    start, t0, end = (float(x) for x in line[1:])
    samples = []
    due = start
    while due < end:
        time.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        try:
            body = fetch(host, int(port)).replace("\n", " ")
        except OSError:
            body = "null"
        picked = firsts((dns_host, int(dns_port)), args.name, args.answers)
        samples.append(f"{now - t0:.3f}\t{body}\t{','.join(picked)}")
        due += 1.0
    args.out.write_text("\n".join(samples) + "\n")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
