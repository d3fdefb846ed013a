"""A thread that reads a UDP listening socket and answers current fast-path rows itself.

Why: uvloop's datagram path (epoll wake-up, transport, protocol call, transport send) costs
about 4 us of CPU per query on this machine, a quarter of a cache hit; a plain blocking
`recvfrom`/`sendto` loop does not pay it (bench/results/ceiling.md).

Theory of operation
- The socket is blocking. The thread reads it and hands each datagram to the listener's hot
  path (`receive`, a closure made by server/udp.py), looked up after the datagram arrived, so a
  rebind (draining, reload) applies to the next datagram. A current fast-path row is answered
  there, in the thread, with a blocking `sendto`.
- Anything else (no row, a row past its moment, admission work) must run on the event loop:
  the cache, the miss path and the metrics belong to it. The thread then *lends the socket* to
  the loop (`lend`) and parks until it is given back. The loop handles that datagram, then reads
  the socket itself, with MSG_DONTWAIT, in batches of LOOP_BATCH through its own copy of the
  hot path (`loop_receive`). After a batch in which few datagrams needed the slow path (at most
  GIVE_BACK_AT), or when the socket is empty, it gives the socket back. Between batches its
  timers and other I/O run.
- Why lend rather than queue: two threads taking turns on one GIL per datagram cost ~1.5
  context switches and a futex call per query. With 100,000 names asked in turn (no rows) that
  took 11 us per query on top of the work. Lent, the loop reads with no thread to wake, and
  traffic that needs the loop stays on it.
- Slow-hit accounting (a hit that took longer than the histogram's first bucket) is passed to
  the loop with `call_soon_threadsafe` (`call`), without lending.
- The loop sends on the socket with MSG_DONTWAIT (`sendto`): a full socket buffer drops that
  reply (counted as dropped, overload) instead of stalling the loop.
- What the thread writes: a row's `hits` and `seconds`, each with one `+=` (one bytecode
  read-modify-write, which the GIL does not split). The loop takes both in one statement when
  it flushes a row (FastPath.flush_row). Every other object the thread reads (the row table,
  the allow-list verdicts, a row's tail) is changed by the loop with single dict or attribute
  stores, so the thread sees either the old value or the new one.
- Stopping: a flag, the parked thread woken, then shutdown(SHUT_RD) on the socket, which wakes
  a blocked `recvfrom` with an empty read (Linux does this for unconnected UDP sockets too,
  after saying ENOTCONN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dns_sidecar")

# A query is a header, one question and an OPT record: well under this. A longer datagram is
# cut here and then fails to parse (counted as malformed), which is what it deserves.
MAX_QUERY = 4096
JOIN_SECONDS = 2.0
LOOP_BATCH = 64  # datagrams the loop reads before it lets its other callbacks run
GIVE_BACK_AT = 8  # a lent socket goes back after a batch with at most this many slow ones

Address = tuple[str | int, ...]
Receiver = Callable[[bytes, Address], None]


def _ignore(*_args: Any) -> None:
    pass


class UdpReaderThread:
    """The listener's transport when a thread reads its socket: `sendto`, `is_closing` and
    `close`, as the loop side of the listener uses them."""

    def __init__(self, sock: socket.socket, name: str, dropped: dict[str, int]) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.name = name
        self.dropped = dropped  # Metrics.dropped: a reply not sent is counted as overload
        # The hot paths, set again by the listener whenever one of their parts changes.
        self.receive: Receiver = _ignore  # the thread's
        self.loop_receive: Receiver = _ignore  # the loop's, while the socket is lent to it
        self.slow = 0  # datagrams of the current loop batch that took the slow path
        self._closing = False
        self._thread: threading.Thread | None = None
        self._given_back = threading.Event()
        self._wake: Callable[..., object] = _ignore
        self._soon: Callable[..., object] = _ignore

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read datagrams until close(); the hot paths are looked up per datagram, as the
        listener sets them again whenever one of their parts changes."""
        self._wake, self._soon = loop.call_soon_threadsafe, loop.call_soon
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        recvfrom = self.sock.recvfrom
        while not self._closing:
            try:
                data, addr = recvfrom(MAX_QUERY)
                if self._closing:
                    break  # woken by close(): not served
                self.receive(data, addr)
            except OSError:
                # A reply the kernel would not send (an unreachable client address): that
                # datagram is lost, the thread goes on. After close() the socket is gone.
                if self._closing:
                    break
            except RuntimeError:
                break  # the loop is closed: nothing can serve the rest
            except Exception:
                log.exception("UDP reader: datagram failed")

    def call(self, work: Callable[..., object], *args: Any) -> None:
        """From the thread: have the loop call `work(*args)` soon."""
        self._wake(work, *args)

    def lend(self, slow_path: Callable[..., None], *args: Any) -> None:
        """From the thread: have the loop call `slow_path(*args)` and then read the socket
        itself until it gives it back; the thread waits for that here."""
        self._wake(self._on_loop, slow_path, args)
        self._given_back.wait()
        self._given_back.clear()

    def _on_loop(self, slow_path: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            slow_path(*args)
        finally:
            self._read_on_loop()

    def _read_on_loop(self) -> None:
        """On the loop, the socket lent: one batch, then give it back or come again."""
        self.slow = 0
        recvfrom, receive = self.sock.recvfrom, self.loop_receive
        for _ in range(LOOP_BATCH):
            if self._closing:
                break
            try:
                data, addr = recvfrom(MAX_QUERY, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break  # empty: the thread waits better than the loop polls
            except OSError:
                continue
            try:
                receive(data, addr)
            except Exception:
                log.exception("UDP query failed")
        else:
            if self.slow > GIVE_BACK_AT:
                self._soon(self._read_on_loop)  # this traffic needs the loop: keep reading
                return
        self._given_back.set()

    def sendto(self, data: bytes, addr: Any) -> None:
        """Send from the loop: never blocks, never raises."""
        try:
            self.sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError:
            self.dropped["overload"] += 1

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop the thread and close the socket; returns once the thread is gone (it is
        between two datagrams at most)."""
        if self._closing:
            return
        self._closing = True
        self._given_back.set()
        with contextlib.suppress(OSError):  # ENOTCONN, yet the blocked read wakes
            self.sock.shutdown(socket.SHUT_RD)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_SECONDS)
        self.sock.close()
