"""Which upstream of a zone to ask next: failure counts, smoothed RTT, the policy.

Theory of operation
- Each upstream has a count of failures in a row and a smoothed RTT (EWMA, weight 1/8 as TCP's
  SRTT in RFC 6298). `max_fails` failures in a row mark it down; one answer marks it up again.
- A down upstream is skipped while any other is up; when all are down, all are tried in the
  configured order (asking a maybe-dead server beats answering SERVFAIL without trying).
- Policies: `sequential` keeps the order given (the first is the primary), `random` shuffles on
  every query, `fastest` orders by smoothed RTT (an upstream never measured counts as fastest,
  so that it gets measured).
- Down upstreams are probed in the background by the I/O layer (`down()` says which), so that a
  recovered upstream is used again without a client paying for the test.
Time comes in as arguments; randomness from an injectable `random.Random`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

POLICIES = ("sequential", "random", "fastest")
SRTT_WEIGHT = 0.125

Upstream = TypeVar("Upstream")


@dataclass
class UpstreamState:
    failures: int = 0
    srtt: float | None = None
    down: bool = False


class UpstreamSet(Generic[Upstream]):
    """The upstreams of one zone with their health, and the order to ask them in."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        policy: str = "sequential",
        max_fails: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if not upstreams:
            raise ValueError("a zone needs at least one upstream")
        self.upstreams = tuple(upstreams)
        self.policy = policy
        self.max_fails = max_fails
        self.state = {upstream: UpstreamState() for upstream in self.upstreams}
        self._rng = rng or random.Random()
        self._down = 0  # how many are down: while none, order() reads no state
        # The order while none is down, where the policy keeps the configured one (sequential,
        # or a single upstream): read by every question without a call; None: ask `order()`.
        self._keeps_order = policy == "sequential" or len(self.upstreams) == 1
        self.fixed_order: tuple[Upstream, ...] | None = (
            self.upstreams if self._keeps_order else None
        )
        self.on_down: Callable[[], None] | None = None  # told when an upstream goes down

    def __repr__(self) -> str:
        parts = []
        for upstream, state in self.state.items():
            srtt = "-" if state.srtt is None else f"{state.srtt * 1000:.1f}ms"
            parts.append(f"{upstream} {'down' if state.down else 'up'} srtt={srtt}")
        return f"<UpstreamSet {self.policy}: {', '.join(parts)}>"

    def order(self) -> list[Upstream]:
        """The upstreams to try for one query, best first; down ones only if all are down."""
        if not self._down:
            if self.policy == "sequential" or len(self.upstreams) == 1:
                return list(self.upstreams)
            candidates = list(self.upstreams)
        else:
            candidates = [u for u in self.upstreams if not self.state[u].down]
            if not candidates:
                candidates = list(self.upstreams)
        if self.policy == "random" and len(candidates) > 1:
            self._rng.shuffle(candidates)
        elif self.policy == "fastest":
            candidates.sort(key=lambda u: self.state[u].srtt or 0.0)
        return candidates

    def answered(self, upstream: Upstream, rtt: float) -> bool:
        """Record an answer; True when this brought a down upstream back up."""
        state = self.state[upstream]
        state.srtt = rtt if state.srtt is None else state.srtt + SRTT_WEIGHT * (rtt - state.srtt)
        state.failures = 0
        if state.down:
            state.down = False
            self._down -= 1
            if not self._down and self._keeps_order:
                self.fixed_order = self.upstreams
            return True
        return False

    def failed(self, upstream: Upstream) -> bool:
        """Record a failure; True when this marked the upstream down."""
        state = self.state[upstream]
        state.failures += 1
        if not state.down and state.failures >= self.max_fails:
            state.down = True
            self._down += 1
            self.fixed_order = None
            if self.on_down is not None:
                self.on_down()
            return True
        return False

    def down(self) -> list[Upstream]:
        return [u for u in self.upstreams if self.state[u].down]

    def healthy(self, upstream: Upstream) -> bool:
        return not self.state[upstream].down
