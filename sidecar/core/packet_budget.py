"""How many packets the sidecar may send to its upstreams: a token bucket, one token a packet.

Why: the VPC resolver (169.254.169.253) takes at most 1024 packets per second from one network
interface and drops the rest (`linklocal_allowance_exceeded`). Every bridge-mode task of an
instance, and a per-instance daemon for all of them, shares that interface. Sending beyond the
limit only loses packets and then waits out attempt timeouts; refusing at once lets the
pipeline answer stale or SERVFAIL without delay.

The rules
- The bucket fills at `rate` tokens a second and holds at most a tenth of a second's worth
  (`BURST_SECONDS`), so any one-second window sees at most 1.1 x rate packets: with the
  default 900, 990, below the 1024 limit even when a full bucket is spent at once.
- Client work (a miss a client waits for) may spend every token. Background work (prefetch,
  refresh ahead, probes of down upstreams) only spends while more than `RESERVE` of the
  bucket is left, so it is denied first and never takes the last tokens from a client.
- A packet costs one token; a TCP exchange costs `TCP_PACKETS` (what we send for one query:
  SYN, the query, the ACKs of the reply, FIN).
- `rate` 0 turns the budget off: every take succeeds.
Sans-IO: the caller passes `now` (monotonic seconds) and sends only what was granted.
"""

from __future__ import annotations

BURST_SECONDS = 0.1  # the bucket holds this many seconds of packets
RESERVE = 0.5  # background work spends only while more than this share of the bucket is left
TCP_PACKETS = 5  # packets we send for one TCP query: SYN, query, ACKs of the reply, FIN


class PacketBudget:
    """A token bucket over the packets sent to the upstreams (see the module's rules)."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = 0.0
        self.capacity = 0.0
        self.tokens = 0.0
        self.updated = now
        self.resize(rate, now)
        self.tokens = self.capacity  # full at start

    def resize(self, rate: float, now: float) -> None:
        """A new rate (a reload); the tokens left are kept, up to the new capacity."""
        self._refill(now)
        self.rate = rate
        # At least one TCP query's worth, so a small rate never denies every TCP retry.
        self.capacity = max(rate * BURST_SECONDS, float(TCP_PACKETS)) if rate else 0.0
        self.tokens = min(self.tokens, self.capacity)

    def take(self, packets: int, now: float, *, background: bool = False) -> bool:
        """Spend `packets` tokens: True if they may be sent now, False if not (nothing spent)."""
        if not self.rate:
            return True
        self._refill(now)
        floor = self.capacity * RESERVE if background else 0.0
        if self.tokens - packets < floor:
            return False
        self.tokens -= packets
        return True

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now
