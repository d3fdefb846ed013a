"""The application of the passive-health tests: a real HTTP client loop (http.client) that
resolves the service through the sidecar before every request and sends it to the first
address, as a client of client-side discovery does. Run inside the test's network namespace:

    python -m tests.integration.passive_app --dns 127.0.0.1:53 --name svc.local --port 8080 \
        --threads 4 --seconds 8 [--keep-alive]

Without --keep-alive every request opens a connection of its own (so a blackholed backend is
met with a fresh connect); with it each thread keeps one connection per backend. Prints one JSON
object: every request (monotonic start, first address, the answer, connect and total seconds,
outcome), so the test can line the application's view up with the sidecar's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from typing import Any

import dns.message
import dns.query
import dns.rdatatype


def lookup(dns_host: str, dns_port: int, name: str) -> list[str]:
    query = dns.message.make_query(name, dns.rdatatype.A)
    reply = dns.query.udp(query, dns_host, port=dns_port, timeout=1.0)
    return [r.address for rrset in reply.answer for r in rrset if r.rdtype == dns.rdatatype.A]


def worker(args: argparse.Namespace, until: float, out: list[dict[str, Any]]) -> None:
    dns_host, _, dns_port = args.dns.rpartition(":")
    pool: dict[str, http.client.HTTPConnection] = {}
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            answer = lookup(dns_host, int(dns_port), args.name)
        except Exception as e:  # a lost lookup is part of the record, not a crash
            out.append({"start": start, "first": None, "answer": [], "outcome": repr(e)})
            continue
        first = answer[0]
        record: dict[str, Any] = {"start": start, "first": first, "answer": answer}
        conn = pool.get(first)
        try:
            if conn is None or conn.sock is None:
                conn = http.client.HTTPConnection(first, args.port, timeout=args.timeout)
                connect_start = time.monotonic()
                conn.connect()
                record["connect_s"] = time.monotonic() - connect_start
                if args.keep_alive:
                    pool[first] = conn
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            record["outcome"] = response.status
            if not args.keep_alive:
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            record["outcome"] = type(e).__name__
            pool.pop(first, None)
            if conn is not None:
                conn.close()
        record["seconds"] = time.monotonic() - start
        out.append(record)
        time.sleep(args.pause)


def watcher(args: argparse.Namespace, until: float, out: list[dict[str, Any]]) -> None:
    """Lookups only, every 20 ms: what the sidecar answers while every worker may be stuck in
    a connect (the application's requests alone would not show when an address left)."""
    dns_host, _, dns_port = args.dns.rpartition(":")
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            answer = lookup(dns_host, int(dns_port), args.name)
        except Exception:  # a lost lookup: the next one comes 20 ms later
            answer = []
        out.append({"start": start, "first": None, "answer": answer, "outcome": "lookup"})
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dns", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--pause", type=float, default=0.01)
    parser.add_argument("--keep-alive", action="store_true")
    args = parser.parse_args()
    socket.setdefaulttimeout(args.timeout)
    until = time.monotonic() + args.seconds
    records: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=worker, args=(args, until, records)) for _ in range(args.threads)
    ]
    threads.append(threading.Thread(target=watcher, args=(args, until, records)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"requests": sorted(records, key=lambda r: r["start"])}))


if __name__ == "__main__":
    main()
