"""Listening sockets made here rather than by the event loop.

Given a host name or address, uvloop resolves it with getaddrinfo on libuv's thread pool, which
starts four threads (and with them glibc malloc arenas) that stay for the life of the process:
about 0.5 MiB of idle memory and some start-up time for addresses that are already numeric.
Our addresses always are (config.py validates them), so the sockets are made and bound here
and handed to the loop ready to use.
"""

from __future__ import annotations

import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port)."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def tcp_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port), as asyncio's create_server makes them:
    SO_REUSEADDR (a restart need not wait for TIME_WAIT), IPv6 sockets IPv6 only. The loop
    calls listen() with the backlog it is given."""
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
