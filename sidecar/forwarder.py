"""Carrying out forwarding decisions (core/forwarding.py) over a transport of exchanges.

The pipeline asks `Forwarder.ask` for a question's outcome, told to its `then`; the decisions
are the core's, the exchanges (one UDP query to one server, or one TCP exchange) the
transport's (server/upstream.py on sockets, a scripted one in tests). Plain callbacks end to
end: no task, coroutine or future per question or attempt (`outcome_future` makes one for
those who await, as the upstream probes do).

A transport's contract (`Exchanges`): `start(attempt, question, cd, do, asker)` carries out
one `Attempt` (sends, or queues the send for the end of the loop's turn) and returns a handle;
its end is told to `asker.exchanged(attempt, reply, None)`, the reply's ID, QR and question
already matched (RFC 5452), or `asker.exchanged(attempt, None, UpstreamError)` (when
`attempt.timeout` seconds pass, or the socket reports an error), once and never from within
`start()`, which raises UpstreamError when it cannot even send. The handle's `cancel()`
abandons the exchange and frees what it held. A UDP attempt with a `linger` keeps its ID and
socket that much longer after its timeout, and a reply that comes then is told the same way
(once more), so a slow upstream still answers the question. The attempt itself is the token:
no callback object is made per exchange.

Every exchange, of every question and probe, to an upstream off this host's loopback first
takes its packets from the one `PacketBudget` (core/packet_budget.py) here, as background
work when the question is a prefetch or a probe; a denied attempt is not sent and ends its
question (`Forwarding.denied`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from sidecar.addresses import HostPort, label
from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt, Forwarding
from sidecar.core.packet_budget import TCP_PACKETS, PacketBudget
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import UpstreamError

log = logging.getLogger("dns_sidecar")

Outcome = tuple[bytes, wire.Reply]


class Asker(Protocol):
    """Who is told how an exchange ended (the forwarder's question)."""

    def exchanged(
        self, attempt: Attempt, msg: bytes | None, error: UpstreamError | None
    ) -> None: ...


class Exchanges(Protocol):
    """One exchange with one upstream server (see the module's docstring)."""

    def start(
        self, attempt: Attempt, question: bytes, cd: bool, do: bool, asker: Asker
    ) -> Exchange: ...

    def close(self, *, now: bool = False) -> None: ...


class Exchange(Protocol):
    """An exchange under way (a UDP query, a TCP exchange's task): its handle."""

    def cancel(self) -> object: ...


# How a question ends: (the reply and its walk, None), or (None, what ended it).
Settled = Callable[[Outcome | None, BaseException | None], None]


def log_health(server: HostPort, up: bool, reason: str) -> None:
    if up:
        log.info("upstream up", extra={"fields": {"upstream": str(server)}})
    else:
        log.warning("upstream down", extra={"fields": {"upstream": str(server), "reason": reason}})


@functools.lru_cache(maxsize=256)
def on_loopback(server: HostPort) -> bool:
    """Whether `server` is on this host's loopback: its packets never reach a network
    interface, so the budget (the VPC resolver's per-interface limit) does not cover them."""
    return ipaddress.ip_address(server.host).is_loopback


@functools.lru_cache(maxsize=256)
def server_facts(server: HostPort) -> tuple[bool, str]:
    """(on_loopback, label) of `server`, in one look-up per attempt."""
    return on_loopback(server), label(server)


class Forwarded(Forwarding):
    """One question being forwarded: the core's decisions (its `Forwarding` part), the
    exchanges carrying them out, and its end, told once to `settled`, which a subclass
    implements (the pipeline's fetch; `Forwarder.ask` makes one that calls a function). One
    object per question: made, then started with `Forwarder.start`.

    Usually one exchange is under way. An attempt that timed out may still bring a late
    reply, and a late truncated reply starts its TCP retry beside the current attempt; once
    the question is settled, what is still under way is cancelled. Plain calls end to end:
    the transport tells `exchanged`, the question's end goes to `settled`."""

    __slots__ = ("background", "cd", "do", "exchanges", "forwarder", "question", "told")

    def __init__(
        self,
        forwarder: Forwarder,
        upstreams: UpstreamSet[HostPort],
        question: bytes,
        cd: bool,
        do: bool,
        deadline: float,
        background: bool = False,
        order: Sequence[HostPort] | None = None,
        judge: bool = True,
    ) -> None:
        """`question`: wire name, type and class; `deadline` on the forwarder's clock;
        `background`: no client waits (a prefetch, a probe), so the packet budget denies it
        first; `order` and `judge`: see core/forwarding.py."""
        Forwarding.__init__(  # positional: one per question
            self,
            upstreams,
            forwarder.counters,
            forwarder.attempt_timeout,
            deadline,
            order,
            judge,
            forwarder.on_health,
            wire.HEADER_SIZE + len(question),  # the transport matched it
        )
        self.forwarder = forwarder
        self.background = background
        self.question = question
        self.cd = cd
        self.do = do
        self.exchanges: list[Exchange] = []
        self.told = False

    def settled(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """The end, once: (the reply taken and its walk, None), or (None, the UpstreamError
        that ended it; anything else: a bug). Possibly from within `Forwarder.start`, when no
        attempt can start."""
        raise NotImplementedError

    def run(self, attempt: Attempt | None) -> None:
        """Start `attempt`, or the ones after it when it cannot start; settle when done."""
        forwarder = self.forwarder
        while attempt is not None:
            # The attempt's packets from the budget (counted as sent), or the denial counted.
            packets = TCP_PACKETS if attempt.tcp else 1
            loopback, name = server_facts(attempt.server)
            if not loopback and not forwarder.budget.take(
                packets, forwarder.clock(), background=self.background
            ):
                forwarder.counters.budget_denials[
                    "background" if self.background else "client"
                ] += 1
                self.denied(attempt)
                break
            forwarder.counters.upstream_packets[name] += packets
            try:
                exchange = forwarder.exchanges.start(attempt, self.question, self.cd, self.do, self)
            except UpstreamError as exc:
                attempt = self.failed(attempt, exc, forwarder.clock())
                continue
            self.exchanges.append(exchange)
            return
        if not self.told and self.done:
            self.finish(self.outcome, self.error)

    def finish(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """Tell the end, and cancel what is under way."""
        self.told = True
        exchanges, self.exchanges = self.exchanges, []
        for exchange in exchanges:
            exchange.cancel()
        self.settled(outcome, error)

    def exchanged(self, attempt: Attempt, msg: bytes | None, error: UpstreamError | None) -> None:
        """`attempt`'s exchange ended (a reply or an error), or a reply to it came after it
        timed out, while the question went on (the transport's `Asker`)."""
        if self.told:
            return
        forwarder = self.forwarder
        if forwarder.stopped:
            self.stop()
        now = forwarder.clock()
        try:
            if error is None:
                assert msg is not None
                attempt_next = self.replied(attempt, msg, now)
                if attempt_next is None and self.outcome is not None:
                    self.finish(self.outcome, None)  # answered: the common case
                    return
                self.run(attempt_next)
            else:
                self.run(self.failed(attempt, error, now))
        except Exception as exc:  # a bug: the waiters learn of it
            if not self.told:
                self.finish(None, exc)


class _Told(Forwarded):
    """A question whose end goes to a function (`then`, set by `Forwarder.ask`)."""

    __slots__ = ("then",)
    then: Settled

    def settled(self, outcome: Outcome | None, error: BaseException | None) -> None:
        self.then(outcome, error)


def outcome_future() -> tuple[asyncio.Future[Outcome], Settled]:
    """A future of a question's outcome and the `then` for `Forwarder.ask` that settles it
    (for those who await: the upstream probes)."""
    result: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def then(outcome: Outcome | None, error: BaseException | None) -> None:
        if result.done():
            return
        if outcome is not None:
            result.set_result(outcome)
        else:
            result.set_exception(error or UpstreamError("no outcome"))

    return result, then


class Forwarder:
    """Sends a question to a zone's upstreams until one answers or the deadline passes."""

    def __init__(
        self,
        exchanges: Exchanges,
        counters: Counters,
        *,
        attempt_timeout: float,
        clock: Callable[[], float],
        on_health: Callable[[HostPort, bool, str], None] = log_health,
        budget: PacketBudget | None = None,
    ) -> None:
        self.exchanges = exchanges
        # Packets to the upstreams, shared by every question and probe (off when not given).
        self.budget = budget if budget is not None else PacketBudget(0, clock())
        self.counters = counters
        self.attempt_timeout = attempt_timeout
        self.clock = clock
        self.on_health = on_health
        self.stopped = False  # closed at shutdown: no new attempts

    def start(self, forwarded: Forwarded) -> None:
        """Forward a question made for this forwarder: its first attempt now, its end told to
        its `settled` (possibly from within this call, when no attempt can start)."""
        if self.stopped:
            forwarded.stop()
        forwarded.run(forwarded.first(self.clock()))

    def ask(
        self,
        question: bytes,
        upstreams: UpstreamSet[HostPort],
        cd: bool,
        do: bool,
        deadline: float,
        then: Settled,
        order: Sequence[HostPort] | None = None,
        judge: bool = True,
        background: bool = False,
    ) -> None:
        """Forward the question (see `Forwarded`), its end told to `then(outcome, error)`."""
        told = _Told(self, upstreams, question, cd, do, deadline, background, order, judge)
        told.then = then
        self.start(told)

    async def probe(self, server: HostPort, question: bytes) -> float:
        """Ask `server` `question` once; the round-trip time of any readable reply, or
        UpstreamError. Nothing is counted or judged: the caller decides what it means."""
        sent = self.clock()
        done, then = outcome_future()
        self.ask(
            question,
            UpstreamSet((server,)),
            cd=False,
            do=False,
            deadline=sent + self.attempt_timeout,
            then=then,
            order=(server,),
            judge=False,
            background=True,
        )
        await done
        return self.clock() - sent

    def close(self, *, now: bool = False) -> None:
        """Close the transport, each socket as soon as no query waits on it any more (queries
        still to come get sockets of their own). `now` (at shutdown): at once, failing what is
        in flight, and no further attempts."""
        self.stopped |= now
        self.exchanges.close(now=now)


class Prober(Protocol):
    """What probe_down_upstreams asks with: a Forwarder."""

    async def probe(self, server: HostPort, question: bytes) -> float: ...


async def probe_down_upstreams(
    forwarder: Prober,
    sets: Sequence[UpstreamSet[HostPort]],
    question: bytes,
    interval: float,
) -> None:
    """Forever: every `interval` while some upstream is down, ask each down upstream
    `question`; an answer marks it up. With none down it waits, with no timer, to be told."""
    some_down = asyncio.Event()

    async def probe_one(upstreams: UpstreamSet[HostPort], server: HostPort) -> None:
        try:
            rtt = await forwarder.probe(server, question)
        except UpstreamError:
            return
        if upstreams.answered(server, rtt):
            log.info("upstream up", extra={"fields": {"upstream": str(server), "by": "probe"}})

    for ups in sets:
        ups.on_down = some_down.set
    try:
        while True:
            if not any(ups.down() for ups in sets):
                some_down.clear()
                await some_down.wait()
            await asyncio.sleep(interval)
            probes = [probe_one(ups, server) for ups in sets for server in ups.down()]
            if probes:
                await asyncio.gather(*probes)
    finally:
        for ups in sets:
            if ups.on_down == some_down.set:
                ups.on_down = None
