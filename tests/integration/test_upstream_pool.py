"""The forwarder's UDP socket pool, in-process on uvloop against a bare UDP server on loopback
that the test drives: which query goes out on which socket, which reply is taken, when sockets
are retired and closed, how deadlines and ICMP errors end attempts."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt
from sidecar.core.routing import name_to_wire
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from sidecar.forwarder import Forwarder, outcome_future
from sidecar.server import upstream
from sidecar.server.upstream import SocketExchanges

pytestmark = pytest.mark.integration

A_IN = b"\x00\x01\x00\x01"


def question(name: str) -> bytes:
    return name_to_wire(name) + A_IN


def answer(query: bytes, address: str = "192.0.2.1", *, qid: bytes | None = None) -> bytes:
    """A NOERROR reply to `query` (as sent upstream) with one A record."""
    end = wire.HEADER_SIZE
    while query[end]:
        end += query[end] + 1
    end += 5
    header = (qid or query[:2]) + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
    record = b"\xc0\x0c" + A_IN + struct.pack("!IH", 60, 4) + socket.inet_aton(address)
    return header + query[wire.HEADER_SIZE : end] + record


class Upstream(asyncio.DatagramProtocol):
    """Records every query with the address it came from; replies only when told to."""

    def __init__(self) -> None:
        self.queries: list[tuple[bytes, tuple[str, int]]] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries.append((data, addr))
        self.arrived.set()

    def reply(self, index: int, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.queries[index][1])

    async def wait(self, count: int) -> None:
        while len(self.queries) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 2.0)

    def ports(self) -> set[int]:
        return {addr[1] for _data, addr in self.queries}


Test = Callable[[SocketExchanges, Upstream, HostPort], Coroutine[Any, Any, None]]


def run(test: Test, host: str) -> Counters:
    """Run `test` on uvloop with a fresh transport and upstream; close both; the metrics."""
    metrics = Counters()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(Upstream, local_addr=(host, 0))
        address = HostPort(host, transport.get_extra_info("sockname")[1])
        forwarder = SocketExchanges(metrics)
        try:
            await test(forwarder, server, address)
        finally:
            forwarder.close(now=True)
            transport.close()
            await asyncio.sleep(0)
        for pool in forwarder.pools.values():
            assert not pool.live and not pool.retiring, "a socket was left open"

    uvloop.run(main())
    return metrics


def exchange(
    forwarder: SocketExchanges, server: HostPort, name: str, timeout: float = 2.0
) -> asyncio.Future[bytes]:
    """One UDP exchange (`SocketExchanges.start`), its end as a future to await; cancelling
    the future abandons the exchange."""
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    class Told:
        def exchanged(
            self, _attempt: Attempt, reply: bytes | None, error: UpstreamError | None
        ) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert reply is not None
                future.set_result(reply)

    handle = forwarder.start(Attempt(server, timeout), question(name), False, False, Told())
    future.add_done_callback(lambda done: handle.cancel() if done.cancelled() else None)
    return future


def test_concurrent_queries_share_a_few_sockets_and_each_gets_its_own_reply(
    loopback: Callable[[], str],
) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        names = [f"q{i}.example" for i in range(150)]
        tasks = [exchange(forwarder, server, name) for name in names]
        await up.wait(len(names))
        for index in reversed(range(len(names))):  # out of order
            data = up.queries[index][0]
            up.reply(index, answer(data, f"10.0.{index // 250}.{index % 250}"))
        replies = await asyncio.gather(*tasks)
        for index, msg in enumerate(replies):
            assert wire.parse_reply(msg).rcode == wire.NOERROR
            assert msg.endswith(socket.inet_aton(f"10.0.{index // 250}.{index % 250}"))
        # 150 in flight: the POOL_SOCKETS sockets hold 4 x 64 of them, no more are needed.
        assert len(up.ports()) == upstream.POOL_SOCKETS
        by_port: dict[int, list[bytes]] = {}
        for data, addr in up.queries:
            by_port.setdefault(addr[1], []).append(data[:2])
        for ids in by_port.values():
            assert len(ids) == len(set(ids)), "an ID was in flight twice on one socket"
            assert len(ids) <= upstream.SOCKET_INFLIGHT

    metrics = run(test, loopback())
    assert not metrics.upstream_errors


def test_all_sockets_full_opens_more_and_the_pool_shrinks_back(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "SOCKET_INFLIGHT", 4)
    monkeypatch.setattr(upstream, "SOCKET_SECONDS", 0.2)

    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        tasks = [exchange(forwarder, server, f"q{i}.example") for i in range(40)]
        await up.wait(40)
        assert len(up.ports()) == 10  # 40 in flight, 4 per socket
        for index, (data, _addr) in enumerate(up.queries):
            up.reply(index, answer(data))
        await asyncio.gather(*tasks)
        pool = forwarder.pools[server]
        assert len(pool.live) == 10
        await asyncio.sleep(0.3)  # all due for retirement now
        for i in range(8):
            task = exchange(forwarder, server, f"after{i}.example")
            await up.wait(41 + i)
            up.reply(40 + i, answer(up.queries[40 + i][0]))
            await task
        assert len(pool.live) == upstream.POOL_SOCKETS  # retired, not replaced one for one
        assert not pool.retiring  # closed: nothing was in flight on them

    run(test, loopback())


def test_sockets_are_retired_after_their_queries_so_source_ports_change(
    loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "SOCKET_QUERIES", 3)

    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        for i in range(60):
            task = exchange(forwarder, server, f"q{i}.example")
            await up.wait(i + 1)
            up.reply(i, answer(up.queries[i][0]))
            await task
        pool = forwarder.pools[server]
        assert all(sock.sent <= 3 for sock in pool.live)
        assert len(up.ports()) >= 60 // 3
        assert not pool.retiring

    run(test, loopback())


def test_wrong_id_or_question_is_a_mismatch_and_the_wait_goes_on(
    loopback: Callable[[], str],
) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        task = exchange(forwarder, server, "right.example")
        await up.wait(1)
        query = up.queries[0][0]
        wrong_id = bytes((query[0] ^ 0xFF, query[1]))
        up.reply(0, answer(query, "6.6.6.6", qid=wrong_id))
        other = wire.build_query(0, question("other.example"), cd=False, do=False)
        up.reply(0, answer(query[:2] + other[2:], "6.6.6.7"))
        up.reply(0, query[:2] + b"garbage")
        async with asyncio.timeout(2.0):  # until all three have been read and set aside
            while sum(forwarder.counters.upstream_errors.values()) < 3:
                await asyncio.sleep(0.005)
        assert not task.done()
        up.reply(0, answer(query, "192.0.2.9"))
        msg = await task
        assert msg.endswith(socket.inet_aton("192.0.2.9"))

    metrics = run(test, loopback())
    assert dict(metrics.upstream_errors) == {(f"{loopback_of(metrics)}", "mismatch"): 3}


def loopback_of(metrics: Counters) -> str:
    (server,) = {server for server, _reason in metrics.upstream_errors}
    return server


def test_late_and_repeated_replies_are_dropped_quietly(loopback: Callable[[], str]) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        task = exchange(forwarder, server, "slow.example", timeout=0.1)
        await up.wait(1)
        with pytest.raises(UpstreamTimeout):
            await task
        up.reply(0, answer(up.queries[0][0]))  # too late
        task = exchange(forwarder, server, "twice.example")
        await up.wait(2)
        up.reply(1, answer(up.queries[1][0]))
        up.reply(1, answer(up.queries[1][0]))  # a duplicate
        await task
        await asyncio.sleep(0.05)

    metrics = run(test, loopback())
    assert not metrics.upstream_errors


def test_deadlines_end_attempts_in_time_the_shorter_ones_first(
    loopback: Callable[[], str],
) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeouts = [0.3, 0.3, 0.1, 0.3, 0.2]  # given out of order: they end in order
        ended: list[tuple[float, float]] = []

        async def one(i: int, timeout: float) -> None:
            with pytest.raises(UpstreamTimeout):
                await exchange(forwarder, server, f"silent{i}.example", timeout)
            ended.append((timeout, loop.time() - started))

        await asyncio.gather(*(one(i, t) for i, t in enumerate(timeouts)))
        assert [timeout for timeout, _ in ended] == sorted(timeouts)
        for timeout, took in ended:
            assert timeout - 0.01 <= took < timeout + 0.1, (timeout, took)

    run(test, loopback())


def test_answered_queries_leave_the_deadline_queue_at_the_next_read_not_their_deadline(
    loopback: Callable[[], str],
) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        futures = [exchange(forwarder, server, f"q{i}.example", timeout=30.0) for i in range(6)]
        await up.wait(6)
        deadlines = forwarder.deadlines
        assert deadlines is not None and len(deadlines.fifo) == 6
        # The second and third answered first: the head still waits, so both stay queued.
        for index in (1, 2):
            up.reply(index, answer(up.queries[index][0]))
        await asyncio.gather(futures[1], futures[2])
        assert len(deadlines.fifo) == 6
        # The head answered: it and the two behind it that ended go at that read (the same
        # callback that settled the future, before this task resumes).
        up.reply(0, answer(up.queries[0][0]))
        await futures[0]
        assert len(deadlines.fifo) == 3  # q3, q4, q5: still waiting
        for index in (3, 4, 5):
            up.reply(index, answer(up.queries[index][0]))
        await asyncio.gather(*futures)
        assert not deadlines.fifo  # long before the 30 s deadline

    run(test, loopback())


def test_nothing_listening_fails_every_query_on_the_socket_at_once(
    loopback: Callable[[], str], free_port: Callable[..., int]
) -> None:
    host = loopback()
    dead = HostPort(host, free_port(host))

    async def test(forwarder: SocketExchanges, _up: Upstream, _server: HostPort) -> None:
        started = time.monotonic()
        results = await asyncio.gather(
            *(exchange(forwarder, dead, f"q{i}.example") for i in range(20)),
            return_exceptions=True,
        )
        assert time.monotonic() - started < 1.0  # not the attempt timeout (2 s)
        assert all(isinstance(r, UpstreamUnreachable) for r in results), results
        pool = forwarder.pools[dead]
        assert all(sock.sock is not None and not sock.pending for sock in pool.live)
        assert not pool.retiring  # the sockets that saw the error are closed

    run(test, host)


def test_forward_ends_a_refused_round_and_counts_each_attempt(
    loopback: Callable[[], str], free_port: Callable[..., int]
) -> None:
    host = loopback()
    dead = HostPort(host, free_port(host))
    metrics = Counters()

    async def main() -> None:
        forwarder = Forwarder(
            SocketExchanges(metrics), metrics, attempt_timeout=2.0, clock=time.monotonic
        )
        started = time.monotonic()
        done, then = outcome_future()
        forwarder.ask(
            question("nowhere.example"),
            UpstreamSet([dead]),
            cd=False,
            do=False,
            deadline=started + 4.0,
            then=then,
        )
        with pytest.raises(UpstreamUnreachable):
            await done
        assert time.monotonic() - started < 0.5
        forwarder.close()

    uvloop.run(main())
    assert dict(metrics.upstream_errors) == {(str(dead), "unreachable"): 1}


def test_close_waits_for_the_query_in_flight_and_close_now_ends_it(
    loopback: Callable[[], str],
) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        first = exchange(forwarder, server, "first.example")
        idle = exchange(forwarder, server, "idle.example")
        await up.wait(2)
        up.reply(1, answer(up.queries[1][0]))
        await idle
        pool = forwarder.pools[server]
        forwarder.close()
        assert len(pool.retiring) == 1  # the socket with a query in flight, still open
        up.reply(0, answer(up.queries[0][0]))
        await first
        assert not pool.live and not pool.retiring
        # After close: a socket of its own per query, closed after it.
        late = exchange(forwarder, server, "late.example")
        await up.wait(3)
        assert len(pool.retiring) == 1
        forwarder.close(now=True)
        with pytest.raises(UpstreamError):
            await late
        assert not pool.retiring

    run(test, loopback())


def test_a_cancelled_exchange_releases_its_query(loopback: Callable[[], str]) -> None:
    async def test(forwarder: SocketExchanges, up: Upstream, server: HostPort) -> None:
        task = exchange(forwarder, server, "gone.example", 4.0)
        await up.wait(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        (sock,) = forwarder.pools[server].live
        assert not sock.pending

    run(test, loopback())
