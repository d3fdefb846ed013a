"""A throttling shim in front of moto: Cloud Map's account-wide throttle, scaled down.

AWS throttles `DiscoverInstances` per account and Region with a token bucket (2,000 calls,
refilled at 1,000 a second) shared by every caller. moto throttles nothing, so this HTTP
reverse proxy on a loopback address plays the bucket (by default 20, refilled at 10 a second)
for the data-plane calls, DiscoverInstances and DiscoverInstancesRevision (told apart by the
X-Amz-Target header of the JSON protocol), both drawing on the one bucket. A call that finds
it empty is answered as AWS answers one: HTTP 400 with a JSON body whose `__type` is
ThrottlingException, which botocore reports as that error code. Every other request (the
admin calls that set moto up) passes through untouched and uncounted.

Every data-plane request is recorded (monotonic time, API, ok/throttled), retries by
botocore included: each is a request the account's bucket would see. A client whose endpoint
is `shim.url_for("name")` (the path /caller/name) is recorded as that caller; the prefix is
taken off before the request goes on, so many clients can share the one bucket and still be
told apart.

    with ThrottleShim(moto_url) as shim:
        ...  # clients with endpoint_url=shim.url (or shim.url_for(caller))
        shim.calls  # [(time, api, outcome, caller), ...]
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

DATA_PLANE = ("DiscoverInstances", "DiscoverInstancesRevision")
CALLER_PREFIX = "/caller/"
THROTTLED_BODY = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()


class Call(NamedTuple):
    at: float  # monotonic seconds
    api: str
    outcome: str  # "ok" or "throttled"
    caller: str = ""  # from the endpoint's path (url_for), else ""


class TokenBucket:
    """`capacity` tokens, refilled at `rate` a second; thread-safe."""

    def __init__(
        self, capacity: float, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.rate = rate
        self.clock = clock
        self.tokens = capacity
        self.at = clock()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class ThrottleShim:
    """The proxy, serving in a background thread on `host` (a free port by default)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        capacity: float = 20,
        rate: float = 10,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        target = urlsplit(upstream_url)
        assert target.hostname is not None and target.port is not None
        self.target = (target.hostname, target.port)
        self.bucket = TokenBucket(capacity, rate)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url_for(self, caller: str) -> str:
        """An endpoint URL whose requests are recorded as `caller`'s."""
        return f"{self.url}{CALLER_PREFIX}{quote(caller, safe='')}"

    def record(self, api: str, outcome: str, caller: str = "") -> None:
        with self._lock:
            self.calls.append(Call(time.monotonic(), api, outcome, caller))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        shim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self._relay("POST")

            def do_GET(self) -> None:
                self._relay("GET")

            def _relay(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                api = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                path, caller = self.path, ""
                if path.startswith(CALLER_PREFIX):
                    name, _, rest = path[len(CALLER_PREFIX) :].partition("/")
                    path, caller = "/" + rest, unquote(name)
                if api in DATA_PLANE:
                    if not shim.bucket.take():
                        shim.record(api, "throttled", caller)
                        self._answer(400, {"Content-Type": "application/x-amz-json-1.1"},
                                     THROTTLED_BODY)  # fmt: skip
                        return
                    shim.record(api, "ok", caller)
                connection = http.client.HTTPConnection(*shim.target, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    passed = {
                        k: v
                        for k, v in response.getheaders()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection")
                    }
                    self._answer(response.status, passed, data)
                finally:
                    connection.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> ThrottleShim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
