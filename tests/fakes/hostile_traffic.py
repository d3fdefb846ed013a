"""Hostile client traffic: a table of every malformed query the sidecar must survive, with what
it must answer, and endless seeded streams of hostile datagrams and junk TCP streams for the
flood and soak tests. Pure functions of a `random.Random`, so a failure can be replayed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

FORMERR, NOTIMP, REFUSED, NOERROR = 1, 4, 5, 0

HOSTILE_NAME = b"\x07hostile\x04test\x00"


def header(
    qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100, qid: int = 0x1234
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def question(name: bytes = HOSTILE_NAME, qtype: int = 1, qclass: int = 1) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


def opt(
    payload: int = 1232, rdata: bytes = b"", rdlength: int | None = None, do: bool = False
) -> bytes:
    size = len(rdata) if rdlength is None else rdlength
    return b"\x00" + struct.pack("!HHIH", 41, payload, 0x8000 if do else 0, size) + rdata


def query(name: bytes = HOSTILE_NAME, qtype: int = 1, *, edns: int = 0, qid: int = 0x1234) -> bytes:
    """A well-formed query (RD set), with an OPT record advertising `edns` when non-zero."""
    return (
        header(ar=1 if edns else 0, qid=qid) + question(name, qtype) + (opt(edns) if edns else b"")
    )


def name_of(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


@dataclass(frozen=True)
class HostileCase:
    name: str
    data: bytes
    reply: int | None  # the rcode the sidecar answers with; None: no answer at all
    readable: bool = False  # parse_query accepts it and the pipeline decides


_A = b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"  # type A, IN, TTL 60, 192.0.2.1

CASES: tuple[HostileCase, ...] = (
    HostileCase("empty", b"", None),
    HostileCase("one byte", b"\x12", None),
    HostileCase("shorter than a header", header()[:11], None),
    HostileCase("response, QR set", header(flags=0x8180) + question(), None),
    HostileCase(
        "response with an answer", header(flags=0x8180, an=1) + question() + b"\xc0\x0c" + _A, None
    ),
    HostileCase("opcode IQUERY", header(flags=1 << 11) + question(), NOTIMP),
    HostileCase("opcode STATUS", header(flags=2 << 11) + question(), NOTIMP),
    HostileCase("opcode NOTIFY", header(flags=4 << 11) + question(), NOTIMP),
    HostileCase("opcode UPDATE", header(flags=5 << 11, ns=1) + question(), NOTIMP),
    HostileCase("opcode 15", header(flags=15 << 11) + question(), NOTIMP),
    HostileCase("no question", header(qd=0), FORMERR),
    HostileCase("two questions", header(qd=2) + question() * 2, FORMERR),
    HostileCase("65535 questions", header(qd=65535) + question(), FORMERR),
    HostileCase("name runs off the end", header() + b"\x07hostile\x04te", FORMERR),
    HostileCase("question without qclass", header() + HOSTILE_NAME + b"\x00\x01", FORMERR),
    HostileCase("label of 64 bytes", header() + question(name_of([b"a" * 64])), FORMERR),
    HostileCase("reserved label type", header() + b"\x41" + b"a" * 65 + b"\x00" + _A[:4], FORMERR),
    HostileCase(
        "name of 256 bytes", header() + question(name_of([b"a" * 63] * 3 + [b"b" * 62])), FORMERR
    ),
    HostileCase("compressed question name", header() + b"\xc0\x0c\x00\x01\x00\x01", FORMERR),
    HostileCase(
        "compression loop in additional",
        header(ar=1) + question() + b"\xc0\x1e" + _A,  # 0x1e: the pointer's own offset
        FORMERR,
    ),
    HostileCase(
        "forward pointer in additional", header(ar=1) + question() + b"\xc0\x40" + _A, FORMERR
    ),
    HostileCase(
        "absurd section counts", header(an=65535, ns=65535, ar=65535) + question(), FORMERR
    ),
    HostileCase("answers promised but absent", header(an=2) + question(), FORMERR),
    HostileCase(
        "OPT length past the end", header(ar=1) + question() + opt(rdlength=0xFFFF), FORMERR
    ),
    HostileCase(
        "EDNS option longer than its OPT",
        header(ar=1) + question() + opt(rdata=struct.pack("!HH", 10, 200) + b"\x01" * 8),
        FORMERR,
    ),
    HostileCase("two OPT records", header(ar=2) + question() + opt() + opt(), FORMERR),
    HostileCase("ANY", query(qtype=255), NOERROR, readable=True),
    HostileCase("AXFR", query(qtype=252), REFUSED, readable=True),
    HostileCase("IXFR", query(qtype=251), REFUSED, readable=True),
)


# --- endless streams --------------------------------------------------------------------------


def random_name(rng: random.Random, zone: bytes = b"\x05local\x00") -> bytes:
    label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    return bytes((len(label),)) + label.encode() + zone


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, cut, duplicate or overwrite a few bytes of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(4)
        if action == 0 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif action == 1 and out:
            del out[rng.randrange(len(out)) :]
        elif action == 2:
            at = rng.randrange(len(out) + 1)
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif out:
            out[rng.randrange(len(out))] = rng.choice((0x00, 0x3F, 0x40, 0xC0, 0xFF))
    return bytes(out)


def hostile_datagrams(rng: random.Random, zone: bytes = b"\x05local\x00") -> Iterator[bytes]:
    """Endless hostile datagrams: the table's cases, random bytes, mutated queries, queries for
    random names below `zone` (each one a cache miss) and for random types."""
    while True:
        kind = rng.randrange(8)
        qid = rng.randrange(65536)
        if kind == 0:
            yield rng.choice(CASES).data
        elif kind == 1:
            yield rng.randbytes(rng.randrange(0, 1500))
        elif kind == 2:
            yield mutate(rng, query(random_name(rng, zone), qid=qid, edns=1232))
        elif kind == 3:
            yield mutate(rng, rng.choice(CASES).data)
        elif kind == 4:
            yield query(random_name(rng, zone), qid=qid)  # a miss: costs an upstream query
        elif kind == 5:
            yield query(random_name(rng, zone), rng.randrange(65536), qid=qid, edns=65535)
        elif kind == 6:
            yield header(flags=0x8000 | rng.randrange(0x8000), qid=qid) + rng.randbytes(40)
        else:
            yield struct.pack("!H", qid) + rng.randbytes(10) + question(random_name(rng, zone))


def junk_tcp_stream(rng: random.Random) -> bytes:
    """Bytes a hostile TCP client sends before it stalls or hangs up."""
    kind = rng.randrange(7)
    if kind == 0:
        return b"\x00\x00"  # a zero-length message
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 300))  # junk, length prefix included
    if kind == 2:
        return b"\xff\xff" + rng.randbytes(rng.randrange(0, 100))  # promises more than comes
    if kind == 3:
        framed = frame(query(random_name(rng)))
        return framed[: rng.randrange(1, len(framed))]  # half a message
    if kind == 4:
        return frame(rng.choice(CASES).data) * rng.randint(1, 3)
    if kind == 5:
        return b"\x00"  # half a length prefix
    return frame(mutate(rng, query(random_name(rng), edns=1232)))


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data
