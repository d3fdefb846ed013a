"""Passive health: what the application's own TCP connections say about each endpoint.

Theory of operation
- Every `interval` the reader (discovery/passive_reader.py) hands over the application's TCP
  sockets to known endpoints (discovery/sock_diag.py). This module remembers each socket by the
  kernel's cookie (when it was first seen, whether it was already counted as stalled) and sums
  the sockets up per endpoint address; the endpoint table (discovery/endpoints.py) owns what
  follows from that, as it does for probe results.
- A stalled connect is one still in SYN_SENT `connect_timeout` after it was first seen (a SYN
  retransmission means at least the initial RTO of 1 s has passed, RFC 6298 2.1, so such a
  socket is at least that old whenever it was first seen). A stalled transfer is an
  established connection with three retransmission timeouts in a row (at least 1.4 s without
  an ack at the minimum RTO of 200 ms; two in a row are common on a merely lossy path). Each
  socket's stall counts once; a connection that recovers may stall again.
- An endpoint acked the application when a complete dump shows one of its established
  connections, not stalled, with an ack received since the previous complete dump. That is a
  success as far as "failures in a row" go (discovery/endpoints.py): on a lossy path, stalls
  far apart with acked traffic between them are not in a row. Idle connections receive no
  acks, so they prove nothing about an endpoint that has stopped answering.
- The latency a connection shows is the kernel's smoothed RTT plus its RTO times the share of
  its data segments that had to be retransmitted: a lost segment costs the application an RTO,
  which the smoothed RTT alone (Karn's rule leaves retransmitted segments out) never shows.
- A dump is complete (every state) or of connects only (the reader reads established
  connections less often: see discovery/passive_reader.py); after a connects-only dump the
  established sockets of the last complete one stand in for the current ones.
- Sockets gone from the dump are forgotten, so memory follows the application's connections,
  capped by the reader's `max_sockets`.
Time comes in as `now`; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.discovery.sock_diag import TCP_ESTABLISHED, TCP_SYN_SENT, TcpSocket

INITIAL_RTO = 1.0  # RFC 6298 2.1: the first SYN is retransmitted after 1 s
PROBE_STRETCH = 5.0  # probe interval multiplier while healthy traffic is seen
RTO_STALL = 3  # retransmission timeouts in a row that make an established connection stalled


@dataclass(frozen=True, slots=True)
class PassiveSettings:
    interval: float = 0.25
    connect_timeout: float = 1.0
    max_sockets: int = 4096  # sockets read per dump at most


@dataclass(slots=True)
class Traffic:
    """One dump's view of the application's connections to one endpoint address."""

    connections: int = 0
    stalls: int = 0  # connects that stalled since the last dump
    timeouts: int = 0  # established connections that stalled since the last dump
    retransmits: int = 0  # segments retransmitted, summed over the open connections
    latency: float | None = None  # mean over established connections with an RTT sample
    acked: bool = False  # an unstalled connection received an ack since the last complete dump
    reason: str = ""  # the first stall's description, for the log line


@dataclass
class PassiveWatch:
    settings: PassiveSettings = field(default_factory=PassiveSettings)
    first_seen: dict[bytes, float] = field(default_factory=dict)  # cookie -> now
    stalled: set[bytes] = field(default_factory=set)  # cookies already counted
    established: list[TcpSocket] = field(default_factory=list)  # of the last complete dump
    complete_at: float | None = None  # when the last complete dump was summarised

    def summarise(
        self, sockets: list[TcpSocket], now: float, *, complete: bool = True
    ) -> dict[str, Traffic]:
        """Per endpoint address, what this dump shows (with `complete` False: a dump of
        connects only, the last complete dump's established sockets standing in for the rest);
        forgets sockets no longer present."""
        acked_within = None  # how recent an ack is news: since the last complete dump
        if complete:
            self.established = [s for s in sockets if s.state == TCP_ESTABLISHED]
            if self.complete_at is not None:
                acked_within = now - self.complete_at
            self.complete_at = now
        else:
            sockets = sockets + self.established
        first_seen = {s.cookie: self.first_seen.get(s.cookie, now) for s in sockets}
        self.first_seen = first_seen
        self.stalled &= first_seen.keys()
        out: dict[str, Traffic] = {}
        latencies: dict[str, list[float]] = {}
        for sock in sockets:
            traffic = out.setdefault(sock.address, Traffic())
            traffic.connections += 1
            traffic.retransmits += sock.total_retrans
            why = self._stall(sock, now - first_seen[sock.cookie])
            if why is None:
                self.stalled.discard(sock.cookie)
            elif sock.cookie not in self.stalled:
                self.stalled.add(sock.cookie)
                if sock.state == TCP_SYN_SENT:
                    traffic.stalls += 1
                else:
                    traffic.timeouts += 1
                traffic.reason = traffic.reason or why
            if why is None and acked_within is not None and sock.ack_age <= acked_within:
                traffic.acked = True
            if sock.state == TCP_ESTABLISHED and sock.rtt is not None and why is None:
                lost = sock.total_retrans / sock.data_segs_out if sock.data_segs_out else 0.0
                latencies.setdefault(sock.address, []).append(sock.rtt + sock.rto * min(lost, 1))
        for address, values in latencies.items():
            out[address].latency = sum(values) / len(values)
        return out

    def _stall(self, sock: TcpSocket, age: float) -> str | None:
        if sock.state == TCP_SYN_SENT:
            if sock.retransmits:
                age = max(age, INITIAL_RTO)
            if age >= self.settings.connect_timeout:
                return f"connect in SYN_SENT for {age:.2f}s"
        elif sock.retransmits >= RTO_STALL:
            return f"{sock.retransmits} retransmission timeouts in a row"
        return None
