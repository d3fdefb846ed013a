"""recvmmsg/sendmmsg batches on real loopback sockets, IPv4 and IPv6."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sidecar.server import datagram_batch
from sidecar.server.datagram_batch import SIZE, SLOT, DatagramBatch

pytestmark = pytest.mark.skipif(not datagram_batch.available(), reason="Linux only")

LOOPBACKS = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


@contextmanager
def pair(family: int, host: str) -> Iterator[tuple[DatagramBatch, list[socket.socket]]]:
    """A bound server socket with its batch, and three client sockets."""
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    clients = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(3)]
    for client in clients:
        client.bind((host, 0))
        client.settimeout(2.0)
    try:
        yield DatagramBatch(server), clients
    finally:
        server.close()
        for client in clients:
            client.close()


@pytest.mark.parametrize(("family", "host"), LOOPBACKS)
def test_datagrams_senders_and_replies_go_to_their_own_senders(family: int, host: str) -> None:
    with pair(family, host) as (batch, clients):
        where = batch.sock.getsockname()
        for n, client in enumerate(clients):
            client.sendto(b"query %d" % n, where)
        time.sleep(0.05)  # all three queued before the one call
        count = batch.receive()
        assert count == 3
        assert [batch.query(i) for i in range(count)] == [b"query 0", b"query 1", b"query 2"]
        for i, client in enumerate(clients):
            sender = batch.address(i)
            assert sender[:2] == client.getsockname()[:2]
            assert batch.client(i) == socket.inet_pton(family, host)
        # Replies in another order than the queries, to only two of the three.
        assert batch.stage(0, 2, b"reply to 2")
        assert batch.stage(1, 0, b"reply to 0")
        batch.send(2)
        assert clients[2].recvfrom(100) == (b"reply to 2", where)
        assert clients[0].recvfrom(100) == (b"reply to 0", where)
        clients[1].settimeout(0.05)
        with pytest.raises(TimeoutError):
            clients[1].recv(100)


def test_a_busy_socket_is_read_size_at_a_time_and_one_datagram_does_not_wait() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        for n in range(SIZE + 5):
            clients[0].sendto(b"%d" % n, where)
        time.sleep(0.05)
        assert batch.receive() == SIZE
        assert [batch.query(0), batch.query(1)] == [b"0", b"1"]
        assert batch.receive() == 5
        assert batch.query(4) == b"%d" % (SIZE + 4)
        clients[1].sendto(b"alone", where)
        started = time.monotonic()
        assert batch.receive() == 1
        assert time.monotonic() - started < 0.5
        assert batch.query(0) == b"alone"


def test_long_datagrams_are_cut_and_long_replies_still_sent() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        clients[0].sendto(b"x" * (SLOT + 100), where)
        clients[1].sendto(b"", where)
        time.sleep(0.05)
        count = batch.receive()
        assert count == 2
        assert [batch.query(0), batch.query(1)] == [b"x" * SLOT, b""]
        big = b"y" * (SLOT + 1)  # over a slot: sent with a plain sendto
        assert not batch.stage(0, 0, big)
        batch.send_one(big, 0)
        assert batch.stage(0, 1, b"small")
        batch.send(1)
        assert clients[0].recv(2 * SLOT) == big
        assert clients[1].recv(100) == b"small"


def test_shutdown_wakes_a_blocked_receive() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, _clients):
        woke = threading.Event()

        def read() -> None:
            batch.receive()
            woke.set()

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.1)
        assert not woke.is_set()
        with contextlib.suppress(OSError):  # ENOTCONN, and yet the blocked call wakes
            batch.sock.shutdown(socket.SHUT_RD)
        assert woke.wait(1.0)
        reader.join(1.0)
