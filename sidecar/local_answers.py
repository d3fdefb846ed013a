"""Questions the sidecar answers itself, never forwarding them: the CHAOS class.

`id.server` / `hostname.bind` (CH TXT) name the host, `version.server` / `version.bind` give
the version (RFC 4892). They need no upstream, which makes `id.server CH TXT` the query of
`dns-sidecar healthcheck`: it passes while the VPC resolver is slow or down. Any other CHAOS
question gets REFUSED. Built with dnslib: this is not the hot path.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from dnslib import CLASS, QTYPE, RCODE, RR, TXT, DNSRecord

from sidecar import __version__

CLASS_CH = b"\x00\x03"

_NAMES: dict[str, Callable[[], str]] = {
    "id.server.": socket.gethostname,
    "hostname.bind.": socket.gethostname,
    "version.server.": lambda: f"dns-sidecar {__version__}",
    "version.bind.": lambda: f"dns-sidecar {__version__}",
}


def is_local(key: bytes) -> bool:
    """Whether a cache key (name + qtype + qclass + flag byte) asks in the CHAOS class."""
    return key[-3:-1] == CLASS_CH


def local_reply(query: bytes) -> bytes:
    request = DNSRecord.parse(query)
    reply = request.reply()
    name = str(request.q.qname).lower()
    text = _NAMES.get(name)
    if text is None or request.q.qtype not in (QTYPE.TXT, QTYPE.ANY):
        reply.header.rcode = RCODE.REFUSED
    else:
        reply.add_answer(RR(request.q.qname, QTYPE.TXT, CLASS.CH, 0, TXT(text())))
    reply.header.ra = 1
    return bytes(reply.pack())
