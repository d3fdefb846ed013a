"""When the passive reader may skip a dump: the network namespace's TCP counters.

A speed-up, fenced here. A socket-diagnostics dump walks the kernel's whole TCP hash table
(262,144 buckets on the test machine: ~1 ms of CPU with no socket in it at all), and the reader
dumps connects four times a second; reading /proc/net/snmp costs ~11 us. Invariants:
- Every socket enters SYN_SENT through an active open, which the kernel counts (Tcp ActiveOpens)
  before the SYN leaves. So when ActiveOpens has not moved since a dump of connects that found
  none to the same destinations, a new dump would find none either: it is skipped.
- A dump that found a connect is always followed by another (the connect's age is followed).
- Tcp CurrEstab counts every ESTABLISHED (and CLOSE_WAIT) socket of the namespace: when it is 0
  there is no established connection to read.
- Counters that cannot be read never skip anything.
Plain code over the counters' values; `read_counters` is the one read of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SNMP = "/proc/net/snmp"


class TcpCounters(NamedTuple):
    active_opens: int
    established: int  # CurrEstab


def parse_snmp(text: bytes) -> TcpCounters | None:
    """The Tcp counters of /proc/net/snmp's text (a line of names, then a line of values)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith(b"Tcp:")]
    if len(rows) < 2:
        return None
    values = dict(zip(rows[0], rows[1], strict=False))
    try:
        return TcpCounters(int(values[b"ActiveOpens"]), int(values[b"CurrEstab"]))
    except (KeyError, ValueError):
        return None


def read_counters(path: str = SNMP) -> TcpCounters | None:
    try:
        with open(path, "rb") as f:
            return parse_snmp(f.read())
    except OSError:
        return None


@dataclass
class DumpGate:
    """What the next dump must cover, from the counters and what the last dumps found."""

    opens_at_last_dump: int | None = None  # ActiveOpens when connects were last dumped
    destinations: frozenset[tuple[str, int]] = frozenset()
    connects_found: bool = True  # the last dump found a connect (or there was none yet)

    def need_connects(
        self, counters: TcpCounters | None, destinations: frozenset[tuple[str, int]]
    ) -> bool:
        return (
            counters is None
            or self.connects_found
            or destinations != self.destinations
            or counters.active_opens != self.opens_at_last_dump
        )

    @staticmethod
    def need_established(counters: TcpCounters | None) -> bool:
        return counters is None or counters.established > 0

    def dumped(
        self,
        counters: TcpCounters | None,
        destinations: frozenset[tuple[str, int]],
        connects_found: bool,
    ) -> None:
        """Connects were dumped (after `counters` were read) and some were found or not."""
        self.opens_at_last_dump = None if counters is None else counters.active_opens
        self.destinations = destinations
        self.connects_found = connects_found
