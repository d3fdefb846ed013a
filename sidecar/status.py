"""``dns-sidecar status``: the endpoint table of a running sidecar, as a table for people.

Reads ``/debug/endpoints`` from the sidecar's HTTP listener (``metrics_listen`` from the same
file and environment the sidecar uses, or ``--address``). ``--json`` prints it unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

from sidecar.addresses import HostPort, parse_hostport, reachable_at
from sidecar.config import value_from_sources

COLUMNS = ("zone", "address", "health", "health_source", "latency_ms", "last_probe_ago_s")


def fetch(address: HostPort, timeout: float = 2.0) -> dict[str, Any]:
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"http://{host}:{address.port}/debug/endpoints"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
    return data


def table(data: dict[str, Any]) -> str:
    rows = [
        [str(e.get(c, "")) if e.get(c) is not None else "-" for c in COLUMNS]
        for e in data.get("endpoints", [])
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    zones = data.get("discovery_zones", {})
    head = "discovery zones: " + (
        ", ".join(f"{z} ({check})" for z, check in zones.items()) if zones else "none"
    )
    return "\n".join([head, "", *lines]) if rows else head + "\nno endpoints seen yet"


def main(args: Sequence[str]) -> int:
    """print the endpoint table of a running sidecar: dns-sidecar status [--json]"""
    parser = argparse.ArgumentParser(
        prog="dns-sidecar status", description="print the endpoint table of a running sidecar"
    )
    parser.add_argument("--address", help="HOST:PORT of the sidecar's metrics listener")
    parser.add_argument("--json", action="store_true", help="print the JSON as it comes")
    opts = parser.parse_args(list(args))
    if opts.address:
        address = parse_hostport(opts.address, 9153, "--address")
    else:
        address = value_from_sources("metrics_listen", os.environ)
    address = reachable_at(address)  # a wildcard metrics_listen is asked on loopback
    try:
        data = fetch(address)
    except OSError as exc:
        print(f"cannot read the endpoint table from {address}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if opts.json else table(data))
    return 0
