"""The HTTP listener for operators: /metrics, /health, /ready, /debug/endpoints.

A deliberately small HTTP/1.1 server (one request per connection, GET only, bounded request
size and time): it must never cost the DNS path anything and needs no extra dependency.

The Prometheus exposition (prometheus_client, through sidecar/prometheus_lean.py, and the
collectors of sidecar/metrics.py) is imported and built at the first /metrics request, not
before the sidecar's first answer: ~25 ms of imports on the benchmark machine, a seventh of
its start-up (bench/NOTES.md). That first scrape pays them once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.server import sockets

if TYPE_CHECKING:
    from sidecar.prometheus_lean import CollectorRegistry

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HttpListener:
    def __init__(
        self,
        make_registry: Callable[[], CollectorRegistry],
        readiness: Callable[[], tuple[bool, str]],
        endpoints: Callable[[], object],
    ) -> None:
        self.make_registry = make_registry  # called at the first /metrics request
        self.registry: CollectorRegistry | None = None
        self.readiness = readiness
        self.endpoints = endpoints
        self.routes: dict[str, Callable[[], Response]] = {
            "/metrics": self.metrics,
            "/health": self.health,
            "/ready": self.ready,
            "/debug/endpoints": self.debug_endpoints,
        }

    def metrics(self) -> Response:
        from sidecar.prometheus_lean import CONTENT_TYPE_LATEST, generate_latest

        if self.registry is None:
            self.registry = self.make_registry()
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def health(self) -> Response:
        # Liveness: we are here to answer, so the process serves DNS. Never depends on upstreams.
        return Response(200, b"ok\n")

    def ready(self) -> Response:
        ready, reason = self.readiness()
        if ready:
            return Response(200, b"ready\n")
        return Response(503, f"not ready: {reason}\n".encode())

    def debug_endpoints(self) -> Response:
        body = json.dumps(self.endpoints(), indent=2, sort_keys=True).encode() + b"\n"
        return Response(200, body, "application/json")

    def respond(self, request_line: bytes) -> Response:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return Response(400, b"bad request\n")
        method, target, _version = parts
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"GET only\n")
        response = route()
        if method == "HEAD":
            response = Response(response.status, b"", response.content_type)
        return response

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            response = self.respond(head.split(b"\r\n", 1)[0])
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
            response = Response(400, b"bad request\n")
        except ConnectionError:
            writer.close()
            return
        header = (
            f"HTTP/1.1 {response.status} {REASONS[response.status]}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header + response.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self, host: str, port: int) -> asyncio.Server:
        listener = sockets.tcp_listener(host, port)
        return await asyncio.start_server(self.handle, sock=listener, limit=MAX_REQUEST)
