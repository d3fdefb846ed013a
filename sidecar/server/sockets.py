"""Listening sockets made here rather than by the event loop.

Given a host name or address, uvloop resolves it with getaddrinfo on libuv's thread pool, which
starts four threads (and with them glibc malloc arenas) that stay for the life of the process:
about 0.5 MiB of idle memory and some start-up time for addresses that are already numeric.
Our addresses always are (sidecar.config validates them), so the sockets are made and bound here
and handed to the loop ready to use.
"""

from __future__ import annotations

import errno
import socket
import struct

# linux/sock_diag.h: getsockopt(SOL_SOCKET, SO_MEMINFO) fills u32 sk_meminfo[SK_MEMINFO_VARS];
# index SK_MEMINFO_DROPS counts what the kernel dropped on the socket (full receive buffer).
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8


class CannotListen(OSError):
    """A listening socket could not be made or bound; says which and why."""

    def __init__(self, protocol: str, host: str, port: int, cause: OSError) -> None:
        code = cause.errno or 0
        self.protocol = protocol
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.errno_name = errno.errorcode.get(code, str(code))
        super().__init__(code, f"{protocol} {self.address}: {self.errno_name} ({cause.strerror})")

    def fields(self) -> dict[str, str]:
        """The log fields: address, protocol and errno."""
        return {"address": self.address, "protocol": self.protocol, "errno": self.errno_name}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound(
    host: str, port: int, kind: socket.SocketKind, options: list[tuple[int, int, int]]
) -> socket.socket:
    """A non-blocking socket with these options, bound to (host, port); closed on failure,
    which raises CannotListen."""
    protocol = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    try:
        sock = socket.socket(_family(host), kind)
    except OSError as exc:
        raise CannotListen(protocol, host, port, exc) from exc
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise CannotListen(protocol, host, port, exc) from exc
    return sock


def _reuse_port(reuse_port: bool) -> list[tuple[int, int, int]]:
    return [(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)] if reuse_port else []


def udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port)."""
    return _bound(host, port, socket.SOCK_DGRAM, _reuse_port(reuse_port))


def tcp_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port), as asyncio's create_server makes them:
    SO_REUSEADDR (a restart need not wait for TIME_WAIT), IPv6 sockets IPv6 only. The loop
    calls listen() with the backlog it is given."""
    options = [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1), *_reuse_port(reuse_port)]
    if _family(host) == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1))
    return _bound(host, port, socket.SOCK_STREAM, options)


def kernel_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped on `sock` (receive buffer full), as it counts them itself:
    read when asked (at scrape time), so counting costs the receive path nothing. 0 once the
    socket is closed or on a kernel without SO_MEMINFO (before 4.6)."""
    if sock.fileno() < 0:
        return 0
    size = (SK_MEMINFO_DROPS + 1) * 4
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, size)
    except OSError:
        return 0
    if len(info) < size:
        return 0
    drops: int = struct.unpack_from("=I", info, SK_MEMINFO_DROPS * 4)[0]
    return drops
