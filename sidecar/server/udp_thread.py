"""A thread that reads a UDP listening socket and answers cache hits itself.

Why: uvloop's datagram path (epoll wake-up, transport, protocol call, transport send) costs
about 4 us of CPU per query, a quarter of a cache hit (bench/results/ceiling.md); a thread
blocked in the socket does not pay it, and reading and answering many datagrams per system
call saves ~2 us more.

Theory of operation
- The socket is blocking. The thread reads it in batches (server/datagram_batch.py: one
  recvmmsg takes every datagram waiting, up to 32; with none waiting, a plain recvfrom
  blocks until one comes and it is served alone, its reply sent with a plain sendto) and
  hands each batch to `serve` (DatagramBatch.server's closure, bound by server/udp.py),
  looked up per batch, so a rebind (draining, reload) applies to the next batch. Queries with
  a current fast-path row are answered there, in the thread, and so are hits on a cache entry
  that can be served as it is (`FastPath.answer_cold`: parsed, looked up and rendered in the
  thread; names asked less than once a second have no row), their replies in sendmmsg calls.
- Anything else (a miss, a refresh due, a shaped or rotated answer, bad input, a client not
  judged yet) must run on the event loop: the cache's writes, the miss path and the metrics
  belong to it. A batch with a few such datagrams (at most HAND_OVER_AT: a miss among hits)
  *hands them over* (`lend`): the loop is asked to run them, and the thread goes on with the
  next batch. With more, or while MAX_HANDED handed over wait for the loop (it cannot keep
  up: the thread must wait), the thread *lends the socket* to the loop, with those
  datagrams, and parks until it is given back. The loop handles them, then reads the socket
  itself, with MSG_DONTWAIT, in batches of LOOP_BATCH through its own hot path
  (`loop_receive`). After a batch in which few datagrams needed the slow path (at most
  GIVE_BACK_AT), or when the socket is empty, it gives the socket back. Between batches its
  timers and other I/O run.
- Why hand over a few: lent for one miss, the socket stayed with the loop for LOOP_BATCH
  datagrams, and with 5% misses most hits were answered there, one system call each way
  (QPS with 5% misses 0.54x dnsmasq; handed over, 0.62x: bench.mixed).
- Why gather them: handed over batch by batch, each miss woke the loop on its own (its
  thread, the GIL, a send upstream, the reply, the answer: 1.6 context switches and ~22 us
  of system time per miss at 5% misses). While its batches come full (more is waiting: the
  socket keeps it busy), the thread gathers them over batches (HAND_OVER_EVERY, at most
  HAND_OVER_WAIT), and with some gathered it looks for more without waiting; a batch that is
  not full hands them over at once, so a miss at less than full load waits for nothing.
  Gathered: 0.4 context switches per miss, 0.68x -> 0.78x dnsmasq (bench.mixed).
- Why lend the many rather than queue them: two threads taking turns on one GIL per datagram
  cost ~1.5 context switches and a futex call per query. With 100,000 names asked in turn (no
  rows) that took 11 us per query on top of the work. Lent, the loop reads with no thread to
  wake, and traffic that needs the loop stays on it.
- The loop sends on the socket with MSG_DONTWAIT (`sendto`), the replies of one turn of the
  loop together at its end (or LOOP_FLUSH_EVERY at a time): a full socket buffer drops that
  reply (counted as dropped, overload) instead of stalling the loop.
- Stopping: a flag, the parked thread woken, then shutdown(SHUT_RD) on the socket, which wakes
  a blocked read (Linux does this for unconnected UDP sockets too, after saying ENOTCONN).
- The loop's long work goes in turns (`in_turns`), and between two turns the loop sleeps
  GIL_HANDOVER. A thread woken by a datagram while the loop runs Python waits for the GIL;
  the loop drops it only in a system call, and takes it back when the call returns. The
  loop's poll between callbacks returns at once when more are ready (and sched_yield at once
  when the thread waits on another CPU): the loop wins the GIL again before the thread has
  woken, and the thread waits out the interpreter's switch interval (5 ms). A bucket of 1,000
  rows refreshed ahead in 32 turns did just that once a second: 3-5 ms answers at half load
  (bench/NOTES.md). A sleep lets a waiting thread take the GIL on any CPU; with no thread
  waiting, it costs the loop that much wall time and no CPU.

Who owns what (no locks; each shared object is read or written with single operations that
CPython's GIL, and a free-threaded build's per-object locking, keep whole):
- The thread writes only its own things: the batch's buffers and admission memory (inside
  `serve`), and one `FastPath.hand_off` per batch with rows served (and one `hand_off_cold`
  with hits answered from entries): a `deque.append` of (rows, seconds), atomic in CPython and
  thread-safe in free-threaded builds, and when the backlog passes a mark,
  `loop.call_soon_threadsafe(FastPath.drain)`. It never writes a row, an entry, a FastPath
  field or a counter; the loop counts what it hands off, marks those entries used and makes
  their rows (FastPath.drain).
- The thread reads: `serve` and `_closing` (attribute loads), the row table, the cache's
  entries, the rotated pools, the prefetches started and the admission verdicts (single dict
  and set lookups), of an entry its slots (an entry is never written once made), and of a row
  `valid_until`, `tail` and `next_tail` (slot loads). The loop replaces those with single
  stores, so the thread sees the old value or the new one; during a refresh it may pair a
  new tail with the old `valid_until`, which is as right as either (a refresh never makes a
  tail wrong before the old moment). For a shaped row it calls `next_tail()`, an
  itertools.cycle's `__next__`, which the loop calls too: under the GIL that is one C call;
  a free-threaded build may hand two callers the same variant, which only skews the
  rotation.
- The loop owns everything else: the rows and their counts, FastPath, Counters, `slow`,
  `taken`, and `sendto` (sends from the loop, and its `dropped` count); the thread `handed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sidecar.server.datagram_batch import SIZE as BATCH_SIZE
from sidecar.server.datagram_batch import SLOT, Address, BatchServer, DatagramBatch

log = logging.getLogger("dns_sidecar")

# A query is a header, one question and an OPT record: well under this. A longer datagram is
# cut here and then fails to parse (counted as malformed), which is what it deserves.
MAX_QUERY = SLOT  # as the thread's batches cut it
JOIN_SECONDS = 2.0
LOOP_BATCH = 64  # datagrams the loop reads before it lets its other callbacks run
GIVE_BACK_AT = 8  # a lent socket goes back after a batch with at most this many slow ones
HAND_OVER_AT = GIVE_BACK_AT  # a batch with at most this many slow ones hands them over, unlent
MAX_HANDED = 256  # datagrams handed over that the loop has not taken yet; beyond, lend and wait
# While more datagrams keep coming, the few for the loop are gathered over batches and handed
# over together: HAND_OVER_EVERY of them, or after HAND_OVER_WAIT, or when the socket is empty
# (below full load, a datagram for the loop waits for nothing). With 5% misses at full load,
# 16 / 1 ms woke the loop 0.4 times per miss; 32 / 2 ms 0.2 times, 4.8 us of CPU per query
# instead of 5.1 (bench/NOTES.md); 64 / 4 ms bought nothing more.
HAND_OVER_EVERY = 32
HAND_OVER_WAIT = 0.002  # seconds
LOOP_FLUSH_EVERY = 32  # replies the loop holds at most before it sends them
# Seconds the loop sleeps between two turns of its long work (`in_turns`): a reader thread
# waiting for the GIL takes it then. Timer slack makes it ~75 us here (bench/NOTES.md).
GIL_HANDOVER = 20e-6

Receiver = Callable[[bytes, Address], None]


def _ignore(*_args: Any) -> None:
    pass


def in_turns(turn: Callable[[], bool], loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """A loop callback that runs `turn` (True: more to do) until it says done, one turn per
    callback, the other callbacks between, and the GIL handed to a waiting reader thread
    before each next turn (GIL_HANDOVER, see above)."""

    def run() -> None:
        if turn():
            time.sleep(GIL_HANDOVER)
            loop.call_soon(run)

    return run


class UdpReaderThread:
    """The listener's transport when a thread reads its socket: `sendto`, `is_closing` and
    `close`, as the loop side of the listener uses them."""

    def __init__(self, sock: socket.socket, name: str, dropped: dict[str, int]) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.batch = DatagramBatch(sock)
        self.name = name
        self.dropped = dropped  # Counters.dropped: a reply not sent is counted as overload
        # The hot paths, set again by the listener whenever one of their parts changes.
        self.serve: BatchServer = _ignore  # the thread's
        self.loop_receive: Receiver = _ignore  # the loop's, while the socket is lent to it
        self.slow = 0  # datagrams of the current loop batch that took the slow path
        self._closing = False
        self._thread: threading.Thread | None = None
        self._given_back = threading.Event()
        self._wake: Callable[..., object] = _ignore
        self._soon: Callable[..., object] = _ignore
        self._outbox: list[tuple[bytes, Any]] = []  # the loop's replies of this turn
        # Datagrams handed over without lending: counted by the thread, taken by the loop.
        self.handed = 0  # written by the thread only
        self.taken = 0  # written by the loop only
        # The thread's: datagrams gathered for the loop, since when, and for which slow path.
        self._gathered: list[Any] = []
        self._gathered_at = 0.0
        self._gathered_for: Callable[[list[Any]], None] = _ignore

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read datagrams until close(); the hot paths are looked up per batch, as the
        listener sets them again whenever one of their parts changes."""
        self._wake, self._soon = loop.call_soon_threadsafe, loop.call_soon
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        receive, clock = self.batch.receive, time.monotonic
        while not self._closing:
            try:
                gathered = self._gathered
                count = receive(not gathered)  # gathering: no wait, the loop's are due then
                if self._closing:
                    break  # woken by close(): not served
                if count:
                    self.serve(count)
                gathered = self._gathered
                if gathered and (
                    count < BATCH_SIZE  # the socket emptied: nothing more is coming now
                    or len(gathered) >= HAND_OVER_EVERY
                    or clock() - self._gathered_at >= HAND_OVER_WAIT
                ):
                    self._hand_over()
            except RuntimeError:
                break  # the loop is closed: nothing can serve the rest
            except Exception:
                log.exception("UDP reader: batch failed")

    def lend(self, slow_path: Callable[[list[Any]], None], datagrams: list[Any]) -> None:
        """From the thread: have the loop call `slow_path(datagrams)`. A few (HAND_OVER_AT at
        most, while fewer than MAX_HANDED wait for the loop) are gathered and handed over
        (`_run` says when) while the thread goes on with the next batch; more, and the loop
        reads the socket itself after them until it gives it back, the thread waiting for
        that here."""
        if len(datagrams) <= HAND_OVER_AT and self.handed - self.taken < MAX_HANDED:
            if not self._gathered:
                self._gathered_at = time.monotonic()
            self._gathered += datagrams
            self._gathered_for = slow_path
            return
        self._hand_over()  # what was gathered goes first
        self._wake(self._on_loop, slow_path, (datagrams,))
        self._given_back.wait()
        self._given_back.clear()

    def _hand_over(self) -> None:
        """From the thread: the datagrams gathered, to the loop's slow path."""
        gathered, self._gathered = self._gathered, []
        if gathered:
            self.handed += len(gathered)
            self._wake(self._take, self._gathered_for, gathered)

    def _take(self, slow_path: Callable[[list[Any]], None], datagrams: list[Any]) -> None:
        self.taken += len(datagrams)
        slow_path(datagrams)

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
        """Send from the loop: never blocks, never raises. The replies made in one turn of
        the loop leave together at its end, or LOOP_FLUSH_EVERY at a time (`_flush`): sent each as
        it was made, between a miss's other work, every reply woke the client anew (on
        loopback, a wake-up of the other CPU inside the send)."""
        if self._closing:
            self.dropped["overload"] += 1
            return
        outbox = self._outbox
        if not outbox:
            self._soon(self._flush)
        outbox.append((data, addr))
        if len(outbox) >= LOOP_FLUSH_EVERY:  # a long turn does not hold them all
            self._flush()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        sendto = self.sock.sendto
        for data, addr in outbox:
            try:
                sendto(data, socket.MSG_DONTWAIT, addr)
            except OSError:  # a full buffer (or closed): that reply is lost, counted
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
