"""The UDP reader thread on a real loopback socket: rows answered in the thread, everything
else on the event loop, exact counts, draining, and a prompt stop."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_network
from typing import Any

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.access import ClientFilter
from sidecar.core.counters import Counters
from sidecar.server import datagram_batch, sockets
from sidecar.server.udp import UdpListener
from sidecar.server.udp_thread import UdpReaderThread, in_turns
from tests.listener_parts import cache_resolver

pytestmark = pytest.mark.skipif(not datagram_batch.available(), reason="Linux only")


def query(name: str, qid: int) -> bytes:
    record = DNSRecord.question(name)
    record.header.id = qid
    return bytes(record.pack())


class Served:
    """A listener reading its socket in a thread, and a client socket connected to it."""

    def __init__(self, listener: UdpListener, reader: UdpReaderThread) -> None:
        self.listener = listener
        self.reader = reader
        self.loop_sends = 0  # replies sent by the event loop, not the reader thread
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.setblocking(False)
        self.client.connect(reader.sock.getsockname())

    def store(self, name: str, address: str) -> None:
        reply = DNSRecord.question(name).reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=60))
        msg = bytes(reply.pack())
        q = wire.parse_query(query(name, 1))
        self.listener.resolver.cache.store(
            q.key, msg, wire.parse_reply(msg), time.monotonic(), False
        )

    async def with_row(self, name: str, address: str) -> None:
        """`name` cached and asked twice (answered from its entry): a fast-path row now, and
        both hits counted (the thread hands them over after its replies)."""
        hits = self.listener.metrics.cache_hits[0]
        self.store(name, address)
        await self.ask(query(name, 1))
        await self.ask(query(name, 2))
        await self.counted(hits + 2)

    async def counted(self, hits: int) -> None:
        """Wait until `hits` cache hits are counted: the thread hands a batch's rows to the
        loop after its send, so the last reply may arrive before its batch is handed over.
        Then the rows admitted are made, as the loop's turns after a backlog make them."""
        metrics = self.listener.metrics
        deadline = time.monotonic() + 2.0
        self.listener.fast.flush()  # what a scrape does first
        while metrics.cache_hits[0] < hits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            self.listener.fast.flush()
        while self.listener.fast.drain_turn(self.listener.resolver.clock()):
            pass

    async def ask(self, data: bytes, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.client, data)
        return await asyncio.wait_for(loop.sock_recv(self.client, 4096), timeout)


@asynccontextmanager
async def served(clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Served]:
    metrics = Counters()
    resolver = cache_resolver(metrics, upstream_port=9, clock=clock)
    listener = UdpListener(resolver, metrics)
    reader = UdpReaderThread(sockets.udp_socket("127.0.0.1", 0), "udp test", metrics.dropped)
    state = Served(listener, reader)
    loop_send = reader.sendto

    def counted(data: bytes, addr: Any) -> None:
        assert threading.current_thread() is threading.main_thread()
        state.loop_sends += 1
        loop_send(data, addr)

    reader.sendto = counted  # type: ignore[method-assign]
    listener.read_in_thread(reader, asyncio.get_running_loop())
    try:
        yield state
    finally:
        reader.close()
        state.client.close()


def allow(listener: UdpListener, network: str) -> None:
    """What a reload that changes `allow` does."""
    access = ClientFilter([ip_network(network)])
    listener.configure(listener.resolver, access=access, limiter=None, max_pending=4096)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


def test_rows_are_answered_in_the_thread_and_counted_exactly() -> None:
    async def main() -> None:
        async with served() as s:
            s.store("a.example", "192.0.2.1")
            for qid in range(1, 101):
                reply = DNSRecord.parse(await s.ask(query("a.example", qid)))
                assert reply.header.id == qid and str(reply.rr[0].rdata) == "192.0.2.1"
            # All by the reader thread: from the cache entry until the loop, counting those
            # hits, made the row (the second hit within a second), then from the row.
            assert s.loop_sends == 0
            metrics = s.listener.metrics
            await s.counted(100)
            assert len(s.listener.fast) == 1
            assert metrics.cache_hits[0] == 100
            assert metrics.requests["udp"][QTYPE.A] == 100
            assert sum(metrics.durations["cache"].counts) == 100

    run(main)


def test_a_slow_batch_lands_in_the_histogram_bucket_of_its_time() -> None:
    slow = threading.Event()

    def clock() -> float:
        if slow.is_set() and threading.current_thread() is not threading.main_thread():
            time.sleep(0.003)  # each of the thread's batches takes 3 ms or more
        return time.monotonic()

    async def main() -> None:
        async with served(clock) as s:
            await s.with_row("a.example", "192.0.2.1")
            histogram = s.listener.metrics.durations["cache"]
            s.listener.fast.flush()
            before, total_before = list(histogram.counts), histogram.total
            slow.set()
            for qid in range(3, 8):
                await s.ask(query("a.example", qid))
            await s.counted(7)
            assert s.listener.metrics.cache_hits[0] == 7
            added = [after - was for after, was in zip(histogram.counts, before, strict=True)]
            assert sum(added) == 5 and added[0] == 0
            assert sum(added[histogram.bounds.index(0.0025) :]) == 5
            assert histogram.total - total_before >= 5 * 0.003

    run(main)


def test_a_client_no_longer_allowed_is_refused_by_the_thread_too() -> None:
    async def main() -> None:
        async with served() as s:
            s.store("a.example", "192.0.2.1")
            listener = s.listener
            allow(listener, "127.0.0.0/8")
            for qid in range(1, 5):
                reply = DNSRecord.parse(await s.ask(query("a.example", qid)))
                assert reply.header.rcode == wire.NOERROR
            assert s.loop_sends == 1  # the loop judged the client at the first; then the thread
            allow(listener, "10.0.0.0/8")
            reply = DNSRecord.parse(await s.ask(query("a.example", 5)))
            assert reply.header.rcode == wire.REFUSED
            assert listener.metrics.dropped["refused"] == 1

    run(main)


def test_bad_input_goes_to_the_loop_and_the_thread_carries_on() -> None:
    async def main() -> None:
        async with served() as s:
            await s.with_row("a.example", "192.0.2.1")
            bad = query("a.example", 3)[:14]  # cut inside the question
            formerr = await s.ask(bad)
            assert formerr[:2] == bad[:2] and formerr[3] & 0x0F == wire.FORMERR
            empty = b""  # an empty datagram: dropped
            await asyncio.get_running_loop().sock_sendall(s.client, empty)
            reply = DNSRecord.parse(await s.ask(query("a.example", 4)))
            assert reply.header.id == 4
            assert s.listener.metrics.dropped["malformed"] == 2
            assert s.reader._thread is not None and s.reader._thread.is_alive()

    run(main)


def test_a_few_datagrams_for_the_loop_are_handed_over_and_the_thread_goes_on() -> None:
    """A batch with a slow datagram or two (a miss among hits) does not lend the socket: the
    thread answers the next batch's hits while the loop is still busy; the loop answers the
    handed-over datagram once it runs."""

    async def main() -> None:
        async with served() as s:
            s.store("a.example", "192.0.2.1")
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(0.25)
            client.connect(s.reader.sock.getsockname())
            try:
                # The event loop is blocked from here to the end of the block (no await).
                client.send(query("a.example", 3)[:14])  # cut inside the question: the loop's
                time.sleep(0.05)  # its batch is handled (handed over) before the next comes
                client.send(query("a.example", 4))
                reply = DNSRecord.parse(client.recv(4096))  # lent, this waits for the loop
                assert reply.header.id == 4 and str(reply.rr[0].rdata) == "192.0.2.1"
                assert s.listener.metrics.dropped["malformed"] == 0  # the loop has not run
            finally:
                loop = asyncio.get_running_loop()
                await asyncio.sleep(0.05)
                formerr = await loop.sock_recv(client, 4096)
                client.close()
            assert formerr[:2] == query("a.example", 3)[:2] and formerr[3] & 0x0F == wire.FORMERR
            assert s.listener.metrics.dropped["malformed"] == 1
            assert s.reader.handed == s.reader.taken == 1

    run(main)


def test_a_draining_listener_answers_nothing_new() -> None:
    async def main() -> None:
        async with served() as s:
            await s.with_row("a.example", "192.0.2.1")
            s.listener.drain()
            try:
                await s.ask(query("a.example", 3), timeout=0.3)
            except TimeoutError:
                pass
            else:
                raise AssertionError("a draining listener answered")

    run(main)


def test_close_stops_the_thread_at_once_and_closes_the_socket() -> None:
    async def main() -> None:
        async with served() as s:
            thread = s.reader._thread
            assert thread is not None and thread.is_alive()
            start = time.monotonic()
            s.reader.close()
            assert time.monotonic() - start < 0.5
            assert not thread.is_alive() and s.reader.sock.fileno() == -1
            assert s.reader.is_closing()
            s.reader.sendto(b"late", ("127.0.0.1", 9))  # the loop's send after close: no raise
            assert s.listener.metrics.dropped["overload"] == 1  # counted as not sent

    run(main)


def test_a_query_that_comes_while_the_loop_works_in_turns_is_answered_between_them() -> None:
    # Each turn is ~1 ms of Python on the loop; the interpreter's switch interval is raised so
    # that only the hand-over between turns can give the reader thread the GIL. Without it the
    # loop took the GIL back at every turn and the reply waited for the last one.
    turns_seen: list[int] = []
    answered_at: list[int] = []

    async def main() -> None:
        async with served() as s:
            await s.with_row("a.example", "192.0.2.1")
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            turns = 0

            def turn() -> bool:
                nonlocal turns
                turns += 1
                if turns == 3:
                    s.client.send(query("a.example", 7))
                if not answered_at:
                    try:
                        if DNSRecord.parse(s.client.recv(4096)).header.id == 7:
                            answered_at.append(turns)
                    except BlockingIOError:
                        pass
                end = time.perf_counter() + 0.001
                while time.perf_counter() < end:
                    pass
                if turns < 60:
                    return True
                done.set_result(None)
                return False

            loop.call_soon(in_turns(turn, loop))
            await done
            turns_seen.append(turns)
            assert s.loop_sends == 0  # the row's reply came from the thread

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        run(main)
    finally:
        sys.setswitchinterval(interval)
    assert turns_seen == [60]
    assert answered_at and answered_at[0] < 60, answered_at
