"""A UDP upstream for spoofing and poisoning tests: it can hold a reply back while the test
forges others, and it can answer with records a real server would never put in a reply.

    with HeldUpstream(host) as up:
        up.hold("spoof.example.")              # queries for this name are not answered...
        seen = up.wait_query("spoof.example.") # ...until release(); seen.source is the
        ...                                    # sidecar's (address, port), seen.id its ID
        up.release("spoof.example.")
        up.extra["bail.example."] = [RR(...)]  # records added to the answer section

Everything else is answered at once: `A 192.0.2.1` (TTL 300) for any name, NODATA for other
types. It runs in a thread with a blocking socket, so tests need no event loop.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from types import TracebackType

from dnslib import QTYPE, RR, A, DNSRecord

ANSWER_ADDRESS = "192.0.2.1"


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


@dataclass(frozen=True)
class SeenQuery:
    source: tuple[str, int]  # where the query came from: where a forger must aim
    id: int
    qname: str
    raw: bytes


class HeldUpstream:
    def __init__(self, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.extra: dict[str, list[RR]] = {}  # name -> records added to the answer section
        self._held: dict[str, list[SeenQuery]] = {}
        self._seen: list[SeenQuery] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="held-upstream", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> HeldUpstream:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def hold(self, name: str) -> None:
        with self._cond:
            self._held.setdefault(_norm(name), [])

    def release(self, name: str) -> None:
        """Answer every held query for `name` now, and stop holding it."""
        with self._cond:
            waiting = self._held.pop(_norm(name), [])
        for seen in waiting:
            self.sock.sendto(self.reply(DNSRecord.parse(seen.raw)), seen.source)

    def count(self, name: str) -> int:
        with self._cond:
            return sum(1 for seen in self._seen if seen.qname == _norm(name))

    def wait_query(self, name: str, timeout: float = 5.0) -> SeenQuery:
        """The first query for `name` (waits for it)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.count_locked(name) > 0, timeout)
            assert ok, f"no query for {name} reached the upstream within {timeout}s"
            return next(seen for seen in self._seen if seen.qname == _norm(name))

    def count_locked(self, name: str) -> int:
        return sum(1 for seen in self._seen if seen.qname == _norm(name))

    def reply(self, query: DNSRecord) -> bytes:
        reply = query.reply()
        name = str(query.q.qname)
        if query.q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A(ANSWER_ADDRESS)))
        for record in self.extra.get(_norm(name), []):
            reply.add_answer(record)
        return bytes(reply.pack())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = DNSRecord.parse(data)
            except Exception:
                continue
            seen = SeenQuery(source, query.header.id, _norm(str(query.q.qname)), data)
            with self._cond:
                self._seen.append(seen)
                held = self._held.get(seen.qname)
                if held is not None:
                    held.append(seen)
                self._cond.notify_all()
            if held is None:
                self.sock.sendto(self.reply(query), source)
