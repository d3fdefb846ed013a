"""The forwarder's transport on sockets (sidecar/forwarder.py's `Exchanges`): one UDP query
through a pool of long-lived sockets per server, or one TCP exchange. The decisions (which
server, how long, when to retry over TCP) are core/forwarding.py's; this module only sends,
matches and times out.

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
- Late replies: a query whose attempt has a linger, timed out, lingers (ID and socket kept)
  until its question's deadline, and a reply in that time is told too: the forwarder's next
  attempt has started meanwhile, and whichever answers first settles the question.
- A reply to a query that is over (answered, cancelled, its linger past) is dropped without a
  word, as it was when each query had a socket of its own (closed by then); only what matches
  nothing is counted as a mismatch.
- Sockets are plain non-blocking sockets read from `loop.add_reader`: made and closed without
  awaiting, no transport per socket; one wake-up reads every datagram waiting. Why not
  asyncio-dgram: its recv() does not wake up when the kernel reports ICMP port unreachable,
  so a refused attempt would cost the whole attempt timeout.

Deadlines: one timer for all the UDP queries of a transport (`Deadlines`), not a timer per
query. A query is its own handle: told (`then`), it releases its ID; cancelled, too. Queries
leave through one `Outbox` per transport, together at the end of the loop's turn.
Only a TCP exchange is a task.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable
from typing import Final

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt
from sidecar.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from sidecar.forwarder import Asker, Exchange

POOL_SOCKETS = 4  # sockets per upstream server kept open (more while many queries are in flight)
SOCKET_INFLIGHT = 64  # queries waiting on one socket at most: their replies fit its buffer
MAX_SOCKETS = 1024  # per upstream server: 65,536 queries in flight
SOCKET_QUERIES = 500  # a socket is retired after this many queries...
SOCKET_SECONDS = 5.0  # ...or this long after it was opened
RECENT_IDS = 256  # IDs of finished queries per socket: not reused, late replies dropped quietly
MAX_REPLY = 65535
_IDS = 256  # random IDs drawn from the OS CSPRNG at a time
SEND_EVERY = 32  # queries queued at most before the outbox sends them


class _Query:
    """One UDP query: the attempt it carries out, its ID, question, deadline, and whom its
    end is told (`then`, None once told). An attempt with a linger, timed out, lingers until
    `linger_until`: its ID and socket stay reserved, and a reply then is told to `late`. The
    query is its own handle: `cancel()` abandons it."""

    __slots__ = (
        "attempt",
        "deadline",
        "late",
        "linger_until",
        "lingering",
        "owner",
        "qid",
        "question",
        "then",
    )

    def __init__(
        self,
        owner: UpstreamSocket,
        qid: bytes,
        attempt: Attempt,
        question: bytes,
        asker: Asker,
        deadline: float,
    ) -> None:
        self.owner = owner
        self.qid = qid
        self.attempt = attempt
        self.question = question
        self.then: Asker | None = asker
        self.deadline = deadline
        linger = attempt.linger
        self.late: Asker | None = asker if linger else None
        self.linger_until = deadline + linger
        self.lingering = False

    @property
    def over(self) -> bool:
        """Told and not lingering: nothing more can come of it."""
        return self.then is None and not self.lingering

    def expire(self) -> bool:
        """The deadline came: time out (True: now lingering, queue it again), or end."""
        if self.lingering:  # the linger is over too
            self.lingering = False
            self.owner.finish(self)
            return False
        then = self.then
        if then is None:
            return False
        self.then = None
        linger = self.linger_until > self.deadline + Deadlines.EARLY
        if linger:
            self.lingering = True
            self.deadline = self.linger_until
        else:
            self.owner.finish(self)
        attempt = self.attempt
        error = UpstreamTimeout(f"{attempt.server}: no reply within {attempt.timeout:.2f}s")
        then.exchanged(attempt, None, error)
        return linger

    def answered(self, data: bytes) -> None:
        """The reply came (the owner has released the ID): to `then`, or late."""
        then, late = self.then, self.late
        self.then = self.late = None
        if self.lingering:
            self.lingering = False
            if late is not None:
                late.exchanged(self.attempt, data, None)
        elif then is not None:
            then.exchanged(self.attempt, data, None)

    def cancel(self) -> None:
        """Abandon the query: nothing more is told; its ID is released."""
        if self.over:
            return
        self.then = self.late = None
        self.lingering = False
        self.owner.finish(self)


class Deadlines:
    """When the UDP queries of one forwarder time out: one timer for all of them, instead of
    a timer (a libuv handle, made and cancelled) per query.

    Nearly every attempt gets the same timeout, so deadlines come in the order queries are
    sent: a FIFO. An attempt cut short by its question's deadline goes to a heap instead. A
    query that ends before its deadline stays queued (without its callbacks) until it reaches
    the head of the FIFO, where the socket's reads drop it (`drop_finished`: replies come
    mostly in the order queries went), or until the timer gets to it."""

    # A timer may fire up to a clock tick early (uvloop counts in milliseconds).
    EARLY: Final = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fifo: deque[_Query] = deque()
        self.heap: list[tuple[float, int, _Query]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.armed = math.inf

    def add(self, query: _Query) -> None:
        when = query.deadline
        self._queue(query)
        if when < self.armed:
            self._arm(when)

    def _queue(self, query: _Query) -> None:
        when = query.deadline
        fifo = self.fifo
        if not fifo or fifo[-1].deadline <= when:
            fifo.append(query)
        else:
            heapq.heappush(self.heap, (when, next(self.order), query))

    def drop_finished(self) -> None:
        """Drop the finished queries at the head of the FIFO now rather than at their deadline:
        kept an attempt timeout, a burst of misses left a `_Query` per miss for the collector
        to walk (30,000 of its 60,000 objects after 30,000 misses)."""
        fifo = self.fifo
        while fifo and fifo[0].over:
            fifo.popleft()

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
        lingering = []
        while fifo and (fifo[0].deadline <= due or fifo[0].over):
            query = fifo.popleft()
            if query.expire():
                lingering.append(query)
        while heap and (heap[0][0] <= due or heap[0][2].over):
            query = heapq.heappop(heap)[2]
            if query.expire():
                lingering.append(query)
        for query in lingering:
            self._queue(query)
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


class Outbox:
    """The UDP queries of one transport sent together, once per turn of the loop, instead of
    each as it is made: a send to a server that sleeps wakes it (on loopback, a wake-up of
    the other CPU in the send: 13% of the sidecar's CPU time with every query sent on its
    own), and queries sent back to back wake it once. A query made in one turn leaves at its
    end, or with SEND_EVERY others; its deadline counts from when it was made."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queued: list[tuple[UpstreamSocket, _Query, bytes]] = []

    def put(self, owner: UpstreamSocket, query: _Query, packet: bytes) -> None:
        queued = self.queued
        if not queued:
            self.loop.call_soon(self.flush)
        queued.append((owner, query, packet))
        if len(queued) >= SEND_EVERY:  # a long turn does not hold them
            self.flush()

    def flush(self) -> None:
        queued, self.queued = self.queued, []
        for owner, query, packet in queued:
            owner.transmit(query, packet)


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

    def send(self, attempt: Attempt, question: bytes, cd: bool, do: bool, asker: Asker) -> _Query:
        """Send a query for `attempt` (UDP); its end told to `asker` (the module's contract),
        never from within this call (a failed send raises UpstreamError instead)."""
        pending = self.pending
        recent = self.recent
        pool = self.pool
        qid = pool.new_id()
        while qid in pending or qid in recent:
            qid = pool.new_id()
        deadline = self.loop.time() + attempt.timeout
        query = _Query(self, qid, attempt, question, asker, deadline)
        pending[qid] = query
        self.sent += 1
        assert self.sock is not None  # a closed socket is never handed out
        pool.outbox.put(self, query, wire.query_packet(qid, question, cd, do))
        fifo = pool.deadlines.fifo
        if fifo and fifo[-1].deadline <= deadline:  # Deadlines.add's common case, inline:
            fifo.append(query)  # its timer is set for the head of the queue, or sooner
        else:
            pool.deadlines.add(query)
        return query

    def transmit(self, query: _Query, packet: bytes) -> None:
        """Send `query` now (from the outbox); a failure is told to it, or to every query on
        the socket when the socket reports an error (on the loop's next turn, either way)."""
        sock = self.sock
        if sock is None or query.over:
            return  # abandoned, or failed with its socket, meanwhile
        try:
            sock.send(packet)
        except BlockingIOError as exc:  # the send buffer is full: this query only
            then = query.then
            query.cancel()
            if then is not None:  # told on the loop's next turn: this may run inside a send
                error = UpstreamError(f"{self.pool.server}: {exc}")
                self.loop.call_soon(then.exchanged, query.attempt, None, error)
        except OSError as exc:  # an ICMP error reported on the send: the server's, for all
            self._error(exc)

    def finish(self, query: _Query) -> None:
        """`query` is over (answered, failed, timed out or cancelled, and not lingering)."""
        query.then = query.late = None  # the question they point to may go: it waits in Deadlines
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
                self.pool.deadlines.drop_finished()  # the replies just read
                return
            except OSError as exc:
                self._error(exc)
                return
            qid = data[:2]
            query = self.pending.get(qid)
            if query is not None and wire.reply_matches(data, qid, query.question):
                del self.pending[qid]
                recent = self.recent  # _remember(query), inline
                recent[qid] = query.question
                if len(recent) > RECENT_IDS:
                    del recent[next(iter(recent))]
                query.answered(data)
                if self.retired and not self.pending:
                    self.close()
            else:
                question = self.recent.get(qid)
                if question is None or not wire.reply_matches(data, qid, question):
                    self.pool.mismatch()
            sock = self.sock

    def _error(self, exc: OSError) -> None:
        """The socket reported an error: every query on it fails, and it is replaced."""
        server = self.pool.server
        kind = UpstreamUnreachable if isinstance(exc, ConnectionRefusedError) else UpstreamError
        self.fail(lambda: kind(f"{server}: {exc}"))

    def fail(self, error: Callable[[], UpstreamError]) -> None:
        """Every query waiting on this socket fails with `error()` (told on the loop's next
        turn: this may run inside another query's send); the socket is retired."""
        pending, self.pending = self.pending, {}
        for query in pending.values():
            query.lingering = False  # a late reply can no longer come
            then = query.then
            query.then = query.late = None
            if then is not None:
                self.loop.call_soon(then.exchanged, query.attempt, None, error())
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


class SocketPool:
    """The UDP sockets to one upstream server: see the module's docstring."""

    def __init__(
        self, server: HostPort, counters: Counters, deadlines: Deadlines, outbox: Outbox
    ) -> None:
        self.server = server
        self.name = str(server)
        self.counters = counters
        self.deadlines = deadlines
        self.outbox = outbox
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
        self.counters.upstream_error(self.name, "mismatch")

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
        raise UpstreamUnreachable(f"{server}: {exc}") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise UpstreamError(f"{server}: TCP: {exc!r}") from None
    finally:
        if writer is not None:
            writer.close()


class SocketExchanges:
    """The exchanges of a forwarder on sockets: a pool of UDP sockets per server, a TCP
    connection per TCP exchange."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.pools: dict[HostPort, SocketPool] = {}
        self.closed = False
        # Made with the first pool, on the loop; shared by every pool.
        self.deadlines: Deadlines | None = None
        self.outbox: Outbox

    def pool(self, server: HostPort) -> SocketPool:
        pool = self.pools.get(server)
        if pool is None:
            if self.deadlines is None:
                loop = asyncio.get_running_loop()  # once: it costs a getpid() call
                self.deadlines = Deadlines(loop)
                self.outbox = Outbox(loop)
            pool = self.pools[server] = SocketPool(
                server, self.counters, self.deadlines, self.outbox
            )
            if self.closed:
                pool.close()
        return pool

    def start(
        self, attempt: Attempt, question: bytes, cd: bool, do: bool, asker: Asker
    ) -> Exchange:
        """Carry out `attempt`: one query to its server, over UDP or TCP; its end told to
        `asker.exchanged` (sidecar/forwarder.py's contract), never from within this call
        (UpstreamError raised when it cannot even send). The handle's `cancel()` abandons
        it."""
        server = attempt.server
        pool = self.pools.get(server) or self.pool(server)
        loop = pool.deadlines.loop
        if not attempt.tcp:
            return pool.socket(loop).send(attempt, question, cd, do, asker)
        task = loop.create_task(
            tcp_exchange(
                server, question, cd=cd, do=do, timeout=attempt.timeout, mismatch=pool.mismatch
            )
        )

        def done(task: asyncio.Task[bytes]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is None:
                asker.exchanged(attempt, task.result(), None)
            elif isinstance(error, UpstreamError):
                asker.exchanged(attempt, None, error)
            else:
                asker.exchanged(attempt, None, UpstreamError(f"{server}: TCP: {error!r}"))

        task.add_done_callback(done)
        return task

    def close(self, *, now: bool = False) -> None:
        """Close the UDP sockets, each as soon as no query waits on it any more; queries still
        to come get sockets of their own. `now`: at once, failing the queries in flight."""
        self.closed = True
        for pool in self.pools.values():
            pool.close(now=now)
        if now and self.deadlines is not None:
            self.deadlines.clear()
