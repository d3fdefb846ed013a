"""A thread that reads a UDP listening socket and answers current fast-path rows itself.

Why: uvloop's datagram path (epoll wake-up, transport, protocol call, transport send) costs
about 4 us of CPU per query on this machine, a quarter of a cache hit; a plain blocking
`recvfrom`/`sendto` loop does not pay it (bench/results/ceiling.md: 10.4 us per query against
14.3 us for a uvloop protocol doing the same work).

Theory of operation
- The socket is blocking and only this thread reads it; the event loop never watches it.
- The thread hands each datagram to the listener's `datagram_received` (server/udp.py), the
  same closure the loop would call. A current fast-path row is answered there, in the thread,
  with a blocking `sendto`. Anything else (no row, a row past its moment, admission work,
  slow-hit accounting) is passed to the loop with `call_soon_threadsafe`, and the loop does
  what it always did: admission, parsing, the cache, refreshing rows, the miss path.
- The loop sends on the same socket through `sendto` here: MSG_DONTWAIT, so a full socket
  buffer drops that reply (counted as `send_errors`) instead of stalling the loop.
- What the thread writes: a row's `hits` and `seconds`, each with one `+=` (one bytecode
  read-modify-write, which the GIL does not split). The loop takes both in one statement when
  it flushes a row (FastPath.flush_row). Every other object the thread reads (the row table,
  the allow-list verdicts, a row's tail) is changed by the loop with single dict or attribute
  stores, so the thread sees either the old value or the new one.
- Stopping: a flag, then shutdown(SHUT_RD) on the socket, which wakes a blocked `recvfrom`
  with an empty read (Linux does this for unconnected UDP sockets too, after saying ENOTCONN).
"""

from __future__ import annotations

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


def _ignore(_data: bytes, _addr: Any) -> None:
    pass


class UdpReaderThread:
    """The listener's transport when a thread reads its socket: `sendto`, `is_closing`,
    `close` and `get_extra_info`, as the loop side of the listener uses them."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.name = name
        self.send_errors = 0  # loop-side replies the socket would not take at once
        self._closing = False
        self._thread: threading.Thread | None = None
        self.receive: Callable[[bytes, Any], None] = _ignore  # the listener's hot path

    def start(self) -> None:
        """Read datagrams until close(); each goes to `receive`, looked up per datagram:
        the listener sets it again whenever one of its parts changes."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        recvfrom = self.sock.recvfrom
        while not self._closing:
            try:
                data, addr = recvfrom(MAX_QUERY)
                if self._closing:
                    break
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

    def sendto(self, data: bytes, addr: Any) -> None:
        """Send from the loop: never blocks, never raises."""
        try:
            self.sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError:
            self.send_errors += 1

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.sock.getsockname()
        if name == "socket":
            return self.sock
        return default

    def close(self) -> None:
        """Stop the thread and close the socket; returns once the thread is gone (it is
        between two datagrams at most)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):  # ENOTCONN, yet the blocked read wakes
            self.sock.shutdown(socket.SHUT_RD)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_SECONDS)
        self.sock.close()
