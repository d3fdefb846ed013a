"""Forwarding decisions for one question: which upstream to ask next, what a reply, a timeout
or an error means, and how much time each attempt gets. Plain code: the I/O layer
(sidecar/forwarder.py) carries out each `Attempt` and reports back with `replied` or `failed`,
naming the attempt and giving the time (`now`, monotonic seconds) from the one clock.

The rules
- One deadline per question; each attempt gets min(attempt_timeout, what remains) before the
  next one starts, and none starts with MIN_ATTEMPT or less left (timers may fire a little
  early: four 1 s attempts in a 4 s deadline must not make a fifth of 3 ms).
- Late replies count: an attempt that timed out keeps listening until the question's deadline
  (`Attempt.linger`), and the first usable reply of any attempt settles the question. So an
  upstream slower than attempt_timeout answers in its own time, while the next attempt runs.
- One failure rule: a usable answer is NOERROR, NXDOMAIN (or YXDOMAIN). Everything else (a
  timeout, SERVFAIL, REFUSED, NOTAUTH, FORMERR, NOTIMP or any other reply code, an unreadable
  reply, an unreachable server) is a failure of that upstream: counted under its reason, judged
  against its health, and the question moves on to the next upstream. No failure is ever the
  outcome: the question ends with the last failure (an UpstreamError, whose `timed_out_only`
  says whether every attempt timed out), and the pipeline answers stale or SERVFAIL and
  remembers the failure (RFC 9520), whatever the kind.
- Upstreams are asked in the set's order (its policy, health first), round and round until the
  deadline. A round in which no attempt timed out (every upstream failed at once) ends the
  question: asking again at once would only hammer a server that is failing, and a client
  retries on its own.
- A truncated UDP reply is asked again over TCP, of the same server, with all the time that
  remains (RFC 7766); the TCP reply is taken as it is, judged like any other.
- Health: a usable reply marks its upstream answered (with its round-trip time, from the start
  of the attempt it answers); a failure counts against it. Transitions down and up are
  reported through `on_health`, counts go to `Counters`.
- A probe (`judge=False`) asks one upstream once: any readable reply is its outcome; nothing is
  counted or judged, the caller decides what the answer means.
- Shutting down (`stop()`): no new attempt, and failures are no fault of the upstream's.
- An attempt the packet budget denies (`denied`, core/packet_budget.py) ends the question at
  once with PacketBudgetSpent: nothing was sent, so nothing is counted or judged against the
  upstream, and waiting for a token would only make the client wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple, cast

from sidecar.addresses import HostPort, label
from sidecar.core import wire
from sidecar.core.counters import RCODE_NAMES, Counters
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import (
    BadUpstreamReply,
    FormError,
    PacketBudgetSpent,
    UpstreamError,
    UpstreamRcode,
    UpstreamTimeout,
)

MIN_ATTEMPT = 0.01  # seconds: an attempt with less time than this is not started

HealthChange = Callable[[HostPort, bool, str], None]  # (upstream, up, reason)


# Reply codes that answer the question: YXDOMAIN too, the answer when a DNAME substitution
# makes a name too long (RFC 6672 2.2).
USABLE = (wire.NOERROR, wire.NXDOMAIN, 6)


class Attempt(NamedTuple):
    """What the I/O layer does next: ask `server`, over TCP if `tcp`, and move on after
    `timeout` s; a UDP attempt still takes a late reply for `linger` s more. `number` tells the
    question's attempts apart (a TCP retry keeps the number of the UDP attempt it repeats)."""

    server: HostPort
    timeout: float
    tcp: bool = False
    number: int = 1
    linger: float = 0.0


# An Attempt made without its Python-level __new__ (one per question: one call less).
_new_attempt = cast(
    "Callable[[tuple[HostPort, float, bool, int, float]], Attempt]", partial(tuple.__new__, Attempt)
)


class Forwarding:
    """One question's way through a zone's upstreams (see the module's rules)."""

    __slots__ = (
        "attempt_timeout",
        "attempts",
        "counters",
        "deadline",
        "error",
        "judge",
        "last_error",
        "on_health",
        "only_timeouts",
        "order",
        "outcome",
        "question_end",
        "sent",
        "stopped",
        "timed_out",
        "upstreams",
    )

    def __init__(
        self,
        upstreams: UpstreamSet[HostPort],
        counters: Counters,
        attempt_timeout: float,
        deadline: float,
        order: Sequence[HostPort] | None = None,
        judge: bool = True,
        on_health: HealthChange | None = None,
        question_end: int = 0,
    ) -> None:
        self.upstreams = upstreams
        # Where a reply's question ends: the transport matched it with the one sent (0: not
        # known, walked).
        self.question_end = question_end
        self.counters = counters
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.order: Sequence[HostPort] = (
            order if order is not None else (upstreams.fixed_order or upstreams.order())
        )
        self.judge = judge
        self.on_health = on_health
        self.attempts = 0  # UDP attempts started (the number of the current one)
        self.sent: list[float] = []  # when each attempt started, by number - 1
        self.timed_out = False  # an attempt of the current round timed out
        self.only_timeouts = True  # every failure so far was a timeout
        self.last_error: UpstreamError | None = None
        self.outcome: tuple[bytes, wire.Reply] | None = None
        self.error: UpstreamError | None = None
        self.stopped = False

    @property
    def done(self) -> bool:
        """Settled: `outcome` or `error` is set, and every later event is ignored."""
        return self.outcome is not None or self.error is not None

    def replied(self, attempt: Attempt, msg: bytes, now: float) -> Attempt | None:
        """`attempt` (the current one or an earlier one, late) brought `msg` (its ID and
        question already matched). The next attempt to start, if any."""
        if self.done:
            return None
        server = attempt.server
        if msg[2] & wire.TC and not attempt.tcp:
            if self.judge:
                self.counters.upstream_error(label(server), "truncated")
            remaining = max(self.deadline - now, MIN_ATTEMPT)
            return Attempt(server, remaining, tcp=True, number=attempt.number)
        try:
            reply = wire.parse_reply(msg, self.question_end)
        except FormError as exc:
            return self.failed(attempt, BadUpstreamReply(f"{server}: unreadable reply: {exc}"), now)
        if not self.judge:
            self.outcome = (msg, reply)
            return None
        rtt = now - self.sent[attempt.number - 1]
        self.counters.upstream_reply(label(server), reply.rcode, rtt)
        if reply.rcode not in USABLE:
            error = UpstreamRcode(reply.rcode, f"{server}: {RCODE_NAMES[reply.rcode]}")
            return self.failed(attempt, error, now)
        if self.upstreams.answered(server, rtt) and self.on_health is not None:
            self.on_health(server, True, "")
        self.outcome = (msg, reply)
        return None

    def failed(self, attempt: Attempt, error: UpstreamError, now: float) -> Attempt | None:
        """`attempt` failed (timed out, unreachable, unreadable, or no usable reply). The next
        attempt to start, if any: only when `attempt` is the current one."""
        if self.done:
            return None
        if self.judge and not self.stopped:
            self.counters.upstream_error(label(attempt.server), error.reason)
            if self.upstreams.failed(attempt.server) and self.on_health is not None:
                self.on_health(attempt.server, False, error.reason)
        timeout = isinstance(error, UpstreamTimeout)
        self.timed_out |= timeout
        self.only_timeouts &= timeout
        self.last_error = error
        if attempt.number != self.attempts:
            return None  # an earlier attempt, late: the current one goes on
        return self.next_attempt(now)

    def denied(self, attempt: Attempt) -> None:
        """The packet budget had no token for `attempt` (not sent): the question is over."""
        if not self.done:
            self.error = PacketBudgetSpent(f"{attempt.server}: upstream packet budget spent")

    def stop(self) -> None:
        """Shutting down: no further attempt; failures from now on are not the upstream's."""
        self.stopped = True

    def first(self, now: float) -> Attempt | None:
        """The question's first attempt; None if there is no time for one (then `error` is set)."""
        return self.next_attempt(now)

    def next_attempt(self, now: float) -> Attempt | None:
        """The next attempt, or None once the question is over (then `error` is set)."""
        order, attempts = self.order, self.attempts
        new_round = attempts > 0 and attempts % len(order) == 0
        left = self.deadline - now
        # Over: shut down, no time left, or a round went by in which no attempt timed out.
        if self.stopped or left <= MIN_ATTEMPT or (new_round and not self.timed_out):
            error = self.last_error
            if error is None:
                error = UpstreamTimeout("no time left for any attempt")
            error.timed_out_only = self.only_timeouts
            self.error = error
            return None
        if new_round:
            self.timed_out = False
        self.attempts = attempts + 1
        self.sent.append(now)
        timeout = min(self.attempt_timeout, left)
        return _new_attempt(
            (order[attempts % len(order)], timeout, False, attempts + 1, left - timeout)
        )
