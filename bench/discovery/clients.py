"""One application process of the client task: resolves through glibc, connects to the first
address, one HTTP request per connection, at a fixed rate. Run inside the client namespace.

    python -m bench.discovery.clients --name resource-server.local --port 8080 --rate 40 \
        --out FILE

The client model (what the report calls "the application"):
- Lookups go through glibc: `socket.getaddrinfo(name, port, AF_INET, SOCK_STREAM)` in a worker
  thread, so the namespace's resolv.conf decides which server is asked and glibc sorts
  the addresses (RFC 6724) before the application sees them.
- glibc keeps no cache and getaddrinfo does not return a TTL, so the process keeps the list
  itself, as application-level DNS caches do: it is used for `--cache-seconds` (5 s, the TTL
  the sidecar hands out; every setup here has an upstream TTL of 60 s, so this is also
  min(TTL, 5 s)), and dropped at once when a connection to its first address fails. One lookup
  at a time: requests that need the list while a lookup runs wait for that lookup.
- Each request connects to the first address of the list (no fallback to the next one), sends
  `GET /` and reads the whole answer; a refused or timed-out connection, a lookup failure or
  a non-2xx answer is a failed request.
- Requests are started at a fixed rate (open loop: a slow backend does not slow the arrivals),
  with a random phase per process; at most `--max-inflight` run at once, more count as failed.

Protocol: prints "ready" after start-up, then waits for a line "go START T0 END" (monotonic
seconds: first request, t = 0, last request); afterwards writes its log to --out and prints
"done". Log lines, tab-separated, times in seconds relative to T0:
    Q  t  address  ok(0/1)  latency  error       one per request
    R  t  duration  first-address  count  error  one per lookup
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop


@dataclass
class AddressCache:
    """The application's own cache of one name's addresses (see the module docstring)."""

    name: str
    port: int
    keep_for: float
    t0: float
    log: list[str]
    addresses: list[str] = field(default_factory=list)
    fetched: float = -1e9
    lookup: asyncio.Task[list[str]] | None = None

    async def get(self) -> list[str]:
        if self.addresses and time.monotonic() - self.fetched < self.keep_for:
            return self.addresses
        if self.lookup is None:
            self.lookup = asyncio.get_running_loop().create_task(self._resolve())
        return await asyncio.shield(self.lookup)

    def drop(self, addresses: list[str]) -> None:
        """Forget the list after a failed connection (unless a newer lookup replaced it)."""
        if self.addresses is addresses:
            self.addresses = []

    async def _resolve(self) -> list[str]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            infos = await loop.run_in_executor(
                None, socket.getaddrinfo, self.name, self.port, socket.AF_INET, socket.SOCK_STREAM
            )
        except OSError as exc:
            took = time.monotonic() - started
            self.log.append(f"R\t{started - self.t0:.4f}\t{took:.5f}\t-\t0\t{type(exc).__name__}")
            raise
        finally:
            self.lookup = None
        addresses = [str(info[4][0]) for info in infos]
        took = time.monotonic() - started
        self.log.append(
            f"R\t{started - self.t0:.4f}\t{took:.5f}\t{addresses[0]}\t{len(addresses)}\t-"
        )
        self.addresses, self.fetched = addresses, time.monotonic()
        return addresses


@dataclass
class Client:
    cache: AddressCache
    port: int
    timeout: float
    t0: float
    log: list[str]
    request: bytes = b""

    async def one(self) -> None:
        started = time.monotonic()
        address, ok, error = "-", False, "-"
        try:
            addresses = await self.cache.get()
        except OSError:
            error = "lookup"
        else:
            address = addresses[0]
            try:
                async with asyncio.timeout(self.timeout):
                    ok, error = await self._call(address)
            except ConnectionRefusedError:
                error = "refused"
            except TimeoutError:
                error = "timeout"
            except OSError as exc:
                error = type(exc).__name__
            if not ok and error != "status":  # the connection failed: look up again
                self.cache.drop(addresses)
        took = time.monotonic() - started
        self.log.append(f"Q\t{started - self.t0:.4f}\t{address}\t{int(ok)}\t{took:.5f}\t{error}")

    async def _call(self, address: str) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await connect(loop, sock, address, self.port)
            sock.send(self.request)  # a few dozen bytes into a fresh socket's empty buffer
            answer = b""
            while chunk := await loop.sock_recv(sock, 4096):
                answer += chunk
        if answer.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
            return True, "-"
        return False, "status" if answer else "closed"


async def connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: str, port: int
) -> None:
    """A non-blocking connect to an address literal. (uvloop's sock_connect passes even a
    literal through getaddrinfo in its thread pool first: a thread hop per request for nothing.)"""
    error = sock.connect_ex((address, port))
    if error == errno.EINPROGRESS:
        done: asyncio.Future[None] = loop.create_future()

        def writable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_writer(sock.fileno(), writable)
        try:
            await done
        finally:
            loop.remove_writer(sock.fileno())
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))  # ECONNREFUSED: a ConnectionRefusedError


async def run(args: argparse.Namespace, start: float, t0: float, end: float) -> list[str]:
    log: list[str] = []
    cache = AddressCache(args.name, args.port, args.cache_seconds, t0, log)
    client = Client(cache, args.port, args.timeout, t0, log)
    client.request = f"GET / HTTP/1.1\r\nHost: {args.name}\r\nConnection: close\r\n\r\n".encode()
    interval = 1.0 / args.rate
    due = start + random.uniform(0.0, interval)
    running: set[asyncio.Task[None]] = set()
    while due < end:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(running) >= args.max_inflight:
            log.append(f"Q\t{due - t0:.4f}\t-\t0\t0\toverload")
        else:
            task = asyncio.get_running_loop().create_task(client.one())
            running.add(task)
            task.add_done_callback(running.discard)
        due += interval
    if running:
        await asyncio.wait(running, timeout=args.timeout + 5)
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one application process of the client task")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--cache-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    parser.add_argument("--max-inflight", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 4 or line[0] != "go":
        print(f"clients: expected 'go START T0 END', got {line!r}", file=sys.stderr)
        return 2
    start, t0, end = (float(x) for x in line[1:])
    log = uvloop.run(run(args, start, t0, end))
    args.out.write_text("\n".join(log) + "\n")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
