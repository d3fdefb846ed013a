"""Carrying out forwarding decisions (core/forwarding.py) over a transport of exchanges.

The pipeline asks `Forwarder.ask` for a question's outcome, told to its `then`; the decisions
are the core's, the exchanges (one UDP query to one server, or one TCP exchange) the
transport's (server/upstream.py on sockets, a scripted one in tests). Plain callbacks end to
end: no task, coroutine or future per question or attempt (`outcome_future` makes one for
those who await, as the upstream probes do).

A transport's contract (`Exchanges`): `start()` sends (or queues the send for the end of the
loop's turn) and returns a handle; `then(reply, None)` gets the reply, whose ID, QR and
question already matched the query (RFC 5452), or `then(None, UpstreamError)` the failure
(when `timeout` seconds pass, or the socket reports an error), once and never from within
`start()`, which raises UpstreamError when it cannot even send. The handle's `cancel()`
abandons the exchange and frees what it held. With `late` given, a timed-out UDP exchange
keeps its ID and socket `linger` seconds more, and a reply that comes then is passed to `late`
(once), so a slow upstream still answers the question.

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


class Exchanges(Protocol):
    """One exchange with one upstream server (see the module's docstring)."""

    def start(
        self,
        server: HostPort,
        question: bytes,
        cd: bool,
        do: bool,
        timeout: float,
        tcp: bool,
        then: Replied,
        late: Callable[[bytes], None] | None = None,
        linger: float = 0.0,
    ) -> Exchange: ...

    def close(self, *, now: bool = False) -> None: ...


# How an exchange ends: (the reply, None) or (None, the UpstreamError).
Replied = Callable[[bytes | None, UpstreamError | None], None]


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


class _Question:
    """One question in flight: its decisions, the exchanges under way, whom to tell the end.

    Usually one exchange is under way. An attempt that timed out may still bring a late
    reply (`late`), and a late truncated reply starts its TCP retry beside the current
    attempt; once the question is settled, what is still under way is cancelled. Plain
    callbacks end to end: an exchange's end calls `exchanged`, the question's end `then`."""

    __slots__ = (
        "background",
        "cd",
        "do",
        "exchanges",
        "forwarder",
        "forwarding",
        "question",
        "then",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        forwarding: Forwarding,
        question: bytes,
        cd: bool,
        do: bool,
        background: bool,
        then: Settled,
    ) -> None:
        self.forwarder = forwarder
        self.background = background
        self.forwarding = forwarding
        self.question = question
        self.cd = cd
        self.do = do
        self.exchanges: list[Exchange] = []
        self.then: Settled | None = then  # None once told

    def run(self, attempt: Attempt | None) -> None:
        """Start `attempt`, or the ones after it when it cannot start; settle when done."""
        forwarder, forwarding = self.forwarder, self.forwarding
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
                forwarding.denied(attempt)
                break
            forwarder.counters.upstream_packets[name] += packets
            exchanged = functools.partial(self.exchanged, attempt)
            linger = attempt.linger
            try:
                exchange = forwarder.exchanges.start(  # positional: one call per attempt
                    attempt.server,
                    self.question,
                    self.cd,
                    self.do,
                    attempt.timeout,
                    attempt.tcp,
                    exchanged,
                    exchanged if linger else None,  # a late reply: as any reply
                    linger,
                )
            except UpstreamError as exc:
                attempt = forwarding.failed(attempt, exc, forwarder.clock())
                continue
            self.exchanges.append(exchange)
            return
        self.settle()

    def settle(self) -> None:
        """Once the decisions are done: tell the end, and cancel what is under way."""
        forwarding = self.forwarding
        if self.then is None or not forwarding.done:
            return
        self.finish(forwarding.outcome, forwarding.error)

    def finish(self, outcome: Outcome | None, error: BaseException | None) -> None:
        then, self.then = self.then, None
        exchanges, self.exchanges = self.exchanges, []
        for exchange in exchanges:
            exchange.cancel()
        if then is not None:
            then(outcome, error)

    def exchanged(
        self, attempt: Attempt, msg: bytes | None, error: UpstreamError | None = None
    ) -> None:
        """`attempt`'s exchange ended (a reply or an error), or a reply to it came after it
        timed out, while the question went on."""
        if self.then is None:
            return
        forwarding = self.forwarding
        if self.forwarder.stopped:
            forwarding.stop()
        now = self.forwarder.clock()
        try:
            if error is None:
                assert msg is not None
                attempt_next = forwarding.replied(attempt, msg, now)
                if attempt_next is None and forwarding.outcome is not None:
                    self.finish(forwarding.outcome, None)  # answered: the common case
                    return
                self.run(attempt_next)
            else:
                self.run(forwarding.failed(attempt, error, now))
        except Exception as exc:  # a bug: the waiters learn of it
            if self.then is not None:
                self.finish(None, exc)


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
        """Forward the question; `then(outcome, None)` with the reply taken and its walk, or
        `then(None, error)` with the UpstreamError that ended it (anything else: a bug), once;
        possibly from within this call, when no attempt can start. `deadline` is on the
        forwarder's clock. `background`: no client waits (a prefetch, a probe), so the
        packet budget denies it first."""
        forwarding = Forwarding(  # positional: one per question
            upstreams,
            self.counters,
            self.attempt_timeout,
            deadline,
            order,
            judge,
            self.on_health,
            wire.HEADER_SIZE + len(question),  # the transport matched it
        )
        if self.stopped:
            forwarding.stop()
        _Question(self, forwarding, question, cd, do, background, then).run(
            forwarding.first(self.clock())
        )

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


async def probe_down_upstreams(
    forwarder: Forwarder,
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
