"""Bailiwick: which records of an upstream reply belong to the question it answers.

The cache is keyed by question, so a record can only ever be served inside the answer to the
question it came with; but a reply carrying records for other names (spoofed, or from a
confused upstream) must not be kept and handed out for the whole TTL. The rule is the simplest
one that still caches every well-formed answer, and a reply that breaks it is served once to
the clients waiting for it and never cached:

- answer section: the owner is the question's name or a name the CNAME chain from it reaches
  (records may come in any order); a DNAME or RRSIG may also sit at an ancestor of such a name
  (RFC 6672: the DNAME that synthesised a CNAME of the chain, and its signature);
- authority and additional sections: the owner is at or below the zone the question was routed
  by (everything is below the root, the zone of the default upstreams), or at an ancestor of a
  name of the chain (the SOA or NS of the enclosing zone, which can sit above a configured
  zone such as `svc.cluster.local`).

Names are compared in lowercased, uncompressed wire form. Any name that cannot be read makes
the reply out of bailiwick.
"""

from __future__ import annotations

from typing import Final

from sidecar.core import wire
from sidecar.errors import FormError

TYPE_CNAME = 5
TYPE_DNAME = 39
TYPE_RRSIG = 46
ROOT: Final = b"\x00"


def read_name(msg: bytes, offset: int) -> bytes:
    """The name at `offset`, decompressed and lowercased; FormError when it cannot be read."""
    runs: list[tuple[int, int]] = []
    wire.walk_name(msg, offset, runs)
    return b"".join([msg[start:stop] for start, stop in runs]).lower()


def at_or_below(name: bytes, zone: bytes) -> bool:
    """Whether wire name `name` is `zone` or a name below it (whole labels)."""
    if len(zone) > len(name) or not name.endswith(zone):
        return False
    offset = 0
    cut = len(name) - len(zone)
    while offset < cut:
        offset += name[offset] + 1
    return offset == cut


def in_bailiwick(msg: bytes, reply: wire.Reply, qname: bytes, zone: bytes = ROOT) -> bool:
    """Whether every record of `reply` belongs to the question `qname` routed by `zone` (both
    lowercased wire names); see the module docstring for the rule."""
    try:
        # An owner that is a pointer to the question's name is `qname` when that is the
        # question (it is for every reply forwarded: ours matched, ignoring case): no walk.
        asked = msg[wire.HEADER_SIZE : wire.HEADER_SIZE + len(qname)].lower() == qname
        if asked:
            for record in reply.records:
                if (
                    msg[record.start : record.start + 2] != wire.QUESTION_POINTER
                    or record.rtype == TYPE_CNAME  # its target must be readable too
                ):
                    break
            else:
                return True  # every record is the question's name's (the common answer)
        owners = [
            qname
            if asked and msg[record.start : record.start + 2] == wire.QUESTION_POINTER
            else read_name(msg, record.start)
            for record in reply.records
        ]
        targets: dict[bytes, list[bytes]] = {}
        for owner, record in zip(owners, reply.records, strict=True):
            if record.section == 0 and record.rtype == TYPE_CNAME:
                targets.setdefault(owner, []).append(read_name(msg, record.rdata_offset))
    except FormError:
        return False
    chain = {qname}
    todo = [qname]
    while todo:
        for target in targets.get(todo.pop(), ()):
            if target not in chain:
                chain.add(target)
                todo.append(target)
    for owner, record in zip(owners, reply.records, strict=True):
        if owner in chain:
            continue
        above_chain = any(at_or_below(name, owner) for name in chain)
        if record.section == 0:
            if not (above_chain and record.rtype in (TYPE_DNAME, TYPE_RRSIG)):
                return False
        elif not (above_chain or at_or_below(owner, zone)):
            return False
    return True
