"""recvmmsg/sendmmsg batches on real loopback sockets, IPv4 and IPv6, served through the
closure the reader thread runs (DatagramBatch.server)."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import cycle

import pytest

from sidecar.server import datagram_batch
from sidecar.server.datagram_batch import SIZE, SLOT, Address, BatchServer, DatagramBatch

pytestmark = pytest.mark.skipif(not datagram_batch.available(), reason="Linux only")

LOOPBACKS = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
NOW = 100.0  # the batch's clock, fixed


@dataclass
class Row:
    """A fast-path row as the batch server reads it."""

    tail: bytes
    valid_until: float = math.inf
    next_tail: Callable[[], bytes] = field(default=lambda: b"")


@dataclass
class Served:
    """A batch's server over `rows`, and what it handed off and lent."""

    batch: DatagramBatch
    rows: dict[bytes, Row]
    verdicts: dict[str | int, bool] | None = None  # None: everyone is admitted
    handed: list[tuple[list[Row], float]] = field(default_factory=list)
    lent: list[list[tuple[bytes, Address]]] = field(default_factory=list)
    asked: list[str | int] = field(default_factory=list)  # hosts whose verdict was looked up

    def server(self) -> BatchServer:
        admitted_get = None
        if self.verdicts is not None:
            verdicts = self.verdicts

            def admitted_get(host: str | int) -> bool | None:
                self.asked.append(host)
                return verdicts.get(host)

        return self.batch.server(
            self.rows.get, admitted_get, self.handed.append, self.lent.append, lambda: NOW
        )

    def round(self) -> int:
        """One receive() and its batch served; the number of datagrams."""
        count = self.batch.receive()
        self.server()(count)
        return count


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


def silent(client: socket.socket) -> bool:
    client.settimeout(0.05)
    with contextlib.suppress(TimeoutError):
        client.recv(100)
        return False
    return True


@pytest.mark.parametrize(("family", "host"), LOOPBACKS)
def test_rows_are_answered_to_their_own_senders_and_the_rest_lent(family: int, host: str) -> None:
    with pair(family, host) as (batch, clients):
        where = batch.sock.getsockname()
        rows = {b"query 0": Row(b" reply 0"), b"query 2": Row(b" reply 2")}
        for n, client in enumerate(clients):
            client.sendto(b"%02dquery %d" % (n, n), where)
        time.sleep(0.05)  # all three queued before the one call
        s = Served(batch, rows)
        assert s.round() == 3
        assert clients[0].recvfrom(100) == (b"00 reply 0", where)
        assert clients[2].recvfrom(100) == (b"02 reply 2", where)
        assert silent(clients[1])
        # The served rows go over in one hand-off with the batch's time; the other datagram
        # is lent with its sender, as socket.recvfrom gives it.
        assert s.handed == [([rows[b"query 0"], rows[b"query 2"]], 0.0)]
        [[(data, sender)]] = s.lent
        assert data == b"01query 1" and sender[:2] == clients[1].getsockname()[:2]


def test_a_row_past_its_moment_is_lent_and_a_shaped_row_gives_its_replies_in_turn() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        shaped = Row(b"", next_tail=cycle([b" first", b" second"]).__next__)
        rows = {b"old": Row(b" stale", valid_until=NOW), b"pool": shaped}
        for n, key in enumerate((b"old", b"pool", b"pool")):
            clients[n].sendto(b"%02d" % n + key, where)
        time.sleep(0.05)
        s = Served(batch, rows)
        assert s.round() == 3
        assert silent(clients[0])
        assert [c.recv(100) for c in clients[1:]] == [b"01 first", b"02 second"]
        assert [data for data, _sender in s.lent[0]] == [b"00old"]
        assert s.handed == [([shaped, shaped], 0.0)]


def test_only_admitted_clients_are_answered_and_each_is_looked_up_once() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        rows = {b"query": Row(b" reply")}
        # The same host for every client: admission is by host, so one verdict covers them.
        s = Served(batch, rows, verdicts={})
        clients[0].sendto(b"01query", where)
        time.sleep(0.05)
        serve = s.server()
        serve(batch.receive())
        assert silent(clients[0]) and len(s.lent) == 1  # not judged yet: the loop judges
        s.verdicts = {"127.0.0.1": True}  # what the loop's admission leaves behind
        serve = s.server()
        for qid in (2, 3):
            clients[qid - 2].sendto(b"%02dquery" % qid, where)
            time.sleep(0.05)
            serve(batch.receive())
        assert clients[0].recv(100) == b"02 reply" and clients[1].recv(100) == b"03 reply"
        assert s.asked == ["127.0.0.1", "127.0.0.1"]  # then remembered by raw address


def test_a_busy_socket_is_read_size_at_a_time_and_one_datagram_does_not_wait() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        s = Served(batch, {b"hit": Row(b" reply")})
        for n in range(SIZE + 5):
            clients[0].sendto(b"%02dhit" % n, where)
        time.sleep(0.05)
        assert s.round() == SIZE
        assert s.round() == 5
        replies = [clients[0].recv(100) for _ in range(SIZE + 5)]
        assert replies == [b"%02d reply" % n for n in range(SIZE + 5)]
        assert [len(rows) for rows, _seconds in s.handed] == [SIZE, 5]
        clients[1].sendto(b"alone", where)
        started = time.monotonic()
        assert s.round() == 1
        assert time.monotonic() - started < 0.5
        assert s.lent[0][0][0] == b"alone"


def test_a_full_batch_sends_its_replies_in_one_call_a_smaller_one_flush_every_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        sends: list[int] = []
        sendmmsg = batch._sendmmsg  # the system call: counted, then made as ever

        def counted(fd: int, headers: int, count: int, flags: int) -> int:
            sends.append(count)
            return sendmmsg(fd, headers, count, flags)

        monkeypatch.setattr(batch, "_sendmmsg", counted)
        s = Served(batch, {b"hit": Row(b" reply")})
        extra = datagram_batch.FLUSH_EVERY + 2
        for n in range(SIZE + extra):
            clients[0].sendto(b"%02dhit" % n, where)
        time.sleep(0.05)
        assert s.round() == SIZE
        assert sends == [SIZE]  # behind: one call
        assert s.round() == extra
        assert sends == [SIZE, datagram_batch.FLUSH_EVERY, 2]  # keeping up: 8 at a time
        replies = [clients[0].recv(100) for _ in range(SIZE + extra)]
        assert replies == [b"%02d reply" % n for n in range(SIZE + extra)]


def test_long_datagrams_are_cut_and_long_replies_still_sent() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        big = b"y" * SLOT  # with its ID over a slot: sent with a plain sendto
        s = Served(batch, {b"big": Row(big), b"small": Row(b" reply")})
        clients[0].sendto(b"x" * (SLOT + 100), where)
        clients[1].sendto(b"", where)
        clients[2].sendto(b"01big", where)
        clients[2].sendto(b"02small", where)
        time.sleep(0.05)
        assert s.round() == 4
        assert [data for data, _sender in s.lent[0]] == [b"x" * SLOT, b""]
        assert clients[2].recv(2 * SLOT) == b"01" + big
        assert clients[2].recv(100) == b"02 reply"


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


def round_while_empty(s: Served, send: Callable[[], None]) -> int:
    """One round begun while nothing waits (so receive() blocks), `send` called meanwhile."""
    counts: list[int] = []
    reader = threading.Thread(target=lambda: counts.append(s.round()))
    reader.start()
    time.sleep(0.05)
    assert not counts  # blocked: nothing was waiting
    send()
    reader.join(2.0)
    return counts[0]


@pytest.mark.parametrize(("family", "host"), LOOPBACKS)
def test_a_datagram_that_comes_alone_is_read_and_answered_with_plain_socket_calls(
    family: int, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pair(family, host) as (batch, clients):
        where = batch.sock.getsockname()
        calls: list[int] = []
        monkeypatch.setattr(batch, "_recvmmsg", lambda *args: calls.append(1) or -1)
        monkeypatch.setattr(batch, "_sendmmsg", lambda *args: calls.append(2) or -1)
        row = Row(b" reply")
        s = Served(batch, {b"query": row})
        assert round_while_empty(s, lambda: clients[0].sendto(b"01query", where)) == 1
        assert clients[0].recvfrom(100) == (b"01 reply", where)
        assert batch.lone is not None and batch.lone[:2] == clients[0].getsockname()[:2]
        assert s.handed == [([row], 0.0)]
        assert calls == []  # nothing was waiting: no batch call at all


def test_a_lone_datagram_without_a_row_or_from_a_client_not_admitted_is_lent_with_its_sender() -> (
    None
):
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        s = Served(batch, {b"query": Row(b" reply")}, verdicts={})
        assert round_while_empty(s, lambda: clients[0].sendto(b"01query", where)) == 1
        assert round_while_empty(s, lambda: clients[1].sendto(b"02other", where)) == 1
        assert silent(clients[0]) and silent(clients[1])
        assert [(data, sender[:2]) for [(data, sender)] in s.lent] == [
            (b"01query", clients[0].getsockname()),
            (b"02other", clients[1].getsockname()),
        ]
        s.verdicts = {"127.0.0.1": True}
        assert round_while_empty(s, lambda: clients[0].sendto(b"03query", where)) == 1
        assert clients[0].recv(100) == b"03 reply"
        assert s.asked == ["127.0.0.1", "127.0.0.1"]  # the first and the third: with a row


def test_a_lone_datagram_is_answered_from_its_entry_without_a_row() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        cold_handed: list[tuple[list[bytes], float, float]] = []

        def answer_cold(
            data: bytes, now: float, cold: list[bytes], _resting: object | None
        ) -> bytes | None:
            cold.append(data)
            return data[:2] + b" from the entry"

        serve = batch.server(
            {}.get, None, lambda _b: None, lambda _l: None, lambda: NOW, answer_cold,
            cold_handed.append,
        )  # fmt: skip
        counts: list[int] = []
        reader = threading.Thread(target=lambda: counts.append(batch.receive()))
        reader.start()
        time.sleep(0.05)
        clients[0].sendto(b"07cold", where)
        reader.join(2.0)
        assert counts == [1] and batch.lone is not None
        serve(1)
        assert clients[0].recv(100) == b"07 from the entry"
        assert cold_handed == [([b"07cold"], NOW, 0.0)]


def test_after_a_lone_datagram_a_waiting_batch_is_read_in_one_call() -> None:
    with pair(socket.AF_INET, "127.0.0.1") as (batch, clients):
        where = batch.sock.getsockname()
        s = Served(batch, {b"hit": Row(b" reply")})
        assert round_while_empty(s, lambda: clients[0].sendto(b"00hit", where)) == 1
        for n in range(1, 4):
            clients[0].sendto(b"%02dhit" % n, where)
        time.sleep(0.05)
        assert s.round() == 3 and batch.lone is None
        assert round_while_empty(s, lambda: clients[0].sendto(b"04hit", where)) == 1
        assert batch.receive(wait=False) == 0 and batch.lone is None  # nothing, nothing lone
        s.server()(0)  # serves nothing: the lone datagram before is not answered again
        assert [clients[0].recv(100) for _ in range(5)] == [
            b"%02d reply" % n for n in (0, 1, 2, 3, 4)
        ]
        assert silent(clients[0])
        assert [len(rows) for rows, _seconds in s.handed] == [1, 3, 1]
