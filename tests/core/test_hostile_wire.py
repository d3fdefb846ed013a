"""Every kind of hostile query the issue lists, at the wire level: what the reader decides
(answer with which rcode, or stay silent) and that it decides without anything but ClientError.

The same table drives the tests through the running sidecar (tests/integration/test_hostile.py).
"""

from __future__ import annotations

import struct

import pytest
from dnslib import QTYPE, DNSRecord

from sidecar.core import wire
from sidecar.errors import FormError
from tests.fakes.hostile_traffic import CASES, HostileCase, header, name_of, query, question


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_hostile_query_gets_its_rcode_or_silence(case: HostileCase) -> None:
    if case.readable:
        wire.parse_query(case.data)  # the pipeline decides (ANY, AXFR, IXFR)
        return
    with pytest.raises(wire.ClientError) as caught:
        wire.parse_query(case.data)
    assert caught.value.rcode == case.reply, caught.value.reason
    if caught.value.rcode is not None:
        reply = wire.error_reply(case.data, caught.value.question_end, caught.value.rcode, 0)
        assert reply[:2] == case.data[:2]
        assert reply[2] & wire.QR and reply[3] & wire.RCODE_MASK == case.reply
        assert len(reply) <= max(len(case.data), wire.HEADER_SIZE)  # never an amplifier


def test_formerr_and_notimp_need_a_readable_header_silence_otherwise() -> None:
    for size in range(wire.HEADER_SIZE):
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(bytes(size))
        assert caught.value.rcode is None
    with pytest.raises(wire.ClientError) as caught:
        wire.parse_query(bytes(wire.HEADER_SIZE))  # a readable header with no question
    assert caught.value.rcode == wire.FORMERR


def test_qr_set_is_silent_whatever_else_is_wrong() -> None:
    for opcode in range(16):
        data = header(flags=0x8000 | opcode << 11, qd=5) + b"\xff"
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(data)
        assert caught.value.rcode is None


def test_every_unknown_opcode_is_notimp() -> None:
    for opcode in range(1, 16):
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(header(flags=opcode << 11) + question())
        assert caught.value.rcode == wire.NOTIMP


def test_records_that_the_counts_promise_must_be_there() -> None:
    opt = wire.opt_record(1232, False)
    ok = header(ar=1) + question() + opt
    assert wire.parse_query(ok).edns_size == 1232
    for an, ns, ar in [(1, 0, 1), (0, 1, 1), (65535, 65535, 65535), (0, 0, 2), (3, 0, 0)]:
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(header(an=an, ns=ns, ar=ar) + question() + opt)
        assert caught.value.rcode == wire.FORMERR


def test_an_ixfr_query_with_its_soa_in_authority_is_readable() -> None:
    record = DNSRecord.question("example.test", "IXFR")
    record.add_auth(*DNSRecord.question("example.test", "SOA").reply().rr)  # no records: ok
    data = bytes(record.pack())
    assert wire.parse_query(data).qtype == QTYPE.IXFR


def test_edns_options_must_fill_the_opt_record() -> None:
    cookie = struct.pack("!HH", 10, 8) + b"\x01" * 8
    good = header(ar=1) + question() + opt_with(cookie)
    assert wire.parse_query(good).edns_size == 1232
    for rdata in [
        struct.pack("!HH", 10, 9) + b"\x01" * 8,  # option longer than the record
        struct.pack("!HH", 10, 8) + b"\x01" * 8 + b"\x00",  # a stray byte after it
        b"\x00\x0a\x00",  # option header cut short
    ]:
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(header(ar=1) + question() + opt_with(rdata))
        assert caught.value.rcode == wire.FORMERR
        assert caught.value.question_end == wire.HEADER_SIZE + len(question())


def opt_with(rdata: bytes, rdlength: int | None = None) -> bytes:
    size = len(rdata) if rdlength is None else rdlength
    return b"\x00" + struct.pack("!HHIH", wire.TYPE_OPT, 1232, 0, size) + rdata


def test_any_gets_the_rfc8482_answer() -> None:
    data = bytes(DNSRecord.question("Example.TEST", "ANY").pack())
    q = wire.parse_query(data)
    reply = DNSRecord.parse(wire.any_reply(data, q))
    assert reply.header.id == DNSRecord.parse(data).header.id
    assert reply.header.rcode == wire.NOERROR and reply.header.qr == 1
    assert str(reply.q.qname) == "Example.TEST."
    (record,) = reply.rr
    assert record.rtype == QTYPE.HINFO and str(record.rname) == "Example.TEST."
    assert record.rdata.data == b"\x07RFC8482\x00"  # CPU "RFC8482", OS ""
    with_edns = query(qtype=255, edns=4096)
    reply_edns = DNSRecord.parse(wire.any_reply(with_edns, wire.parse_query(with_edns)))
    assert [rr.rtype for rr in reply_edns.ar] == [QTYPE.OPT]


class TestHostileReplies:
    """parse_reply against what a hostile upstream could send: FormError, nothing else."""

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            header(flags=0x8180)[:11],
            header(flags=0x8180, qd=0),
            header(flags=0x8180, qd=2) + question() * 2,
            header(flags=0x8180, an=65535) + question(),
            header(flags=0x8180, an=1) + question() + b"\xc0\x0c",  # record header cut short
            header(flags=0x8180, an=1) + question() + b"\xc0\x20" + bytes(10),  # pointer ahead
            header(flags=0x8180, an=1) + question() + b"\xc0\x11" + bytes(10),  # onto itself
            header(flags=0x8180, an=1)
            + question()
            + b"\x00\x00\x01\x00\x01\x00\x00\x00\x3c\xff\xff",  # rdlength past the end
            header(flags=0x8180, ar=2) + question() + wire.opt_record(1232, False) * 2,
            header(flags=0x8180, an=1) + question() + wire.opt_record(1232, False),
            header(flags=0x8180) + question() + b"junk",
        ],
    )
    def test_unreadable_replies_raise_form_error(self, data: bytes) -> None:
        with pytest.raises(FormError):
            wire.parse_reply(data)

    def test_a_pointer_chain_that_loops_is_rejected(self) -> None:
        # Two answers whose names point at each other: each pointer must point backwards.
        body = question() + b"\xc0\x19" + bytes(10) + b"\xc0\x11" + bytes(10)
        with pytest.raises(FormError):
            wire.parse_reply(header(flags=0x8180, an=2) + body)


def test_a_name_of_exactly_255_bytes_is_readable_and_256_is_not() -> None:
    longest = name_of([b"a" * 63] * 3 + [b"b" * 61])
    assert len(longest) == 255
    assert wire.parse_query(header() + question(longest)).question_end == 12 + 255 + 4
    too_long = name_of([b"a" * 63] * 3 + [b"b" * 62])
    with pytest.raises(wire.ClientError):
        wire.parse_query(header() + question(too_long))
