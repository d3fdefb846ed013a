"""Forwarding decisions for one question: which upstream to ask next, what a reply, a timeout
or an error means, and how much time each attempt gets. Plain code: the I/O layer
(sidecar/forwarder.py) carries out each `Attempt` and reports back with `replied` or `failed`,
giving the time (`now`, monotonic seconds) from the one clock.

The rules
- One deadline per question; each attempt gets min(attempt_timeout, what remains), and none
  starts with a millisecond or less left.
- Upstreams are asked in the set's order (its policy, health first), round and round until the
  deadline. A round in which no attempt timed out (every upstream refused, sent garbage or
  failed at once) ends the question: asking again at once would only hammer a server that is
  restarting, and a client retries on its own.
- SERVFAIL or REFUSED from one upstream moves on while an upstream of the set is not asked yet;
  the reply is kept and is the outcome if nothing better comes.
- A truncated UDP reply is asked again over TCP, of the same server, with all the time that
  remains (RFC 7766); the TCP reply is taken as it is.
- An unreadable reply is a failure of that upstream (BadUpstreamReply).
- Health: a reply marks the upstream answered (with its round-trip time) unless it is REFUSED,
  which counts as a failure (the upstream is misconfigured for us); a failure counts against
  it. Transitions down and up are reported through `on_health`, counts go to `Counters`.
- A probe (`judge=False`) asks one upstream once: any readable reply is its outcome; nothing is
  counted or judged, the caller decides what the answer means.
- Shutting down (`stop()`): no new attempt, and failures are no fault of the upstream's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import BadUpstreamReply, FormError, UpstreamError, UpstreamTimeout

MIN_ATTEMPT = 0.001  # seconds: an attempt with less time than this is not started

HealthChange = Callable[[HostPort, bool, str], None]  # (upstream, up, reason)


class Attempt(NamedTuple):
    """What the I/O layer does next: ask `server`, over TCP if `tcp`, for at most `timeout` s."""

    server: HostPort
    timeout: float
    tcp: bool = False


class Forwarding:
    """One question's way through a zone's upstreams (see the module's rules)."""

    __slots__ = (
        "attempt_timeout",
        "attempts",
        "counters",
        "deadline",
        "error",
        "fallback",
        "judge",
        "on_health",
        "order",
        "outcome",
        "over_tcp",
        "sent",
        "server",
        "stopped",
        "timed_out",
        "upstreams",
    )

    def __init__(
        self,
        upstreams: UpstreamSet[HostPort],
        counters: Counters,
        *,
        attempt_timeout: float,
        deadline: float,
        order: Sequence[HostPort] | None = None,
        judge: bool = True,
        on_health: HealthChange | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.counters = counters
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.order = list(order) if order is not None else upstreams.order()
        self.judge = judge
        self.on_health = on_health
        self.attempts = 0  # started, TCP retries of a truncated reply not counted
        self.timed_out = False  # an attempt of the current round timed out
        self.fallback: tuple[bytes, wire.Reply] | None = None
        self.outcome: tuple[bytes, wire.Reply] | None = None
        self.error: UpstreamError | None = None
        self.server: HostPort | None = None
        self.over_tcp = False
        self.sent = 0.0  # when the current attempt started (its UDP part, for a TCP retry)
        self.stopped = False

    def first(self, now: float) -> Attempt | None:
        """The first attempt; None if there is no time for one (then `error` is set)."""
        return self._next(now)

    def replied(self, msg: bytes, now: float) -> Attempt | None:
        """The current attempt brought `msg` (its ID and question already matched)."""
        server = self.server
        assert server is not None
        if msg[2] & wire.TC and not self.over_tcp:
            if self.judge:
                self.counters.upstream_error(str(server), "truncated")
            self.over_tcp = True
            return Attempt(server, max(self.deadline - now, MIN_ATTEMPT), tcp=True)
        try:
            reply = wire.parse_reply(msg)
        except FormError as exc:
            return self.failed(BadUpstreamReply(f"{server}: unreadable reply: {exc}"), now)
        if not self.judge:
            self.outcome = (msg, reply)
            return None
        rtt = now - self.sent
        self.counters.upstream_reply(str(server), reply.rcode, rtt)
        if reply.rcode == wire.REFUSED:
            self._judge_failed(server, "refused")  # misconfigured for us
        elif self.upstreams.answered(server, rtt) and self.on_health is not None:
            self.on_health(server, True, "")
        if reply.rcode in (wire.SERVFAIL, wire.REFUSED) and self.attempts < len(self.order):
            self.fallback = (msg, reply)
            return self._next(now)
        self.outcome = (msg, reply)
        return None

    def failed(self, error: UpstreamError, now: float) -> Attempt | None:
        """The current attempt failed (timed out, refused, unreachable, unreadable)."""
        if self.judge and not self.stopped and self.server is not None:
            self.counters.upstream_error(str(self.server), error.reason)
            self._judge_failed(self.server, error.reason)
        self.timed_out |= isinstance(error, UpstreamTimeout)
        next_attempt = self._next(now)
        if next_attempt is None and self.outcome is None:
            self.error = error
        return next_attempt

    def stop(self) -> None:
        """Shutting down: no further attempt; failures from now on are not the upstream's."""
        self.stopped = True

    def _judge_failed(self, server: HostPort, reason: str) -> None:
        if self.upstreams.failed(server) and self.on_health is not None:
            self.on_health(server, False, reason)

    def _next(self, now: float) -> Attempt | None:
        """The next attempt, or None once the question is done (outcome or error set)."""
        order, attempts = self.order, self.attempts
        new_round = attempts > 0 and attempts % len(order) == 0
        # Over: shut down, no time left, or a round went by in which no attempt timed out.
        if self.stopped or self.deadline - now <= MIN_ATTEMPT or (new_round and not self.timed_out):
            if self.fallback is not None:
                self.outcome = self.fallback
            else:
                self.error = UpstreamTimeout("no time left for any attempt")
            return None
        if new_round:
            self.timed_out = False
        server = order[attempts % len(order)]
        self.attempts = attempts + 1
        self.server = server
        self.over_tcp = False
        self.sent = now
        return Attempt(server, min(self.attempt_timeout, self.deadline - now))
