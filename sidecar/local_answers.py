"""Questions the sidecar answers itself, never forwarding them: the CHAOS class.

`id.server` / `hostname.bind` (CH TXT) name the host, `version.server` / `version.bind` give
the version (RFC 4892). They need no upstream, which makes `id.server CH TXT` the query of
`dns-sidecar healthcheck`: it passes while the VPC resolver is slow or down. Any other CHAOS
question gets REFUSED. Built from the bytes parse_query already checked, never by parsing the
whole query again: whatever else a hostile CHAOS query carries cannot make this fail.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from sidecar import __version__
from sidecar.core import wire
from sidecar.core.routing import wire_to_name

CLASS_CH = b"\x00\x03"
TYPE_TXT = 16

_NAMES: dict[str, Callable[[], str]] = {
    "id.server.": socket.gethostname,
    "hostname.bind.": socket.gethostname,
    "version.server.": lambda: f"dns-sidecar {__version__}",
    "version.bind.": lambda: f"dns-sidecar {__version__}",
}


def is_local(key: bytes) -> bool:
    """Whether a cache key (name + qtype + qclass + flag byte) asks in the CHAOS class."""
    return key[-3:-1] == CLASS_CH


def local_reply(query: bytes, q: wire.Query) -> bytes:
    """The answer to a CHAOS question: one TXT record (TTL 0, AA set), or REFUSED."""
    text = _NAMES.get(wire_to_name(q.key[:-5]))
    qend = q.question_end
    if text is None or q.qtype not in (TYPE_TXT, wire.TYPE_ANY):
        return wire.rcode_reply(query, q, wire.REFUSED)
    data = text().encode("utf-8", "replace")[:255]
    rdata = bytes((len(data),)) + data
    record = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_TXT, 3, 0, len(rdata)) + rdata
    flags = bytes((wire.QR | wire.AA | (query[2] & wire.RD), wire.RA | (query[3] & wire.CD)))
    opt = wire.opt_record(wire.EDNS_PAYLOAD, q.do) if q.edns_size else b""
    counts = wire.COUNTS.pack(1, 1, 0, 1 if opt else 0)
    return query[:2] + flags + counts + query[wire.HEADER_SIZE : qend] + record + opt
