"""SRV answers of discovery zones: dead targets left out, weights from measured latency.

ECS registers services in `bridge` and `host` network mode with SRV records only: Cloud Map
writes `svc.local SRV 1 1 PORT <instance-id>.svc.local.` and an A (or AAAA) record for each
target, and in bridge mode PORT is the dynamic host port. So an endpoint here is a target's
address at the SRV record's port (EndpointTable keys it with that port), probed with the
zone's check kind and path at that port.

Theory of operation
- A cached SRV answer of a discovery zone gets a `ShapedSrv` beside it (the cache entry is
  never changed), one prepared reply, made again when the endpoint table's `version` moves.
- A target's addresses are the A/AAAA records of the reply's additional section owned by the
  target name. A target with none there stays in the answer as the upstream gave it, with
  its weight (nothing known about it; a resolver looks it up itself).
- A record whose target's every address is known unhealthy is left out, and so are its
  address records in the additional section, which carries exactly the addresses of the
  targets kept. If that leaves no record, the answer fails open: every record as it came.
- Weights are rewritten from latency as discovery/shaping.py weighs addresses (a record's
  latency is its fastest live address's): weight = max(1, round(100 x w)), so faster targets
  get more and every live one at least 1 (RFC 2782: 0 means "almost never"). Priorities are
  kept: a client tries the lower priority first whatever the weights.
- The shaped TTL is capped at `answer_ttl`, as for A/AAAA answers; authority records go.
No I/O here: time comes in as `now`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.core import bailiwick, wire
from sidecar.core.cache import Entry, pool_cost
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.shaping import (
    PER_ANSWER,
    POOL_OVERHEAD,
    ServedPool,
    ShapeSettings,
    address_text,
    variant_entry,
    weights,
)

SRV_FIXED = struct.Struct("!HHH")  # priority, weight, port
WEIGHT_SCALE = 100


@dataclass(frozen=True, slots=True)
class SrvRecord:
    index: int  # among the reply's answer records
    priority: int
    weight: int
    port: int
    target: bytes  # lowercased wire name


@dataclass
class ShapedSrv(ServedPool):
    """The prepared SRV reply for one cached answer; rebuilt when the endpoint table changes."""

    base: Entry
    msg: bytes
    zone: str
    do: bool
    table: EndpointTable
    settings: ShapeSettings
    counts: dict[tuple[str, str], int]
    records: list[SrvRecord]
    addresses: dict[bytes, list[tuple[int, str]]]  # target -> (additional index, address)
    version: int = -1
    action: str = "reordered"
    variants: list[Entry] = field(default_factory=list)
    generation: int = 0
    signature: tuple[object, ...] = ()
    seen_at: float = -math.inf
    charge: Callable[[int], None] | None = None
    kept: dict[int, int] = field(default_factory=dict)  # record index -> weight, as drawn

    def targets_seen(self, now: float) -> None:
        """Keep the targets' endpoints in the table (new ones are probed at once)."""
        self.seen_at = now
        for record in self.records:
            found = self.addresses.get(record.target, [])
            self.table.seen(self.zone, [a for _, a in found], now, record.port)

    def rebuild(self) -> None:
        self.version = self.table.version
        live: list[tuple[SrvRecord, float | None]] = []
        for record in self.records:
            found = self.addresses.get(record.target, [])
            endpoints = [self.table.get(self.zone, a, record.port) for _, a in found]
            usable = [e for e in endpoints if e is None or e.usable]
            if found and not usable:
                continue  # every address of the target known dead
            known = [e.latency for e in usable if e is not None and e.latency is not None]
            live.append((record, min(known) if known else None))
        s = self.settings
        if live:
            w = weights([lat for _, lat in live], s.slack, s.scale, s.steepness)
            kept = {
                r.index: max(1, round(WEIGHT_SCALE * x)) for (r, _), x in zip(live, w, strict=True)
            }
            fixed = {r.index for r, _ in live if not self.addresses.get(r.target)}
            for index in fixed:  # nothing known of it: the upstream's weight
                kept[index] = next(r.weight for r in self.records if r.index == index)
        else:
            kept = {r.index: r.weight for r in self.records}
        signature = tuple(sorted(kept.items()))
        if signature == self.signature and self.variants:
            return
        self.signature = signature
        self.kept = kept
        self.action = (
            "failed_open"
            if not live
            else "filtered"
            if len(live) < len(self.records)
            else "reordered"
        )
        self.variants = [self._message(kept)]
        self.generation += 1
        if self.charge is not None:
            cost = POOL_OVERHEAD + len(self.msg) + PER_ANSWER * len(self.records)
            self.charge(cost + pool_cost(self.variants))

    def _message(self, kept: dict[int, int]) -> Entry:
        """The reply with the SRV records of `kept` (index -> weight), every other answer
        record, and in the additional section exactly the addresses of the targets kept."""
        from dnslib import DNSRecord  # only when an SRV answer is shaped

        record = DNSRecord.parse(self.msg)
        srv_indexes = {r.index for r in self.records}
        targets = {r.target for r in self.records if r.index in kept}
        answers = []
        for index, rr in enumerate(record.rr):
            if index in srv_indexes:
                if index not in kept:
                    continue
                rr.rdata.weight = kept[index]
            answers.append(rr)
        keep_additional = {i for t in targets for i, _ in self.addresses.get(t, [])}
        record.rr = answers
        record.auth = []
        record.ar = [rr for i, rr in enumerate(record.ar) if i in keep_additional]
        return variant_entry(bytes(record.pack()), self.base, self.do)

    def refresh(self, now: float) -> None:
        """Bring the reply up to date with the endpoint table; before serving from it."""
        if now - self.seen_at > 10.0:
            self.targets_seen(now)
        if self.version != self.table.version:
            self.rebuild()

    def live_addresses(self, ipv6: bool, now: float) -> list[str]:
        """The addresses of the targets kept (IPv6 or IPv4), heaviest target first: what
        `synthesize_a` answers an A/AAAA question of the SRV name with."""
        self.refresh(now)
        out: list[str] = []
        heaviest = sorted(self.records, key=lambda r: (r.priority, -self.kept.get(r.index, 0)))
        for record in heaviest:
            if record.index not in self.kept:
                continue
            for _, address in self.addresses.get(record.target, []):
                if (":" in address) == ipv6 and address not in out:
                    out.append(address)
        return out

    def pick(self) -> Entry:
        """The one prepared reply."""
        return self.variants[0]


def shape_srv(
    entry: Entry,
    msg: bytes,
    reply: wire.Reply,
    zone: str,
    do: bool,
    table: EndpointTable,
    settings: ShapeSettings,
    counts: dict[tuple[str, str], int],
    now: float,
) -> ShapedSrv | None:
    """A ShapedSrv for a positive SRV answer with SRV records in it, else None."""
    if entry.negative or entry.rcode != wire.NOERROR or entry.ttl <= 0:
        return None
    qend = reply.question_end
    if int.from_bytes(msg[qend - 4 : qend - 2], "big") != wire.TYPE_SRV:
        return None
    answers = [r for r in reply.records if r.section == 0]
    additional = [r for r in reply.records if r.section == 2]
    try:
        records = []
        for index, r in enumerate(answers):
            if r.rtype == wire.TYPE_SRV and r.rdlength > SRV_FIXED.size:
                priority, weight, port = SRV_FIXED.unpack_from(msg, r.rdata_offset)
                target = bailiwick.read_name(msg, r.rdata_offset + SRV_FIXED.size)
                records.append(SrvRecord(index, priority, weight, port, target))
        addresses: dict[bytes, list[tuple[int, str]]] = {}
        for index, r in enumerate(additional):
            address = address_text(msg, r)
            if address is not None:
                owner = bailiwick.read_name(msg, r.start)
                addresses.setdefault(owner, []).append((index, address))
    except Exception:  # FormError, a short record: not shaped, served as it came
        return None
    if not records:
        return None
    shaped = ShapedSrv(entry, msg, zone, do, table, settings, counts, records, addresses)
    shaped.targets_seen(now)
    return shaped


__all__ = ["ShapedSrv", "SrvRecord", "shape_srv"]
