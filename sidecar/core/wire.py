"""DNS wire format, read by hand: the parts the cache and the hot path need, nothing more.

Theory of operation
- A client query is read without building any objects: header, one question, and the EDNS0 OPT
  record if there is one. The result is a cache key made of the lowercased question bytes plus
  the DO and CD bits (CoreDNS's key), and the numbers a reply needs (question end, EDNS size).
- An upstream reply is walked once, bounds-checked, on the miss path: where each record's TTL
  field sits, its type, the SOA minimum, where the OPT record is. The cache keeps the reply as
  bytes cut at the TTL fields, so a hit is a `join` with the remaining TTL (see cache.py).
- Every offset is checked against the message length before it is read; a compression pointer
  must point backwards (RFC 1035 4.1.4 allows nothing else that terminates); names are at most
  255 bytes and labels 63. Anything else raises FormError (clients) or is reported as a bad reply.
- A client query is walked as far as its section counts say (so absurd counts are FORMERR, not
  silently ignored), and the EDNS options must fill the OPT record exactly. What is answered
  how: shorter than a header or QR set, silence (no reflection); another opcode, NOTIMP; a
  question count other than 1 or anything unreadable after a readable header, FORMERR.

This module has no I/O; it is shared by the UDP and TCP listeners and the upstream client.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple, cast

from sidecar.errors import FormError

HEADER_SIZE = 12
MAX_NAME = 255

# Header flag bits, byte 2 and byte 3 of the message.
QR = 0x80
OPCODE_MASK = 0x78
AA = 0x04
TC = 0x02
RD = 0x01
RA = 0x80
Z = 0x40  # must be zero in every reply
CD = 0x10
RCODE_MASK = 0x0F

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended rcode (RFC 6891 6.1.3): its upper 8 bits travel in the OPT record

# Extended DNS Errors (RFC 8914): the EDNS option and the info codes the sidecar writes.
OPTION_EDE = 15
EDE_STALE_ANSWER = 3
EDE_PROHIBITED = 18
EDE_NO_REACHABLE_AUTHORITY = 22
EDE_NETWORK_ERROR = 23

TYPE_A = 1
TYPE_AAAA = 28
ADDRESS_TYPES = (TYPE_A, TYPE_AAAA)
TYPE_SOA = 6
TYPE_SRV = 33
TYPE_HINFO = 13
TYPE_OPT = 41
TYPE_ANY = 255
ZONE_TRANSFERS = frozenset((251, 252))  # IXFR, AXFR
# RFC 8482 section 4.2: the synthesised HINFO's CPU field says "RFC8482", its OS field is empty.
ANY_HINFO_RDATA = b"\x07RFC8482\x00"
ANY_TTL = 3600

# What we advertise upstream and accept from clients at most: the 2020 DNS flag day value,
# which avoids IP fragmentation on practically every path (RFC 6891 section 6.2.5).
EDNS_PAYLOAD = 1232
PLAIN_UDP_LIMIT = 512  # RFC 1035 4.2.1, for clients without EDNS

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
COUNTS = struct.Struct("!HHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
QUESTION_POINTER = b"\xc0\x0c"  # a name written as a pointer to the question's (offset 12)


class Query(NamedTuple):
    """What the hot path needs to know about a client query."""

    key: bytes  # lowercased qname wire + qtype/qclass + one byte of DO/CD bits
    question_end: int  # offset just past qtype/qclass
    qtype: int
    edns_size: int  # 0 when the client sent no OPT record, else its payload size (>= 512)
    do: bool
    cd: bool


class ClientError(Exception):
    """A query we answer with an error code instead of a lookup (or drop when rcode is None)."""

    def __init__(
        self,
        rcode: int | None,
        question_end: int,
        reason: str,
        edns_size: int = 0,
        do: bool = False,
    ) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.question_end = question_end  # 0 when the question could not be read
        self.reason = reason
        self.edns_size = edns_size  # the client's OPT was readable: the reply carries one too
        self.do = do  # its DO bit, echoed

    def reply(self, query: bytes) -> bytes:
        """The error reply to `query` (only when `rcode` is not None)."""
        assert self.rcode is not None
        return error_reply(query, self.question_end, self.rcode, self.edns_size, do=self.do)


def walk_name(
    msg: bytes, offset: int, runs: list[tuple[int, int]] | None = None, pointers: bool = True
) -> int:
    """Walk the (possibly compressed) name at `offset` and return the offset just past it as
    written there: past its root label, or past its first compression pointer.

    The one reader of names, bounds-checked: every byte is read below `len(msg)`; a pointer
    must point strictly backwards, and the name it leads to must lie wholly before the pointer
    (RFC 1035 4.1.4 allows nothing else that terminates), so every jump shrinks the readable
    range and the walk ends; labels are at most 63 bytes, the name with its root label at most
    255; the two reserved label types (0x40, 0x80) are refused. FormError on anything else.

    `runs`, when given, receives the (start, stop) of each stretch of labels the name is made
    of, in order; the last stretch ends with the root label, so the joined stretches are the
    name uncompressed. `pointers=False` refuses compression (a question's name)."""
    limit = len(msg)  # nothing at or past this may be read; after a jump, the pointer's offset
    length = 0
    after = -1  # offset past the first pointer, once there is one
    run = offset
    while True:
        if offset >= limit:
            raise FormError("name runs past the end of what it may use")
        label = msg[offset]
        if label == 0:
            if runs is not None:
                runs.append((run, offset + 1))
            return offset + 1 if after < 0 else after
        if label < 0x40:  # top bits 00: a label of up to 63 bytes
            length += label + 1
            if length >= MAX_NAME:  # the root label still follows
                raise FormError("name longer than 255 bytes")
            offset += label + 1
            continue
        if label < 0xC0:  # top bits 01 or 10
            raise FormError("reserved label type")
        if not pointers:
            raise FormError("compressed name where none is allowed")
        if offset + 2 > limit:
            raise FormError("compression pointer runs past the end")
        target = ((label & 0x3F) << 8) | msg[offset + 1]
        if target >= offset:
            raise FormError("compression pointer does not point backwards")
        if after < 0:
            after = offset + 2
        if runs is not None:
            runs.append((run, offset))
        limit = offset
        offset = run = target


def name_points_below(msg: bytes, offset: int, limit: int) -> bool:
    """Whether the name at `offset` refers to nothing at or after `limit`: it ends in a root
    label, or its compression pointer targets an earlier offset. Such a name stays valid when
    the bytes from `limit` on are rearranged. FormError when the name cannot be read."""
    runs: list[tuple[int, int]] = []
    walk_name(msg, offset, runs)
    return len(runs) == 1 or runs[1][0] < limit


def question_end(msg: bytes) -> int:
    """Offset just past the first question's qtype/qclass; the name must not be compressed."""
    offset = walk_name(msg, HEADER_SIZE, None, False)  # positional: a keyword costs parse_query ~5%
    if offset + 4 > len(msg):
        raise FormError("question runs past the end")
    return offset + 4


def parse_query(data: bytes) -> Query:
    """Read a client query. Raises ClientError with the rcode to answer (None: drop)."""
    if len(data) < HEADER_SIZE:
        raise ClientError(None, 0, "shorter than a header")
    flags = data[2]
    if flags & QR:
        raise ClientError(None, 0, "a response, not a query")  # never answer: no reflection
    qdcount, ancount, nscount, arcount = COUNTS.unpack_from(data, 4)
    if flags & OPCODE_MASK:
        raise ClientError(NOTIMP, *_readable_parts(data, qdcount, ancount + nscount, arcount))
    if qdcount != 1:
        raise ClientError(FORMERR, 0, "question count is not 1")
    try:
        qend = question_end(data)
    except FormError as exc:
        raise ClientError(FORMERR, 0, str(exc)) from None
    edns_size = 0
    do = False
    if arcount or ancount or nscount:  # counts must match the records that are there
        try:
            edns_size, do, version = _find_client_opt(data, qend, ancount + nscount, arcount)
        except FormError as exc:
            raise ClientError(FORMERR, qend, str(exc)) from None
        if version:  # RFC 6891 6.1.3: answered BADVERS, never forwarded or cached
            raise ClientError(BADVERS, qend, "EDNS version above 0", edns_size, do)
    cd = bool(data[3] & CD)
    name_end = qend - 4
    key = data[HEADER_SIZE:name_end].lower() + data[name_end:qend] + bytes(((do << 1) | cd,))
    return _new_query((key, qend, (data[name_end] << 8) | data[name_end + 1], edns_size, do, cd))


def read_record(msg: bytes, offset: int, end: int) -> tuple[int, int, int, int, int]:
    """The record at `offset`: (type, class, ttl, rdata offset, offset past the record)."""
    offset = walk_name(msg, offset)
    if offset + 10 > end:
        raise FormError("record header runs past the end")
    rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(msg, offset)
    rdata = offset + 10
    if rdata + rdlen > end:
        raise FormError("record data runs past the end")
    return rtype, rclass, ttl, rdata, rdata + rdlen


def _readable_parts(data: bytes, qdcount: int, skip: int, arcount: int) -> tuple[int, str, int]:
    """For a query answered without a lookup (another opcode): (question end, reason, EDNS
    size), each as far as it can be read, so the reply echoes what the client sent."""
    if qdcount != 1:
        return 0, "opcode is not QUERY", 0
    try:
        qend = question_end(data)
    except FormError:
        return 0, "opcode is not QUERY", 0
    try:
        edns_size = _find_client_opt(data, qend, skip, arcount)[0]
    except FormError:
        edns_size = 0
    return qend, "opcode is not QUERY", edns_size


def _find_client_opt(data: bytes, offset: int, skip: int, arcount: int) -> tuple[int, bool, int]:
    """Skip `skip` records, then look through the additional section for one OPT record:
    (payload size, DO, EDNS version), (0, False, 0) without one."""
    end = len(data)
    found: tuple[int, bool, int] | None = None
    for index in range(skip + arcount):
        rtype, rclass, ttl, rdata, offset = read_record(data, offset, end)
        if rtype == TYPE_OPT and index >= skip:
            if found is not None:
                raise FormError("more than one OPT record")
            _check_options(data, rdata, offset)
            found = (max(rclass, PLAIN_UDP_LIMIT), bool(ttl & 0x8000), (ttl >> 16) & 0xFF)
    return found if found is not None else (0, False, 0)


def _check_options(data: bytes, offset: int, end: int) -> None:
    """EDNS options (code, length, data) must fill the OPT record's data exactly."""
    while offset < end:
        if offset + 4 > end:
            raise FormError("EDNS option header runs past the OPT record")
        offset += 4 + _U16.unpack_from(data, offset + 2)[0]
    if offset != end:
        raise FormError("EDNS option runs past the OPT record")


class Record(NamedTuple):
    start: int
    section: int  # 0 answer, 1 authority, 2 additional
    rtype: int
    ttl: int
    ttl_offset: int
    rdata_offset: int
    rdlength: int
    end: int


class Reply(NamedTuple):
    """An upstream reply, walked once."""

    rcode: int
    truncated: bool
    question_end: int
    records: tuple[Record, ...]
    opt: Record | None


# NamedTuples made on every query or reply without their Python-level __new__ (one call
# less each): tuple.__new__ with the fields as one tuple.
_new_query = cast(
    "Callable[[tuple[bytes, int, int, int, bool, bool]], Query]", partial(tuple.__new__, Query)
)
new_record = cast(
    "Callable[[tuple[int, int, int, int, int, int, int, int]], Record]",
    partial(tuple.__new__, Record),
)
_new_reply = cast(
    "Callable[[tuple[int, bool, int, tuple[Record, ...], Record | None]], Reply]",
    partial(tuple.__new__, Reply),
)


def parse_reply(msg: bytes, known_question_end: int = 0) -> Reply:
    """Walk an upstream reply; raises FormError when any part of it cannot be read.
    `known_question_end`: where its question ends, when the caller has compared that question
    with the one it sent (reply_matches): it is not walked again."""
    if len(msg) < HEADER_SIZE:
        raise FormError("shorter than a header")
    qdcount, ancount, nscount, arcount = COUNTS.unpack_from(msg, 4)
    if qdcount != 1:
        raise FormError("reply question count is not 1")
    qend = known_question_end or question_end(msg)
    end = len(msg)
    offset = qend
    records: list[Record] = []
    opt: Record | None = None
    sections = (0,) * ancount + (1,) * nscount + (2,) * arcount
    unpack_from = _RR_FIXED.unpack_from
    for section in sections:
        start = offset
        # An owner that is one pointer to the question's name (read above, wholly before it)
        # or the root is read: most records' are.
        label = msg[offset] if offset < end else -1
        if label == 0xC0 and offset + 1 < end and msg[offset + 1] == HEADER_SIZE:
            offset += 2  # QUESTION_POINTER
        elif label == 0:  # the root (an OPT record's owner)
            offset += 1
        else:
            offset = walk_name(msg, offset)
        if offset + 10 > end:
            raise FormError("record header runs past the end")
        rtype, _rclass, ttl, rdlen = unpack_from(msg, offset)
        rdata = offset + 10
        offset = rdata + rdlen
        if offset > end:
            raise FormError("record data runs past the end")
        record = new_record(
            (start, section, rtype, ttl & 0x7FFFFFFF, rdata - 6, rdata, rdlen, offset)
        )
        if rtype == TYPE_OPT:
            if section != 2 or opt is not None:
                raise FormError("misplaced or repeated OPT record")
            opt = record
        else:
            records.append(record)
    if offset != end:
        raise FormError("trailing bytes after the last record")
    return _new_reply((msg[3] & RCODE_MASK, bool(msg[2] & TC), qend, tuple(records), opt))


def soa_negative_ttl(msg: bytes, reply: Reply) -> int | None:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM) of the authority SOA; None without one."""
    for record in reply.records:
        if record.section == 1 and record.rtype == TYPE_SOA and record.rdlength >= 22:
            minimum = _U32.unpack_from(msg, record.rdata_offset + record.rdlength - 4)[0]
            return min(record.ttl, int(minimum))
    return None


def opt_record(payload: int, do: bool, extended_rcode: int = 0, options: bytes = b"") -> bytes:
    """An OPT pseudo-record: root name, type 41, payload size, the upper 8 bits of the rcode,
    version 0, DO flag, every other flag zero; `options` (already encoded) as its data."""
    ttl = ((extended_rcode >> 4) << 24) | (0x8000 if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, payload, ttl, len(options)) + options


def ede_option(info_code: int) -> bytes:
    """An Extended DNS Error option (RFC 8914 section 2) with no extra text."""
    return _U16.pack(OPTION_EDE) + _U16.pack(2) + _U16.pack(info_code)


def build_query(qid: int, question: bytes, *, cd: bool, do: bool) -> bytes:
    """An upstream query: RD set, CD as the client asked, EDNS0 advertising EDNS_PAYLOAD."""
    return query_packet(_U16.pack(qid), question, cd, do)


# An upstream query's header after its ID (by CD), and its OPT record (by DO): made once.
_QUERY_HEADERS = tuple(
    struct.pack("!HHHHH", (RD << 8) | (CD if cd else 0), 1, 0, 0, 1) for cd in (False, True)
)
_QUERY_OPTS = (opt_record(EDNS_PAYLOAD, False), opt_record(EDNS_PAYLOAD, True))


def query_packet(qid: bytes, question: bytes, cd: bool, do: bool) -> bytes:
    """`build_query` with the ID as its two bytes."""
    return b"".join((qid, _QUERY_HEADERS[cd], question, _QUERY_OPTS[do]))


def error_reply(
    query: bytes,
    question_end: int,
    rcode: int,
    edns_size: int,
    ede: int | None = None,
    *,
    do: bool = False,
) -> bytes:
    """A reply carrying only `rcode`: the client's ID, opcode and RD, its question if readable,
    an OPT record when the client's was readable (the only place for an extended rcode).
    For QUERY: RA set, CD copied (RFC 4035 3.2.2). For another opcode nothing is claimed:
    AA, RA, AD and CD clear. Z is always clear. `ede`: an Extended DNS Error info code for
    the OPT record (EDNS clients only); `do`: the client's DO bit, echoed in it."""
    byte2 = query[2] if len(query) > 2 else 0
    opcode = byte2 & OPCODE_MASK
    byte3 = (RA | (query[3] & CD if len(query) > 3 else 0)) if opcode == 0 else 0
    qid = query[:2] if len(query) >= 2 else b"\x00\x00"
    has_question = question_end > 0
    options = ede_option(ede) if ede is not None else b""
    opt = opt_record(EDNS_PAYLOAD, do, rcode, options) if edns_size else b""
    header = (
        qid
        + bytes((QR | opcode | (byte2 & RD), byte3 | (rcode & RCODE_MASK)))
        + COUNTS.pack(1 if has_question else 0, 0, 0, 1 if opt else 0)
    )
    # Not sliced without a question: compiled (mypyc 2.4.1), query[12:0] raises SystemError.
    return header + (query[HEADER_SIZE:question_end] if has_question else b"") + opt


def rcode_reply(query: bytes, q: Query, rcode: int, ede: int | None = None) -> bytes:
    """`error_reply` to a parsed query: its question, OPT and DO bit as the client sent them."""
    return error_reply(query, q.question_end, rcode, q.edns_size, ede, do=q.do)


def any_reply(query: bytes, q: Query) -> bytes:
    """RFC 8482's answer to an ANY question: one synthesised HINFO "RFC8482" record for the
    name asked (its class as asked), so an ANY query cannot be used for amplification."""
    qend = q.question_end
    flags = bytes((QR | (query[2] & RD), RA | (query[3] & CD)))
    opt = opt_record(EDNS_PAYLOAD, q.do) if q.edns_size else b""
    counts = COUNTS.pack(1, 1, 0, 1 if opt else 0)
    qclass = query[qend - 2 : qend]
    record = (
        b"\xc0\x0c"  # the question's name
        + TYPE_HINFO.to_bytes(2, "big")
        + qclass
        + _U32.pack(ANY_TTL)
        + _U16.pack(len(ANY_HINFO_RDATA))
        + ANY_HINFO_RDATA
    )
    return query[:2] + flags + counts + query[HEADER_SIZE:qend] + record + opt


def udp_limit(edns_size: int) -> int:
    """The largest reply a UDP client can take: 512 without EDNS, else what it advertised."""
    return edns_size if edns_size else PLAIN_UDP_LIMIT


def frame(msg: bytes) -> bytes:
    """RFC 1035 4.2.2 / RFC 7766: a two-byte length before each message over TCP."""
    return _U16.pack(len(msg)) + msg


def reply_matches(msg: bytes, qid: bytes, question: bytes) -> bool:
    """RFC 5452 section 9.1: a reply is ours only if ID, QR and the question all match.

    `question` is the lowercased question we sent; the reply's name is compared ignoring case.
    """
    qend = HEADER_SIZE + len(question)
    return (
        len(msg) >= qend
        and msg[:2] == qid
        and msg[2] & QR != 0
        and msg[4:6] == b"\x00\x01"
        and msg[HEADER_SIZE : qend - 4].lower() == question[:-4]
        and msg[qend - 4 : qend] == question[-4:]
    )


def address_record(rtype: int, ttl: int, packed: bytes) -> bytes:
    """An A or AAAA record of the question's name (a pointer to it at offset 12): `packed` is
    the address's 4 or 16 bytes."""
    return b"\xc0\x0c" + _RR_FIXED.pack(rtype, 1, ttl, len(packed)) + packed


def made_reply(
    msg: bytes, reply: Reply, answers: Sequence[bytes], additional: Sequence[bytes] = ()
) -> bytes:
    """A reply the sidecar makes on an upstream reply `msg`: its ID, flags (TC, AA and the rcode
    cleared: a complete, non-authoritative NOERROR) and question, then `answers` and
    `additional`, records as wire bytes whose names point into the question or are written
    out (an offset the caller computes from `reply.question_end` stays right: the header and
    question keep their length)."""
    header = msg[:2] + bytes((msg[2] & ~(TC | AA) & 0xFF, msg[3] & ~RCODE_MASK & 0xFF))
    counts = COUNTS.pack(1, len(answers), 0, len(additional))
    return b"".join((header, counts, msg[HEADER_SIZE : reply.question_end], *answers, *additional))


def cap_ttls(msg: bytes, reply: Reply, ttl: int) -> bytes:
    """`msg` with every record's TTL at most `ttl` (the OPT record's field is no TTL)."""
    out = bytearray(msg)
    for record in reply.records:
        if record.ttl > ttl:
            _U32.pack_into(out, record.ttl_offset, ttl)
    return bytes(out)
