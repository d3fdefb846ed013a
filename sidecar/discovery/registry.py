"""The Cloud Map registry as an address source: its instances, and answers made from them.

Theory of operation
- A service's `Listing` is what DiscoverInstances said of it (every instance, up to 1,000,
  HEALTHY, UNHEALTHY and UNKNOWN alike) and when Cloud Map last confirmed it: a full lookup,
  or a DiscoverInstancesRevision call that found the revision unchanged. discovery/cloudmap.py
  owns the listings; the pipeline asks for one when it stores an upstream reply.
- A listing confirmed within `fresh_for` seconds is believed over DNS; an older one, or none
  (Cloud Map failing, throttling us, or not knowing the service), leaves DNS answers as they
  came. Route 53 lags the registry, never the other way round, so an address DNS lists that
  a fresh listing does not is an instance already deregistered.
- `registry_reply` makes the answer to an A, AAAA or SRV question of a service name:
  - a positive DNS answer of the question's type alone (no CNAME) has its records replaced by
    one per registered instance that has an address of the family (SRV: a port): all of them,
    not Route 53's 8, and none deregistered. Unchanged (same addresses) it is left as it came.
    An empty listing changes nothing (a service scaled to zero: DNS says what it says);
  - an NXDOMAIN or empty (NODATA) answer is not believed while the listing has instances not
    UNHEALTHY with such an address: they are served, with a TTL of `negative_ttl`, so the
    sidecar asks again soon (the VPC resolver keeps a private zone's NXDOMAIN 300 s);
  - UNHEALTHY instances stay in a positive answer: shaping leaves them out (Cloud Map's word
    is in the endpoint table), or fails open with them when nothing else is left.
  SRV records are Cloud Map's own: priority 1, weight 1, the instance's AWS_INSTANCE_PORT,
  target <instance-id>.<service name>, with the target's A/AAAA records in the additional
  section (as Route 53 serves them). Instances come in instance-id order, so the same listing
  makes the same message.
- `added` names the addresses (SRV: address and port) the registry put in that DNS did not
  have: the pipeline holds them out of answers until their first probe.
No I/O here: time comes in as `now`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import bailiwick, wire

SRV_FIXED = struct.Struct("!HHH")  # priority, weight, port
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
AZ_ATTRIBUTE = "AVAILABILITY_ZONE"  # set by ECS on the instances it registers
MAX_LABEL = 63


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance of a Cloud Map service, as DiscoverInstances lists it."""

    instance_id: str
    ipv4: str | None = None
    ipv6: str | None = None
    port: int | None = None
    health: str | None = None  # HEALTHY / UNHEALTHY; None: UNKNOWN (no check, not decided)
    az: str | None = None  # its availability zone (the AVAILABILITY_ZONE attribute)

    def address(self, qtype: int) -> str | None:
        return self.ipv6 if qtype == wire.TYPE_AAAA else self.ipv4


@dataclass(frozen=True, slots=True)
class Listing:
    instances: tuple[Instance, ...]
    confirmed_at: float  # when Cloud Map last said this is current


def _address(value: object, version: int) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    return str(address) if address.version == version else None  # the form answers are read in


def _port(value: object) -> int | None:
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return None


def instances_of(raw: Iterable[Mapping[str, Any]]) -> tuple[Instance, ...]:
    """DiscoverInstances' `Instances`, read; an instance with no usable address is left out."""
    out = []
    for item in raw:
        attributes = item.get("Attributes") or {}
        ipv4 = _address(attributes.get("AWS_INSTANCE_IPV4"), 4)
        ipv6 = _address(attributes.get("AWS_INSTANCE_IPV6"), 6)
        if ipv4 is None and ipv6 is None:
            continue
        health = item.get("HealthStatus")
        az = attributes.get(AZ_ATTRIBUTE)
        out.append(
            Instance(
                str(item.get("InstanceId") or ""),
                ipv4,
                ipv6,
                _port(attributes.get("AWS_INSTANCE_PORT")),
                health if health in ("HEALTHY", "UNHEALTHY") else None,
                az if isinstance(az, str) and az else None,
            )
        )
    return tuple(sorted(out, key=lambda i: (i.instance_id, i.ipv4 or "", i.ipv6 or "")))


def statuses(instances: Iterable[Instance]) -> dict[str, str]:
    """{address: HEALTHY|UNHEALTHY}; UNKNOWN says nothing. An address listed twice with
    different statuses is UNHEALTHY."""
    out: dict[str, str] = {}
    for instance in instances:
        if instance.health is None:
            continue
        for address in (instance.ipv4, instance.ipv6):
            if address is not None and out.get(address) != "UNHEALTHY":
                out[address] = instance.health
    return out


def availability_zones(instances: Iterable[Instance]) -> dict[str, str]:
    """{address: availability zone} of the instances that say theirs."""
    return {
        address: instance.az
        for instance in instances
        if instance.az is not None
        for address in (instance.ipv4, instance.ipv6)
        if address is not None
    }


@dataclass(frozen=True, slots=True)
class RegistryReply:
    msg: bytes
    kind: str  # "merged": a positive answer changed; "negative_replaced"
    added: tuple[tuple[str, int | None], ...]  # (address, SRV port or None) DNS did not have


def _label(instance_id: str) -> bytes | None:
    raw = instance_id.lower().encode("ascii", "ignore")
    if not raw or len(raw) > MAX_LABEL or b"." in raw or len(raw) != len(instance_id):
        return None
    return bytes((len(raw),)) + raw


def _dns_members(msg: bytes, reply: wire.Reply, qtype: int) -> set[tuple[str, int | None]]:
    """What the DNS answer lists: addresses, or for SRV (target address, port) pairs (a
    target without an address in the additional section counts by its name)."""
    answers = [r for r in reply.records if r.section == 0]
    if qtype != wire.TYPE_SRV:
        return {
            (str(ipaddress.ip_address(msg[r.rdata_offset : r.rdata_offset + r.rdlength])), None)
            for r in answers
            if r.rdlength in (4, 16)
        }
    owned: dict[bytes, list[str]] = {}
    for r in reply.records:
        if r.section == 2 and r.rtype in wire.ADDRESS_TYPES and r.rdlength in (4, 16):
            data = msg[r.rdata_offset : r.rdata_offset + r.rdlength]
            owned.setdefault(bailiwick.read_name(msg, r.start), []).append(
                str(ipaddress.ip_address(data))
            )
    out: set[tuple[str, int | None]] = set()
    for r in answers:
        if r.rdlength <= SRV_FIXED.size:
            continue
        port = SRV_FIXED.unpack_from(msg, r.rdata_offset)[2]
        target = bailiwick.read_name(msg, r.rdata_offset + SRV_FIXED.size)
        for address in owned.get(target, [target.hex()]):
            out.add((address, port))
    return out


def _members(instances: Iterable[Instance], qtype: int) -> set[tuple[str, int | None]]:
    out: set[tuple[str, int | None]] = set()
    for instance in instances:
        if qtype == wire.TYPE_SRV:
            for address in (instance.ipv4, instance.ipv6):
                if address is not None and instance.port is not None:
                    out.add((address, instance.port))
        else:
            address = instance.address(qtype)
            if address is not None:
                out.add((address, None))
    return out


def _usable(instance: Instance, qtype: int) -> bool:
    if qtype == wire.TYPE_SRV:
        return instance.port is not None and _label(instance.instance_id) is not None
    return instance.address(qtype) is not None


def registry_reply(
    msg: bytes,
    reply: wire.Reply,
    qtype: int,
    name: bytes,
    listing: Listing | None,
    negative_ttl: int,
) -> RegistryReply | None:
    """The answer made from `listing` for the upstream reply `msg` to a `qtype` question of
    the service name `name` (lowercased wire); None: the reply stands as it came."""
    if listing is None or qtype not in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_SRV):
        return None
    if reply.truncated or reply.rcode not in (wire.NOERROR, wire.NXDOMAIN):
        return None
    answers = [r for r in reply.records if r.section == 0]
    if any(r.rtype != qtype for r in answers):
        return None  # a CNAME or anything else: not a plain service answer
    if answers and reply.rcode == wire.NOERROR:
        chosen = [i for i in listing.instances if _usable(i, qtype)]
        if not chosen:
            return None
        try:
            dns = _dns_members(msg, reply, qtype)
        except Exception:  # a record we cannot read: the reply stands as it came
            return None
        ours = _members(chosen, qtype)
        if ours == dns:
            return None
        ttl, kind = min(r.ttl for r in answers), "merged"
    else:
        chosen = [i for i in listing.instances if _usable(i, qtype) and i.health != "UNHEALTHY"]
        if not chosen:
            return None
        dns, ours = set(), _members(chosen, qtype)
        ttl, kind = negative_ttl, "negative_replaced"
    if ttl <= 0:
        return None
    made = _message(msg, reply, qtype, name, chosen, ttl)
    return RegistryReply(made, kind, tuple(sorted(ours - dns, key=str)))


def _message(
    msg: bytes, reply: wire.Reply, qtype: int, name: bytes, chosen: list[Instance], ttl: int
) -> bytes:
    """The upstream's reply made into one record per instance (wire.made_reply); SRV targets'
    addresses in the additional section."""
    if qtype != wire.TYPE_SRV:
        records = []
        for instance in chosen:
            address = instance.address(qtype)
            assert address is not None
            records.append(wire.address_record(qtype, ttl, ipaddress.ip_address(address).packed))
        return wire.made_reply(msg, reply, records)
    # SRV: targets written out in full (RFC 2782: no compression in the target), their
    # address records' owners pointing at them.
    answers: list[bytes] = []
    additional: list[bytes] = []
    offset = reply.question_end
    for instance in chosen:
        label = _label(instance.instance_id)
        assert label is not None and instance.port is not None
        target = label + name
        rdata = SRV_FIXED.pack(1, 1, instance.port) + target
        record = b"\xc0\x0c" + RR_FIXED.pack(wire.TYPE_SRV, 1, ttl, len(rdata)) + rdata
        target_at = offset + 2 + RR_FIXED.size + SRV_FIXED.size
        answers.append(record)
        offset += len(record)
        # a pointer reaches the first 16 KiB of a message; past that, the name in full
        owner = struct.pack("!H", 0xC000 | target_at) if target_at < 0x4000 else target
        for rtype, address in ((wire.TYPE_A, instance.ipv4), (wire.TYPE_AAAA, instance.ipv6)):
            if address is not None:
                packed = ipaddress.ip_address(address).packed
                additional.append(owner + RR_FIXED.pack(rtype, 1, ttl, len(packed)) + packed)
    return wire.made_reply(msg, reply, answers, additional)
