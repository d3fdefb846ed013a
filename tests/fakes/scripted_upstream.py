"""A scripted fake DNS upstream: the faults a real authoritative server will not produce.

It listens on UDP and TCP on one loopback address and port, in a background thread with its own
asyncio loop, so both synchronous tests and a sidecar running as a subprocess can talk to it.
It records every query it receives and answers each according to the behaviour set for the
query's name (or the default behaviour). Behaviours can be changed while it runs.

    with ScriptedUpstream() as up:
        up.set("a.example.", Answer(("A 192.0.2.7",), ttl=30))
        up.set("slow.example.", Delay(2.0))
        up.default = Silent()
        ...
        assert up.count("a.example.", proto="tcp") == 1

`max_packets_per_second` plays the VPC resolver's packet limit (1024 per network interface):
a query arriving when that many arrived in the second before it is logged as `dropped` and
never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord

Proto = Literal["udp", "tcp"]

log = logging.getLogger(__name__)


# --- behaviours -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Answer with the records whose type matches the question (NODATA + SOA if none match).

    Each record is "TYPE RDATA" in zone-file syntax, e.g. "A 192.0.2.1", "TXT hello",
    "AAAA 2001:db8::1", "CNAME other.example."; the owner is the query name as asked.
    """

    records: tuple[str, ...] = ("A 192.0.2.1",)
    ttl: int = 60


@dataclass(frozen=True)
class TruncateUdp:
    """Over UDP: TC set, no answers. Over TCP: `count` A records 10.1.x.y with `ttl`."""

    count: int = 40
    ttl: int = 60


@dataclass(frozen=True)
class Silent:
    """Never answer."""


@dataclass(frozen=True)
class ServFail:
    """Answer SERVFAIL."""


@dataclass(frozen=True)
class Refused:
    """Answer REFUSED."""


@dataclass(frozen=True)
class Rcode:
    """Answer with reply code `rcode` and nothing else (FORMERR, NOTIMP, NOTAUTH, ...)."""

    rcode: int


@dataclass(frozen=True)
class NxDomain:
    """NXDOMAIN with the SOA of `zone` (default: the query name's parent) in authority."""

    soa_ttl: int = 30
    minimum: int = 30
    zone: str | None = None


@dataclass(frozen=True)
class WrongId:
    """First a reply carrying a different ID; then what `then` says (None: nothing more)."""

    then: Behaviour | None = field(default_factory=Answer)


@dataclass(frozen=True)
class WrongQuestion:
    """First a reply with the right ID but another question; then `then` (None: nothing)."""

    then: Behaviour | None = field(default_factory=Answer)


@dataclass(frozen=True)
class Garbage:
    """First bytes that start with the right ID but are no DNS message; then `then`."""

    size: int = 48
    then: Behaviour | None = field(default_factory=Answer)


@dataclass(frozen=True)
class Unreadable:
    """A reply whose header and question match the query but whose answer record is cut
    short: it is ours (RFC 5452), but cannot be read."""


@dataclass(frozen=True)
class RandomSubset:
    """Route 53's multivalue answer: a different random `count` of `records` every time
    (each "TYPE RDATA", as for Answer)."""

    records: tuple[str, ...]
    count: int = 8
    ttl: int = 60


@dataclass(frozen=True)
class Delay:
    """Wait `seconds`, then behave as `then`."""

    seconds: float
    then: Behaviour = field(default_factory=Answer)


Behaviour = (
    Answer
    | TruncateUdp
    | Silent
    | ServFail
    | Refused
    | Rcode
    | NxDomain
    | WrongId
    | WrongQuestion
    | Garbage
    | Unreadable
    | Delay
    | RandomSubset
)

SO_RCVBUFFORCE = 33  # linux/asm-generic/socket.h; the socket module does not name it

WRONG_QUESTION_NAME = "wrong-question.invalid."


# --- the query log ----------------------------------------------------------------------------


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


@dataclass(frozen=True)
class QueryRecord:
    """One query as the upstream received it."""

    proto: Proto
    qname: str  # as sent (case kept), with the trailing dot; "" if the message did not parse
    qtype: str  # "A", "AAAA", ...
    id: int
    edns: bool
    payload: int | None  # the EDNS UDP payload size, None without EDNS
    rd: bool
    raw: bytes
    at: float  # time.monotonic() on receipt
    dropped: bool = False  # over max_packets_per_second: not answered


class QueryLog:
    """A thread-safe list of QueryRecords that can be waited on."""

    def __init__(self) -> None:
        self._records: list[QueryRecord] = []
        self._cond = threading.Condition()

    def add(self, record: QueryRecord) -> None:
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._records.clear()

    def _match(
        self, qname: str | None, proto: Proto | None, qtype: str | None
    ) -> list[QueryRecord]:
        want = _norm(qname) if qname is not None else None
        return [
            r
            for r in self._records
            if (want is None or _norm(r.qname) == want)
            and (proto is None or r.proto == proto)
            and (qtype is None or r.qtype == qtype.upper())
        ]

    def records(
        self, qname: str | None = None, proto: Proto | None = None, qtype: str | None = None
    ) -> list[QueryRecord]:
        """The matching queries, oldest first; the name is compared case-insensitively."""
        with self._cond:
            return self._match(qname, proto, qtype)

    def count(
        self, qname: str | None = None, proto: Proto | None = None, qtype: str | None = None
    ) -> int:
        with self._cond:
            return len(self._match(qname, proto, qtype))

    def wait_for(
        self,
        n: int,
        qname: str | None = None,
        proto: Proto | None = None,
        qtype: str | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Wait until at least `n` matching queries arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._match(qname, proto, qtype)) >= n, timeout=timeout
            )


# --- building replies -------------------------------------------------------------------------


def _base_reply(query: DNSRecord) -> DNSRecord:
    reply = query.reply()
    reply.header.aa = 1
    if any(rr.rtype == QTYPE.OPT for rr in query.ar):
        reply.add_ar(EDNS0(udp_len=1232))
    return reply


def _soa(zone: str, ttl: int, minimum: int) -> RR:
    suffix = "" if zone in ("", ".") else zone.rstrip(".")
    mname, rname = (f"{label}.{suffix}." if suffix else f"{label}." for label in ("ns", "hm"))
    return RR(zone or ".", QTYPE.SOA, ttl=ttl, rdata=SOA(mname, rname, (1, 60, 60, 60, minimum)))


def _parent(name: str) -> str:
    labels = name.rstrip(".").split(".")
    return ".".join(labels[1:]) + "." if len(labels) > 1 else "."


def _answer(query: DNSRecord, behaviour: Answer) -> DNSRecord:
    reply = _base_reply(query)
    qname = str(query.q.qname)
    qtype = query.q.qtype
    for text in behaviour.records:
        for rr in RR.fromZone(f"{qname} {behaviour.ttl} IN {text}"):
            if rr.rtype in (qtype, QTYPE.CNAME) or qtype == QTYPE.ANY:
                reply.add_answer(rr)
    if not reply.rr:
        reply.add_auth(_soa(_parent(qname), behaviour.ttl, behaviour.ttl))
    return reply


def _truncated_full(query: DNSRecord, behaviour: TruncateUdp) -> DNSRecord:
    reply = _base_reply(query)
    for i in range(behaviour.count):
        addr = f"10.1.{i // 256}.{i % 256}"
        reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=behaviour.ttl, rdata=A(addr)))
    return reply


def _rcode_reply(query: DNSRecord, rcode: int) -> DNSRecord:
    reply = _base_reply(query)
    reply.header.aa = 0
    reply.header.rcode = rcode
    return reply


def _garbage(query_id: int, size: int) -> bytes:
    # Right ID, QR set, one question and five answers claimed, then a label that says 63 bytes
    # follow but does not have them: no parser can read this as a DNS message.
    header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 5, 0, 0)
    rng = random.Random(query_id)
    filler = bytes(rng.randrange(0x40, 0x7F) for _ in range(max(0, size - 16)))
    return header + b"\x3f" + filler[:62]


async def _replies(query: DNSRecord, behaviour: Behaviour, proto: Proto) -> AsyncIterator[bytes]:
    """The messages to send back, in order (a behaviour may send none, one or several)."""
    match behaviour:
        case Answer():
            yield _answer(query, behaviour).pack()
        case RandomSubset():
            records = tuple(random.sample(behaviour.records, behaviour.count))
            yield _answer(query, Answer(records, behaviour.ttl)).pack()
        case TruncateUdp():
            if proto == "udp":
                reply = _base_reply(query)
                reply.header.tc = 1
                yield reply.pack()
            else:
                yield _truncated_full(query, behaviour).pack()
        case Silent():
            return
        case ServFail():
            yield _rcode_reply(query, RCODE.SERVFAIL).pack()
        case Refused():
            yield _rcode_reply(query, RCODE.REFUSED).pack()
        case Rcode():
            yield _rcode_reply(query, behaviour.rcode).pack()
        case NxDomain():
            reply = _base_reply(query)
            reply.header.rcode = RCODE.NXDOMAIN
            zone = behaviour.zone or _parent(str(query.q.qname))
            reply.add_auth(_soa(zone, behaviour.soa_ttl, behaviour.minimum))
            yield reply.pack()
        case WrongId():
            wrong = _answer(query, Answer())
            wrong.header.id = (query.header.id + 1) & 0xFFFF
            yield wrong.pack()
            if behaviour.then is not None:
                async for data in _replies(query, behaviour.then, proto):
                    yield data
        case WrongQuestion():
            other = DNSRecord(
                DNSHeader(id=query.header.id, qr=1, aa=1, ra=1, rd=query.header.rd),
                q=DNSQuestion(WRONG_QUESTION_NAME, query.q.qtype),
            )
            other.add_answer(RR(WRONG_QUESTION_NAME, QTYPE.A, ttl=60, rdata=A("192.0.2.66")))
            yield other.pack()
            if behaviour.then is not None:
                async for data in _replies(query, behaviour.then, proto):
                    yield data
        case Garbage():
            yield _garbage(query.header.id, behaviour.size)
            if behaviour.then is not None:
                async for data in _replies(query, behaviour.then, proto):
                    yield data
        case Unreadable():
            whole = _answer(query, Answer()).pack()
            yield whole[: len(whole) - 6]  # the A record's data cut short
        case Delay():
            await asyncio.sleep(behaviour.seconds)
            async for data in _replies(query, behaviour.then, proto):
                yield data


# --- the server -------------------------------------------------------------------------------


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(
        self,
        on_datagram: Callable[[asyncio.DatagramTransport, bytes, tuple[str, int]], None],
    ) -> None:
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._on_datagram(self._transport, data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors from clients that left
        pass


def _room_for_bursts(udp: socket.socket) -> None:
    """A receive buffer for a burst of thousands of queries, so that the fake, a Python thread
    on a loaded machine, is never what drops them: SO_RCVBUFFORCE past net.core.rmem_max as
    root, else as much as SO_RCVBUF is allowed."""
    try:
        udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
    except PermissionError:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)


class ScriptedUpstream:
    """A fake DNS server on UDP and TCP `host:port` (port 0: pick a free one)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, default: Behaviour | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.log = QueryLog()
        self._lock = threading.Lock()
        self._default: Behaviour = default if default is not None else Answer()
        self._by_name: dict[str, Behaviour] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.errors: list[Exception] = []  # exceptions of the fake while answering (its bugs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.max_packets_per_second: int | None = None  # None: no limit
        self._taken: deque[float] = deque()  # arrival times of the packets taken, last second

    # behaviour --------------------------------------------------------------------------------

    @property
    def default(self) -> Behaviour:
        with self._lock:
            return self._default

    @default.setter
    def default(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._default = behaviour

    def set(self, name: str, behaviour: Behaviour) -> None:
        """Behave as `behaviour` for queries for `name` (any case, any type)."""
        with self._lock:
            self._by_name[_norm(name)] = behaviour

    def unset(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(_norm(name), None)

    def behaviour_for(self, name: str) -> Behaviour:
        with self._lock:
            return self._by_name.get(_norm(name), self._default)

    # the log ----------------------------------------------------------------------------------

    def count(
        self, qname: str | None = None, proto: Proto | None = None, qtype: str | None = None
    ) -> int:
        return self.log.count(qname, proto, qtype)

    def queries(
        self, qname: str | None = None, proto: Proto | None = None, qtype: str | None = None
    ) -> list[QueryRecord]:
        return self.log.records(qname, proto, qtype)

    def wait_for(
        self,
        n: int,
        qname: str | None = None,
        proto: Proto | None = None,
        qtype: str | None = None,
        timeout: float = 5.0,
    ) -> bool:
        return self.log.wait_for(n, qname, proto, qtype, timeout)

    # address ----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """HOST:PORT, the form the sidecar's --upstream/--zone flags take."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # lifecycle --------------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                _room_for_bursts(udp)
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.port != 0:
                    raise
                continue
            self.port = port
            return udp, tcp
        raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")

    def start(self) -> ScriptedUpstream:
        if self._thread is not None:
            raise RuntimeError("already started")
        udp, tcp = self._bind()
        self._ready.clear()
        self._thread = threading.Thread(
            target=self._run, args=(udp, tcp), name=f"scripted-upstream-{self.port}", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError("scripted upstream failed to start") from self._error
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("scripted upstream thread did not stop")
        if self._error is not None:
            raise RuntimeError("scripted upstream failed") from self._error
        if self.errors:
            raise RuntimeError(
                f"scripted upstream failed to answer {len(self.errors)} queries"
            ) from self.errors[0]

    def __enter__(self) -> ScriptedUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, udp: socket.socket, tcp: socket.socket) -> None:
        try:
            asyncio.run(self._main(udp, tcp))
        except BaseException as exc:
            self._error = exc
        finally:
            udp.close()
            tcp.close()
            self._ready.set()

    async def _main(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self._on_udp),
            sock=udp,
        )
        server = await asyncio.start_server(self._serve_tcp, sock=tcp)
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            transport.close()
            await server.wait_closed()
            # Let the closing transports run their connection_lost callbacks.
            await asyncio.sleep(0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _over_limit(self, now: float) -> bool:
        """A packet arriving `now` is over max_packets_per_second (any one-second window)."""
        limit, taken = self.max_packets_per_second, self._taken
        if limit is None:
            return False
        while taken and taken[0] <= now - 1.0:
            taken.popleft()
        if len(taken) >= limit:
            return True
        taken.append(now)
        return False

    def _receive(self, data: bytes, proto: Proto) -> DNSRecord | None:
        at = time.monotonic()
        dropped = self._over_limit(at)
        try:
            query = DNSRecord.parse(data)
        except Exception:
            query = None
        if query is None or not query.questions:
            self.log.add(
                QueryRecord(proto, "", "", 0, False, None, False, bytes(data), at, dropped)
            )
            return None
        opt = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
        self.log.add(
            QueryRecord(
                proto=proto,
                qname=str(query.q.qname),
                qtype=QTYPE.get(query.q.qtype, str(query.q.qtype)),
                id=query.header.id,
                edns=bool(opt),
                payload=opt[0].rclass if opt else None,
                rd=bool(query.header.rd),
                raw=bytes(data),
                at=at,
                dropped=dropped,
            )
        )
        return None if dropped else query

    def _on_udp(
        self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str, int]
    ) -> None:
        query = self._receive(data, "udp")
        if query is not None:
            self._spawn(self._respond_udp(transport, query, addr))

    def _failed(self, query: DNSRecord, exc: Exception) -> None:
        """A bug of the fake itself: logged now, raised by stop()."""
        self.errors.append(exc)
        log.error("scripted upstream could not answer %s", query.q, exc_info=exc)

    async def _respond_udp(
        self, transport: asyncio.DatagramTransport, query: DNSRecord, addr: tuple[str, int]
    ) -> None:
        behaviour = self.behaviour_for(str(query.q.qname))
        try:
            async for data in _replies(query, behaviour, "udp"):
                if transport.is_closing():
                    return
                transport.sendto(data, addr)
        except Exception as exc:
            self._failed(query, exc)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                query = self._receive(data, "tcp")
                if query is not None:
                    pending.add(self._spawn(self._respond_tcp(writer, query)))
                    pending = {t for t in pending if not t.done()}
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            try:
                # The client is done sending; finish the replies still being worked on.
                if pending:
                    await asyncio.wait(pending)
            finally:
                writer.close()
                self._writers.discard(writer)

    async def _respond_tcp(self, writer: asyncio.StreamWriter, query: DNSRecord) -> None:
        behaviour = self.behaviour_for(str(query.q.qname))
        try:
            async for data in _replies(query, behaviour, "tcp"):
                if writer.is_closing():
                    return
                writer.write(struct.pack("!H", len(data)) + data)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        except Exception as exc:
            self._failed(query, exc)
