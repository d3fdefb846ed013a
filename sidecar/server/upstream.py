"""Talking to upstream servers: UDP through a pool of long-lived sockets, TCP, the retry loop.

Every exchange treats the reply as hostile (RFC 5452): a random 16-bit ID from the OS CSPRNG,
a random source port, and a reply is taken only when ID, QR and question match. Anything else
is counted and ignored; it never ends the wait early.

The UDP sockets (one `SocketPool` per upstream server):
- Each socket is connected to its server: the kernel picks a random source port, drops
  datagrams from any other address or port (a forger elsewhere never even wakes us up), and
  reports an ICMP port unreachable from the server as an error on the socket at once. That is
  why the pool is per server rather than one set of unconnected sockets for all.
- Queries share sockets and are told apart by ID (unique among a socket's queries in flight
  and its recently finished ones) and question. A socket takes at most `SOCKET_INFLIGHT`
  queries at a time (its receive buffer must hold their replies); the queries take the
  sockets in turn, at least `POOL_SOCKETS` are kept open, and more are opened while all are
  full (at most `MAX_SOCKETS`).
- A socket is retired after `SOCKET_QUERIES` queries or `SOCKET_SECONDS`, so source ports keep
  changing; and at once when it reports an error (ICMP unreachable, a failed send), which
  fails every query waiting on it (they all went to the same address and port). A retired
  socket takes no new query and is closed when its last one ends.
- A reply to a query that has given up (timed out, cancelled) or was answered already is
  dropped without a word, as it was when each query had a socket of its own (closed by then);
  only what matches nothing is counted as a mismatch.
- Sockets are plain non-blocking sockets read from `loop.add_reader`: made and closed without
  awaiting, no transport per socket; one wake-up reads every datagram waiting. Why not
  asyncio-dgram: its recv() does not wake up when the kernel reports ICMP port unreachable,
  so a refused attempt would cost the whole attempt timeout.

Deadlines: one timer for all the UDP queries of a forwarder (`Deadlines`), not a timer per
query. A question's way through the upstreams (`_Forwarding`) runs on the callbacks of its
attempts' futures: no task, no `wait_for`; only a truncated reply's TCP retry is a task.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import (
    BadUpstreamReply,
    FormError,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)

log = logging.getLogger("dns_sidecar")

POOL_SOCKETS = 4  # sockets per upstream server kept open (more while many queries are in flight)
SOCKET_INFLIGHT = 64  # queries waiting on one socket at most: their replies fit its buffer
MAX_SOCKETS = 1024  # per upstream server: 65,536 queries in flight
SOCKET_QUERIES = 500  # a socket is retired after this many queries...
SOCKET_SECONDS = 5.0  # ...or this long after it was opened
RECENT_IDS = 256  # IDs of finished queries per socket: not reused, late replies dropped quietly
MAX_REPLY = 65535
_IDS = 256  # random IDs drawn from the OS CSPRNG at a time


class _Query:
    """One UDP query: its ID, question, deadline, and the future its reply goes to (None
    once finished)."""

    __slots__ = ("deadline", "future", "qid", "question", "server", "timeout")

    def __init__(
        self,
        qid: bytes,
        question: bytes,
        future: asyncio.Future[bytes],
        server: HostPort,
        timeout: float,
        deadline: float,
    ) -> None:
        self.qid = qid
        self.question = question
        self.future: asyncio.Future[bytes] | None = future
        self.server = server
        self.timeout = timeout
        self.deadline = deadline

    def expire(self) -> None:
        future = self.future
        if future is not None and not future.done():
            message = f"{self.server}: no reply within {self.timeout:.2f}s"
            future.set_exception(UpstreamTimeout(message))


class Deadlines:
    """When the UDP queries of one forwarder time out: one timer for all of them, instead of
    a timer (a libuv handle, made and cancelled) per query.

    Nearly every attempt gets the same timeout, so deadlines come in the order queries are
    sent: a FIFO. An attempt cut short by its question's deadline goes to a heap instead. A
    query that ends before its deadline stays queued (without its future) until then, and is
    dropped when the timer gets to it: at most what is sent in one attempt timeout."""

    # A timer may fire up to a clock tick early (uvloop counts in milliseconds).
    EARLY = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fifo: deque[_Query] = deque()
        self.heap: list[tuple[float, int, _Query]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.armed = math.inf

    def add(self, query: _Query) -> None:
        when = query.deadline
        fifo = self.fifo
        if not fifo or fifo[-1].deadline <= when:
            fifo.append(query)
        else:
            heapq.heappush(self.heap, (when, next(self.order), query))
        if when < self.armed:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed = when
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.armed = math.inf
        due = self.loop.time() + self.EARLY
        fifo, heap = self.fifo, self.heap
        while fifo and (fifo[0].deadline <= due or fifo[0].future is None):
            fifo.popleft().expire()
        while heap and (heap[0][0] <= due or heap[0][2].future is None):
            heapq.heappop(heap)[2].expire()
        when = min(fifo[0].deadline if fifo else math.inf, heap[0][0] if heap else math.inf)
        if when < math.inf:
            self._arm(when)

    def clear(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.armed = math.inf
        self.fifo.clear()
        self.heap.clear()


class UpstreamSocket:
    """A connected UDP socket to one server, shared by the queries of its pool."""

    def __init__(self, pool: SocketPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        server = pool.server
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((server.host, server.port))  # UDP: no packet, a random source port
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.pending: dict[bytes, _Query] = {}
        self.recent: dict[bytes, bytes] = {}  # ID -> question of finished queries, oldest first
        self.sent = 0
        self.retire_at = loop.time() + SOCKET_SECONDS
        self.retired = False

    def send(
        self, question: bytes, *, cd: bool, do: bool, timeout: float
    ) -> tuple[_Query, asyncio.Future[bytes]]:
        """Send a query; its future gets the reply, or fails with UpstreamError (at once when
        the send fails, or after `timeout`). Call `finish` with it once done waiting."""
        loop = self.loop
        pending = self.pending
        recent = self.recent
        pool = self.pool
        qid = pool.new_id()
        while qid in pending or qid in recent:
            qid = pool.new_id()
        future: asyncio.Future[bytes] = loop.create_future()
        query = _Query(qid, question, future, pool.server, timeout, loop.time() + timeout)
        pool.deadlines.add(query)
        pending[qid] = query
        self.sent += 1
        sock = self.sock
        assert sock is not None  # a closed socket is never handed out
        try:
            sock.send(wire.build_query(int.from_bytes(qid, "big"), question, cd=cd, do=do))
        except BlockingIOError as exc:  # the send buffer is full: this query only
            future.set_exception(UpstreamError(f"{pool.server}: {exc}"))
        except OSError as exc:  # an ICMP error reported on the send: the server's, for all
            self._error(exc)
        return query, future

    def finish(self, query: _Query) -> None:
        """The waiter is done with `query` (answered, failed, timed out or cancelled)."""
        query.future = None
        if self.pending.pop(query.qid, None) is not None:  # not answered: a reply may come
            self._remember(query)
        if self.retired and not self.pending:
            self.close()

    def _remember(self, query: _Query) -> None:
        """The query is over: its ID is not reused for a while, and its replies are dropped."""
        recent = self.recent
        recent[query.qid] = query.question
        if len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]

    def _readable(self) -> None:
        sock = self.sock
        while sock is not None:  # every datagram waiting (this may close the socket)
            try:
                data = sock.recv(MAX_REPLY)
            except BlockingIOError:
                return
            except OSError as exc:
                self._error(exc)
                return
            qid = data[:2]
            query = self.pending.get(qid)
            if query is not None and wire.reply_matches(data, qid, query.question):
                del self.pending[qid]
                self._remember(query)
                future = query.future
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                question = self.recent.get(qid)
                if question is None or not wire.reply_matches(data, qid, question):
                    self.pool.mismatch()
            sock = self.sock

    def _error(self, exc: OSError) -> None:
        """The socket reported an error: every query on it fails, and it is replaced."""
        server = self.pool.server
        kind = UpstreamRefused if isinstance(exc, ConnectionRefusedError) else UpstreamError
        self.fail(lambda: kind(f"{server}: {exc}"))

    def fail(self, error: Callable[[], UpstreamError]) -> None:
        """Every query waiting on this socket fails with `error()`; the socket is retired."""
        for query in self.pending.values():
            future = query.future
            if future is not None and not future.done():
                future.set_exception(error())
        self.pending.clear()
        self.retire()

    def retire(self) -> None:
        """Take no new query; close when the last one ends."""
        if not self.retired:
            self.retired = True
            self.pool.retired(self)
        if not self.pending:
            self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.pool.closed_socket(self)
        if not self.loop.is_closed():
            self.loop.remove_reader(sock.fileno())
        sock.close()

    @property
    def port(self) -> int:
        """The local (source) port, for tests; 0 once closed."""
        return self.sock.getsockname()[1] if self.sock is not None else 0


class SocketPool:
    """The UDP sockets to one upstream server: see the module's docstring."""

    def __init__(self, server: HostPort, metrics: Counters, deadlines: Deadlines) -> None:
        self.server = server
        self.name = str(server)
        self.metrics = metrics
        self.deadlines = deadlines
        self.live: list[UpstreamSocket] = []
        self.retiring: set[UpstreamSocket] = set()  # retired, still open
        self.turn = 0
        self.closed = False
        self._ids = b""
        self._next = 0

    def new_id(self) -> bytes:
        """A random 16-bit ID from the OS CSPRNG (drawn a few hundred at a time)."""
        at = self._next
        if at >= len(self._ids):
            self._ids, at = os.urandom(2 * _IDS), 0
        self._next = at + 2
        return self._ids[at : at + 2]

    def socket(self, loop: asyncio.AbstractEventLoop) -> UpstreamSocket:
        """The socket for the next query: the live ones in turn, skipping full ones; retired
        when due; a new one when there are fewer than POOL_SOCKETS or all are full."""
        live = self.live
        if len(live) >= POOL_SOCKETS and not self.closed:
            now = loop.time()
            for _ in range(len(live)):
                self.turn += 1
                sock = live[self.turn % len(live)]
                if sock.sent >= SOCKET_QUERIES or now >= sock.retire_at:
                    sock.retire()  # leaves `live`
                    if len(live) < POOL_SOCKETS:
                        break  # replaced below
                    continue  # the pool shrinks back after a burst
                if len(sock.pending) < SOCKET_INFLIGHT:
                    return sock
        if len(live) >= MAX_SOCKETS:
            raise UpstreamError(f"{self.server}: too many queries in flight")
        try:
            sock = UpstreamSocket(self, loop)
        except OSError as exc:
            raise UpstreamError(f"{self.server}: {exc}") from None
        if self.closed:
            sock.retired = True  # closed once its only query ends
            self.retiring.add(sock)
        else:
            live.append(sock)
        return sock

    def retired(self, sock: UpstreamSocket) -> None:
        """`sock` takes no new query; it stays open until its last one ends."""
        if sock in self.live:
            self.live.remove(sock)
        self.retiring.add(sock)

    def closed_socket(self, sock: UpstreamSocket) -> None:
        self.retiring.discard(sock)

    def mismatch(self) -> None:
        self.metrics.upstream_error(self.name, "mismatch")

    def close(self, *, now: bool = False) -> None:
        """Retire every socket (each closes when its last query ends); later queries get a
        socket of their own, closed after them. `now`: close all at once, failing the
        queries on them."""
        self.closed = True
        for sock in list(self.live):
            sock.retire()
        if now:
            server = self.server
            for sock in list(self.retiring):
                sock.fail(lambda: UpstreamError(f"{server}: shutting down"))
                sock.close()


async def tcp_exchange(
    server: HostPort,
    question: bytes,
    *,
    cd: bool,
    do: bool,
    timeout: float,
    mismatch: Callable[[], None],
) -> bytes:
    qid = secrets.randbits(16)
    query = wire.build_query(qid, question, cd=cd, do=do)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(wire.frame(query))
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(size)
                if wire.reply_matches(reply, query[:2], question):
                    return reply
                mismatch()
    except TimeoutError:
        raise UpstreamTimeout(f"{server}: no TCP reply within {timeout:.2f}s") from None
    except ConnectionRefusedError as exc:
        raise UpstreamRefused(f"{server}: {exc}") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise UpstreamError(f"{server}: TCP: {exc!r}") from None
    finally:
        if writer is not None:
            writer.close()


class _Forwarding:
    """One question's way through a zone's upstreams (see `Forwarder.forward`), driven by the
    callbacks of its attempts: no task and no coroutine per question or attempt."""

    __slots__ = (
        "attempt",
        "cd",
        "deadline",
        "do",
        "fallback",
        "forwarder",
        "last_error",
        "loop",
        "order",
        "pool",
        "query",
        "question",
        "result",
        "sent",
        "server",
        "sock",
        "tcp",
        "timed_out",
        "upstreams",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        question: bytes,
        upstreams: UpstreamSet[HostPort],
        cd: bool,
        do: bool,
        deadline: float,
    ) -> None:
        self.forwarder = forwarder
        self.loop = loop = asyncio.get_running_loop()
        self.question = question
        self.upstreams = upstreams
        self.cd = cd
        self.do = do
        self.deadline = deadline
        self.order = upstreams.order()
        self.attempt = 0
        self.timed_out = False  # in this round
        self.fallback: tuple[bytes, wire.Reply] | None = None
        self.last_error: UpstreamError | None = None
        self.result: asyncio.Future[tuple[bytes, wire.Reply]] = loop.create_future()
        self.server: HostPort | None = None
        self.pool: SocketPool | None = None
        self.sock: UpstreamSocket | None = None
        self.query: _Query | None = None
        self.tcp: asyncio.Task[bytes] | None = None
        self.sent = 0.0
        self.next()

    def next(self) -> None:
        """Start the next attempt; or end, when the deadline has passed or a round went by in
        which no attempt timed out."""
        loop = self.loop
        order = self.order
        forwarder = self.forwarder
        while self.deadline - loop.time() > 0.001 and not forwarder.stopped:
            attempt = self.attempt
            if attempt and attempt % len(order) == 0:
                if not self.timed_out:
                    break
                self.timed_out = False
            server = order[attempt % len(order)]
            self.attempt = attempt + 1
            self.server = server
            self.sent = perf_counter()  # loop.time() is millisecond-grained under uvloop
            try:
                self.pool = pool = forwarder.pool(server)
                self.sock = sock = pool.socket(loop)
                timeout = min(forwarder.attempt_timeout, self.deadline - loop.time())
                self.query, future = sock.send(
                    self.question, cd=self.cd, do=self.do, timeout=timeout
                )
            except UpstreamError as exc:
                self.failed(server, exc)
                continue
            future.add_done_callback(self.udp_done)
            return
        if self.fallback is not None:
            self.result.set_result(self.fallback)
        else:
            self.result.set_exception(
                self.last_error or UpstreamTimeout("no time left for any attempt")
            )

    def udp_done(self, future: asyncio.Future[bytes]) -> None:
        sock, query, pool, server = self.sock, self.query, self.pool, self.server
        assert sock is not None and query is not None and pool is not None and server is not None
        sock.finish(query)
        self.query = None
        result = self.result
        if result.done():  # abandoned
            return
        try:
            msg = self.reply_of(server, future)
            if msg is None:
                return
            if msg[2] & wire.TC:
                self.forwarder.metrics.upstream_error(pool.name, "truncated")
                self.tcp = self.loop.create_task(
                    tcp_exchange(
                        server,
                        self.question,
                        cd=self.cd,
                        do=self.do,
                        timeout=max(self.deadline - self.loop.time(), 0.001),
                        mismatch=pool.mismatch,
                    )
                )
                self.tcp.add_done_callback(self.tcp_done)
                return
            self.answered(server, msg)
        except asyncio.CancelledError:
            result.cancel()
        except Exception as exc:  # a bug: the waiters learn of it
            if not result.done():
                result.set_exception(exc)

    def tcp_done(self, task: asyncio.Task[bytes]) -> None:
        self.tcp = None
        server = self.server
        assert server is not None
        result = self.result
        if task.cancelled():
            result.cancel()
            return
        if result.done():  # abandoned
            task.exception()
            return
        try:
            msg = self.reply_of(server, task)
            if msg is not None:
                self.answered(server, msg)
        except Exception as exc:  # a bug: the waiters learn of it
            if not result.done():
                result.set_exception(exc)

    def reply_of(self, server: HostPort, exchange: asyncio.Future[bytes]) -> bytes | None:
        """What a finished exchange with `server` brought: its reply, or None when it failed
        (the failure counted and the next attempt begun)."""
        try:
            return exchange.result()
        except UpstreamError as exc:
            self.failed(server, exc)
            self.next()
            return None

    def answered(self, server: HostPort, msg: bytes) -> None:
        """A reply: used, or kept as the fallback while another upstream is still to ask."""
        try:
            reply = wire.parse_reply(msg)
        except FormError as exc:
            self.failed(server, BadUpstreamReply(f"{server}: unreadable reply: {exc}"))
            self.next()
            return
        rtt = perf_counter() - self.sent
        forwarder, upstreams, pool = self.forwarder, self.upstreams, self.pool
        assert pool is not None
        forwarder.metrics.upstream_reply(pool.name, reply.rcode, rtt)
        if reply.rcode == wire.REFUSED:
            forwarder._failed(upstreams, server, "refused")  # misconfigured for us
        elif upstreams.answered(server, rtt):
            log.info("upstream up", extra={"fields": {"upstream": str(server)}})
        if reply.rcode in (wire.SERVFAIL, wire.REFUSED) and self.attempt < len(self.order):
            self.fallback = (msg, reply)
            self.next()
            return
        self.result.set_result((msg, reply))

    def failed(self, server: HostPort, exc: UpstreamError) -> None:
        self.last_error = exc
        if self.forwarder.stopped:  # shutting down: no fault of the upstream's
            return
        self.forwarder.metrics.upstream_error(str(server), exc.reason)
        self.forwarder._failed(self.upstreams, server, exc.reason)
        self.timed_out |= isinstance(exc, UpstreamTimeout)

    def abandon(self) -> None:
        """Nobody waits any more: end the attempt in flight."""
        future = self.query.future if self.query is not None else None
        if future is not None:
            future.cancel()  # udp_done releases the query
        if self.tcp is not None:
            self.tcp.cancel()


@dataclass
class Forwarder:
    """Sends a question to a zone's upstreams until one answers or the deadline passes."""

    attempt_timeout: float
    metrics: Counters
    pools: dict[HostPort, SocketPool] = field(default_factory=dict, init=False, repr=False)
    closed: bool = field(default=False, init=False)
    stopped: bool = field(default=False, init=False)  # closed at shutdown: no new attempts
    deadlines: Deadlines | None = field(default=None, init=False, repr=False)

    def pool(self, server: HostPort) -> SocketPool:
        pool = self.pools.get(server)
        if pool is None:
            if self.deadlines is None:
                self.deadlines = Deadlines(asyncio.get_running_loop())
            pool = self.pools[server] = SocketPool(server, self.metrics, self.deadlines)
            if self.closed:
                pool.close()
        return pool

    async def exchange(
        self, server: HostPort, question: bytes, *, cd: bool, do: bool, deadline: float
    ) -> tuple[bytes, wire.Reply]:
        """One attempt at one server: UDP, then TCP with what remains if the reply was
        truncated; the reply walked. Raises UpstreamError."""
        loop = asyncio.get_running_loop()
        pool = self.pool(server)
        sock = pool.socket(loop)
        query, future = sock.send(
            question, cd=cd, do=do, timeout=min(self.attempt_timeout, deadline - loop.time())
        )
        try:
            msg = await future
        finally:
            sock.finish(query)
        if msg[2] & wire.TC:
            self.metrics.upstream_error(pool.name, "truncated")
            msg = await tcp_exchange(
                server,
                question,
                cd=cd,
                do=do,
                timeout=max(deadline - loop.time(), 0.001),
                mismatch=pool.mismatch,
            )
        try:
            return msg, wire.parse_reply(msg)
        except FormError as exc:
            raise BadUpstreamReply(f"{server}: unreadable reply: {exc}") from None

    def start(
        self,
        question: bytes,
        upstreams: UpstreamSet[HostPort],
        *,
        cd: bool,
        do: bool,
        deadline: float,
    ) -> asyncio.Future[tuple[bytes, wire.Reply]]:
        """`forward` without a coroutine: the future of its outcome."""
        return _Forwarding(self, question, upstreams, cd, do, deadline).result

    async def forward(
        self,
        question: bytes,
        upstreams: UpstreamSet[HostPort],
        *,
        cd: bool,
        do: bool,
        deadline: float,
    ) -> tuple[bytes, wire.Reply]:
        """The first usable reply. Each attempt gets min(attempt_timeout, what remains) and
        failures move on to the next upstream in the set's order, round and round until the
        deadline; SERVFAIL or REFUSED from one upstream moves on while one is not yet asked.
        A round in which no attempt timed out (every upstream refused or sent garbage) ends
        the query: asking again at once would only hammer a server that is restarting."""
        forwarding = _Forwarding(self, question, upstreams, cd, do, deadline)
        try:
            return await forwarding.result
        except asyncio.CancelledError:
            forwarding.abandon()
            raise

    def close(self, *, now: bool = False) -> None:
        """Close the UDP sockets, each as soon as no query waits on it any more; queries still
        to come (in flight at a reload) get sockets of their own. `now` (at shutdown): at
        once, failing the queries in flight, and no further attempts."""
        self.closed = True
        self.stopped |= now
        for pool in self.pools.values():
            pool.close(now=now)
        if now and self.deadlines is not None:
            self.deadlines.clear()

    @staticmethod
    def _failed(upstreams: UpstreamSet[HostPort], server: HostPort, reason: str) -> None:
        if upstreams.failed(server):
            log.warning(
                "upstream down", extra={"fields": {"upstream": str(server), "reason": reason}}
            )

    async def probe(self, server: HostPort, question: bytes) -> float:
        """One probe query; its round-trip time, or UpstreamError. Any reply counts."""
        loop = asyncio.get_running_loop()
        sent = perf_counter()
        await self.exchange(
            server, question, cd=False, do=False, deadline=loop.time() + self.attempt_timeout
        )
        return perf_counter() - sent


async def probe_down_upstreams(
    forwarder: Forwarder,
    sets: Sequence[UpstreamSet[HostPort]],
    question: bytes,
    interval: float,
) -> None:
    """Forever: every `interval`, ask each down upstream `question`; an answer marks it up."""

    async def probe_one(upstreams: UpstreamSet[HostPort], server: HostPort) -> None:
        try:
            rtt = await forwarder.probe(server, question)
        except UpstreamError:
            return
        if upstreams.answered(server, rtt):
            log.info("upstream up", extra={"fields": {"upstream": str(server), "by": "probe"}})

    while True:
        await asyncio.sleep(interval)
        probes = [probe_one(ups, server) for ups in sets for server in ups.down()]
        if probes:
            await asyncio.gather(*probes)
