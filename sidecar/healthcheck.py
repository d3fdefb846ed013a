"""``dns-sidecar healthcheck``: is the local sidecar answering DNS? For container health checks.

Sends ``id.server CH TXT`` over UDP to the sidecar. The sidecar answers that question itself
(``sidecar.local_answers``), never asking an upstream, so the check passes while the VPC
resolver is slow or down: an orchestrator must not kill a healthy cache because the resolver
behind it has trouble (the cache keeps serving, stale if need be).

Healthy (exit 0): a reply with our random ID, the QR bit and rcode NOERROR within ``--timeout``
seconds in all (2 by default, the ECS minimum for a health check timeout). Anything else exits
1 (Docker reserves 2), always with one line saying why. No dnslib and no event loop: this runs
every few seconds in every task.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence

from sidecar.addresses import HostPort, parse_hostport, reachable_at
from sidecar.config import ENV_CONFIG, value_from_sources
from sidecar.core.wire import walk_name
from sidecar.errors import ConfigError, FormError

UNHEALTHY = 1
DEFAULT_TIMEOUT = 2.0
QNAME = b"\x02id\x06server\x00"
QTYPE_TXT, QCLASS_CH = 16, 3
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def query(qid: int) -> bytes:
    """``id.server CH TXT`` with ID ``qid``, no flags set (the sidecar answers it itself)."""
    return (
        struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0)
        + QNAME
        + struct.pack("!HH", QTYPE_TXT, QCLASS_CH)
    )


def listen_address(env: Mapping[str, str], config_path: str | None = None) -> HostPort:
    """The first ``listen`` address from the sidecar's own sources (file, then environment).

    Flags given to the server process are not visible here: configure the sidecar through the
    environment (as the task definitions do) or pass ``--address``. A wildcard listen address
    (0.0.0.0, ::) is checked on loopback.
    """
    listen: Sequence[HostPort] = value_from_sources("listen", env, config_path)
    return reachable_at(listen[0])


def _txt(reply: bytes) -> str:
    """The first TXT string of the answer, or "" when the reply is not laid out as expected."""
    try:
        at = walk_name(reply, 12 + len(QNAME) + 4)  # past header, our question, the owner
        at += 10  # type, class, ttl, rdlength
        return reply[at + 1 : at + 1 + reply[at]].decode("ascii", errors="replace")
    except (IndexError, FormError):
        return ""


def check(address: HostPort, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """One health check: (healthy, the line to print)."""
    started = time.monotonic()
    deadline = started + timeout
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    qid = int.from_bytes(os.urandom(2), "big")  # from the OS CSPRNG
    mismatched = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address.host, address.port))  # ICMP errors then surface on recv
            sock.send(query(qid))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                reply = sock.recv(4096)
                if len(reply) < 12 or struct.unpack_from("!H", reply)[0] != qid:
                    mismatched += 1
                    continue
                break
        except TimeoutError:
            extra = f" ({mismatched} replies with another ID ignored)" if mismatched else ""
            return False, f"unhealthy: no answer from {address} within {timeout:g} s{extra}"
        except ConnectionRefusedError:
            return False, f"unhealthy: nothing listens on {address} (connection refused)"
        except OSError as e:
            return False, f"unhealthy: cannot query {address}: {e.strerror or e}"
    elapsed_ms = (time.monotonic() - started) * 1000
    flags = struct.unpack_from("!H", reply, 2)[0]
    rcode = flags & 0x000F
    if not flags & 0x8000:
        return False, f"unhealthy: {address} sent a query, not a reply"
    if rcode != 0:
        name = RCODES.get(rcode, str(rcode))
        return False, f"unhealthy: {address} answered id.server CH TXT with {name}"
    text = _txt(reply)
    who = f" ({text})" if text else ""
    return True, f"ok: {address} answered id.server CH TXT in {elapsed_ms:.1f} ms{who}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dns-sidecar healthcheck",
        description="Ask the local sidecar id.server CH TXT (answered without any upstream). "
        "Exit 0 when it answers NOERROR in time, 1 otherwise, with one line saying why.",
    )
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="where to ask (default: the first listen address from DNS_SIDECAR_LISTEN or the "
        "config file, else 127.0.0.1:53; 0.0.0.0 and :: are asked on loopback)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"time allowed in all (default {DEFAULT_TIMEOUT:g}; 0.1..60)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"the sidecar's TOML config file (env {ENV_CONFIG})"
    )
    return parser


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """check that the local sidecar answers: dns-sidecar healthcheck [--address HOST:PORT]"""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as e:  # --help: 0; a usage error: unhealthy, not Docker's reserved 2
        return 0 if e.code in (0, None) else UNHEALTHY
    env = os.environ if env is None else env
    try:
        if not 0.1 <= args.timeout <= 60:
            raise ConfigError("--timeout", args.timeout, "a number of seconds 0.1..60")
        if args.address:
            address = parse_hostport(args.address, 53, "--address")
        else:
            address = listen_address(env, args.config)
    except ConfigError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return UNHEALTHY
    healthy, line = check(address, args.timeout)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else UNHEALTHY
