"""Fake service backends: real HTTP/TCP listeners that health probes can reach, slow down or kill.

Each backend listens on its own address (e.g. a distinct 127.0.x.y) and port. It answers any
HTTP request with `status` (200 unless changed) after `delay` seconds, and accepts plain TCP
connections (a TCP connect probe): the connect itself is completed by the kernel, so `delay`
only slows HTTP answers. `die()` closes the listener and aborts open connections, so new
connections are refused at once (RST); `revive()` listens again on the same address and port.

All backends of a `BackendPool` run in one background thread with its own asyncio loop, so
synchronous tests (and a sidecar subprocess probing them) can use them:

    with BackendPool() as pool:
        fast = pool.start("127.0.5.2", 8080)
        slow = pool.start("127.0.5.3", 8080, delay=0.08)
        fast.die()
        ...
        fast.revive()

Run as a program it serves backends until SIGTERM or SIGINT (used inside a network namespace):

    python -m tests.fakes.backends --port 8080 [--delay ADDR=SECONDS ...] ADDR [ADDR ...]

It prints "ready" on stdout once every listener is up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

REQUEST_LIMIT = 16384  # bytes of request head read before giving up on a client


class Backend:
    """One listener; its methods are called from any thread except the pool's loop thread."""

    def __init__(self, pool: BackendPool | None, host: str, port: int, delay: float = 0.0):
        self._pool = pool
        self.host = host
        self.port = port
        self.delay = delay  # seconds added before each HTTP answer; may be changed at any time
        self.status = 200  # the HTTP status answered; may be changed at any time
        self.connections = 0  # TCP connections accepted
        self.requests = 0  # HTTP requests answered (or being answered)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<Backend {self.host}:{self.port} {state} delay={self.delay}>"

    @property
    def address(self) -> str:
        return self.host

    @property
    def alive(self) -> bool:
        return self._server is not None

    def die(self) -> None:
        """Stop listening and drop open connections; returns once connects are refused."""
        self._run(self.stop_listening())

    def revive(self) -> None:
        """Listen again on the same address and port."""
        self._run(self.listen())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._pool is None:
            coro.close()
            raise RuntimeError("this backend has no pool thread; await its coroutines instead")
        return self._pool.run(coro)

    # --- inside the loop ---------------------------------------------------------------------

    async def listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True, backlog=128
            )

    async def stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        # Twice: a connection accepted just before the close has its handler task made but
        # not started (not in _handlers yet); one turn of the loop later it is, and is ended
        # (else its transport was left open: an unraisable ResourceWarning in a later test).
        for _ in range(2):
            await asyncio.sleep(0)
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                status = self.status
                body = b"ok\n" if 200 <= status < 400 else b"unhealthy\n"
                header = (
                    f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(header.encode() + (b"" if head.startswith(b"HEAD ") else body))
                await writer.drain()
        except asyncio.LimitOverrunError:
            pass  # a head larger than the stream limit: just close
        except asyncio.CancelledError:
            writer.transport.abort()  # died: drop the connection without a FIN handshake
            raise
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


class BackendPool:
    """Backends served by one asyncio loop in a background thread; a context manager."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="backends", daemon=True)
        self._started = False
        self.backends: list[Backend] = []

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` in the pool's loop and wait for its result."""
        if not self._started:
            coro.close()
            raise RuntimeError("the pool is not running (use it as a context manager)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, host: str, port: int, *, delay: float = 0.0, alive: bool = True) -> Backend:
        """A backend on host:port; listening at once unless `alive` is False."""
        backend = Backend(self, host, port, delay)
        if alive:
            backend.revive()
        self.backends.append(backend)
        return backend

    def __enter__(self) -> BackendPool:
        self._thread.start()
        self._started = True
        return self

    def close(self) -> None:
        if not self._started:
            self._loop.close()
            return
        try:
            for backend in self.backends:
                backend.die()
        finally:
            self._started = False
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- as a program -----------------------------------------------------------------------------


async def _serve_until_signal(hosts: list[str], port: int, delays: dict[str, float]) -> None:
    backends = [Backend(None, host, port, delays.get(host, 0.0)) for host in hosts]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for backend in backends:
            await backend.listen()
        print("ready", flush=True)
        await stop.wait()
    finally:
        for backend in backends:
            await backend.stop_listening()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", action="append", default=[], metavar="ADDR=SECONDS")
    parser.add_argument("hosts", nargs="+", metavar="ADDR")
    args = parser.parse_args(argv)
    delays = {}
    for item in args.delay:
        host, _, seconds = item.partition("=")
        delays[host] = float(seconds)
    asyncio.run(_serve_until_signal(args.hosts, args.port, delays))
    return 0


if __name__ == "__main__":
    sys.exit(main())
