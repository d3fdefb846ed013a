"""The hand-written wire reader against hostile and ordinary input (no sockets)."""

from __future__ import annotations

import struct

import pytest
from dnslib import AAAA, EDNS0, QTYPE, RR, SOA, A, DNSRecord

from sidecar.core import wire
from sidecar.errors import FormError


def query_bytes(name: str = "resource-server.local", qtype: str = "A", **kw: object) -> bytes:
    record = DNSRecord.question(name, qtype)
    if kw.get("edns"):
        record.add_ar(EDNS0(udp_len=int(kw.get("size", 4096)), flags="do" if kw.get("do") else ""))
    if kw.get("cd"):
        record.header.cd = 1
    return bytes(record.pack())


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


class TestParseQuery:
    def test_plain_query(self) -> None:
        data = query_bytes()
        q = wire.parse_query(data)
        assert q.question_end == len(data)
        assert q.edns_size == 0
        assert (q.do, q.cd) == (False, False)
        assert q.key == data[12:] + b"\x00"

    def test_key_ignores_case_of_the_name(self) -> None:
        lower = wire.parse_query(query_bytes("resource-server.local"))
        upper = wire.parse_query(query_bytes("Resource-SERVER.Local"))
        assert lower.key == upper.key

    def test_key_keeps_qtype_bytes_exact(self) -> None:
        # qtype 65 is 0x0041 ('A'); lowercasing it would collide with qtype 97.
        https = wire.parse_query(query_bytes(qtype="HTTPS"))
        other = wire.parse_query(query_bytes(qtype="TYPE97"))
        assert https.key != other.key

    def test_edns_size_and_do_and_cd_are_read(self) -> None:
        q = wire.parse_query(query_bytes(edns=True, size=1400, do=True, cd=True))
        assert q.edns_size == 1400
        assert (q.do, q.cd) == (True, True)
        plain = wire.parse_query(query_bytes())
        assert q.key[:-1] == plain.key[:-1]
        assert q.key[-1] == 0b11

    def test_edns_size_below_512_counts_as_512(self) -> None:
        assert wire.parse_query(query_bytes(edns=True, size=100)).edns_size == 512

    @pytest.mark.parametrize(
        ("data", "rcode"),
        [
            (b"", None),
            (b"\x12\x34\x01", None),
            (header(flags=0x8100) + b"\x00\x00\x01\x00\x01", None),  # QR=1: never answered
            (header(flags=0x2800) + b"\x00\x00\x01\x00\x01", wire.NOTIMP),  # opcode UPDATE
            (header(qd=0), wire.FORMERR),
            (header(qd=2) + b"\x00\x00\x01\x00\x01" * 2, wire.FORMERR),
            (header() + b"\x03abc", wire.FORMERR),  # name runs off the end
            (header() + b"\x03abc\x00\x00", wire.FORMERR),  # qtype/qclass cut short
            (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", wire.FORMERR),
            (header() + b"\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),  # pointer in question
            (
                header()
                + b"\x3f"
                + b"a" * 63
                + b"\x3f"
                + b"a" * 63
                + b"\x3f"
                + b"a" * 63
                + b"\x3f"
                + b"a" * 63
                + b"\x00\x00\x01\x00\x01",
                wire.FORMERR,
            ),  # 257-byte name
        ],
    )
    def test_bad_queries(self, data: bytes, rcode: int | None) -> None:
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(data)
        assert caught.value.rcode == rcode

    def test_two_opt_records_are_formerr(self) -> None:
        opt = wire.opt_record(1232, False)
        data = header(ar=2) + b"\x00\x00\x01\x00\x01" + opt + opt
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(data)
        assert caught.value.rcode == wire.FORMERR
        assert caught.value.question_end == 17

    def test_additional_record_past_the_end_is_formerr(self) -> None:
        data = header(ar=1) + b"\x00\x00\x01\x00\x01" + b"\x00\x00\x29\x04"
        with pytest.raises(wire.ClientError):
            wire.parse_query(data)


def reply_bytes(
    *records: RR, auth: tuple[RR, ...] = (), rcode: int = 0, edns: bool = False
) -> bytes:
    reply = DNSRecord.question("resource-server.local").reply()
    for record in records:
        reply.add_answer(record)
    for record in auth:
        reply.add_auth(record)
    reply.header.rcode = rcode
    if edns:
        reply.add_ar(EDNS0(udp_len=1232))
    return bytes(reply.pack())


SOA_RR = RR(
    "local", QTYPE.SOA, rdata=SOA("ns.local", "admin.local", (1, 3600, 600, 86400, 30)), ttl=300
)


class TestParseReply:
    def test_ttl_offsets_point_at_each_ttl(self) -> None:
        msg = reply_bytes(
            RR("resource-server.local", QTYPE.A, rdata=A("10.0.0.1"), ttl=60),
            RR("resource-server.local", QTYPE.A, rdata=A("10.0.0.2"), ttl=45),
            RR("resource-server.local", QTYPE.AAAA, rdata=AAAA("fd00::1"), ttl=7),
            edns=True,
        )
        reply = wire.parse_reply(msg)
        ttls = [struct.unpack_from("!I", msg, r.ttl_offset)[0] for r in reply.records]
        assert ttls == [60, 45, 7] == [r.ttl for r in reply.records]
        assert reply.opt is not None and reply.opt.end == len(msg)
        assert (reply.rcode, reply.truncated) == (0, False)

    def test_soa_negative_ttl_is_min_of_ttl_and_minimum(self) -> None:
        msg = reply_bytes(auth=(SOA_RR,), rcode=3)
        assert wire.soa_negative_ttl(msg, wire.parse_reply(msg)) == 30
        no_soa = reply_bytes(rcode=3)
        assert wire.soa_negative_ttl(no_soa, wire.parse_reply(no_soa)) is None

    @pytest.mark.parametrize(
        "mutate",
        [
            lambda m: m[:-1],  # record data cut short
            lambda m: m + b"\x00",  # trailing garbage
            lambda m: m[:6] + b"\x00\x05" + m[8:],  # more answers than there are
            lambda m: m[:39] + b"\xc0\x30" + m[41:],  # pointer forward, into itself
        ],
    )
    def test_unreadable_replies_raise(self, mutate: object) -> None:
        msg = reply_bytes(RR("resource-server.local", QTYPE.A, rdata=A("10.0.0.1"), ttl=60))
        assert msg[39:41] == b"\xc0\x0c"  # the answer's name points at the question
        bad = mutate(msg)  # type: ignore[operator]
        with pytest.raises(FormError):
            wire.parse_reply(bad)

    def test_pointer_loop_is_rejected(self) -> None:
        # Question (root, A, IN) at 12..16, then an answer whose name points at itself (17).
        body = b"\x00\x00\x01\x00\x01" + b"\xc0\x11" + b"\x00\x01\x00\x01"
        msg = header(an=1, flags=0x8180) + body + b"\x00\x00\x00\x3c\x00\x00"
        with pytest.raises(FormError):
            wire.parse_reply(msg)


class TestMatching:
    def test_reply_must_match_id_qr_and_question(self) -> None:
        question = b"\x01a\x05local\x00\x00\x01\x00\x01"
        good = (
            b"\xab\xcd\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00"
            + b"\x01A\x05LOCAL\x00\x00\x01\x00\x01"
        )
        assert wire.reply_matches(good, b"\xab\xcd", question)
        assert not wire.reply_matches(good, b"\xab\xce", question)
        assert not wire.reply_matches(good[:2] + b"\x01" + good[3:], b"\xab\xcd", question)
        other_type = good[:-3] + b"\x1c\x00\x01"
        assert not wire.reply_matches(other_type, b"\xab\xcd", question)
        other_name = good.replace(b"\x01A", b"\x01B")
        assert not wire.reply_matches(other_name, b"\xab\xcd", question)
        assert not wire.reply_matches(good[:20], b"\xab\xcd", question)


class TestBuilding:
    def test_error_reply_keeps_id_question_and_flags(self) -> None:
        query = query_bytes("Resource-Server.local", edns=True)
        q = wire.parse_query(query)
        reply = DNSRecord.parse(wire.error_reply(query, q.question_end, wire.SERVFAIL, q.edns_size))
        original = DNSRecord.parse(query)
        assert reply.header.id == original.header.id
        assert reply.header.rcode == wire.SERVFAIL
        assert reply.header.qr == 1 and reply.header.rd == 1
        assert str(reply.q.qname) == "Resource-Server.local."
        assert len(reply.ar) == 1 and reply.ar[0].rtype == QTYPE.OPT

    def test_formerr_without_question(self) -> None:
        reply = wire.error_reply(header(qd=0), 0, wire.FORMERR, 0)
        assert len(reply) == 12
        assert reply[3] & 0x0F == wire.FORMERR
        assert reply[4:6] == b"\x00\x00"

    def test_built_query_is_readable(self) -> None:
        question = b"\x01a\x05local\x00\x00\x01\x00\x01"
        query = DNSRecord.parse(wire.build_query(0xBEEF, question, cd=True, do=True))
        assert query.header.id == 0xBEEF
        assert query.header.rd == 1 and query.header.cd == 1
        assert query.ar[0].edns_len == wire.EDNS_PAYLOAD
        assert query.ar[0].edns_do == 1

    def test_frame_prefixes_length(self) -> None:
        assert wire.frame(b"abc") == b"\x00\x03abc"
        assert wire.udp_limit(0) == 512 and wire.udp_limit(4096) == 4096


class TestHeaderAndEdnsRules:
    def test_another_opcode_is_notimp_with_its_question_and_opt(self) -> None:
        data = bytearray(query_bytes(edns=True))
        data[2] |= 4 << 3  # NOTIFY
        data[3] |= wire.CD | wire.Z
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(bytes(data))
        exc = caught.value
        assert exc.rcode == wire.NOTIMP and exc.edns_size == 4096
        reply = wire.error_reply(bytes(data), exc.question_end, exc.rcode, exc.edns_size)
        assert reply[2] == wire.QR | (4 << 3) | wire.RD  # opcode echoed, AA clear
        assert reply[3] == wire.NOTIMP  # RA, AD, CD and Z clear
        assert DNSRecord.parse(reply).q.qname == "resource-server.local."
        assert reply[-11:-8] == b"\x00\x00\x29"  # an OPT record closes the reply

    def test_edns_version_above_zero_is_badvers_in_the_opt(self) -> None:
        data = bytearray(query_bytes(edns=True))
        data[-5] = 1  # OPT TTL: extended rcode, version, flags; set version 1
        with pytest.raises(wire.ClientError) as caught:
            wire.parse_query(bytes(data))
        exc = caught.value
        assert exc.rcode == wire.BADVERS
        reply = wire.error_reply(bytes(data), exc.question_end, exc.rcode, exc.edns_size)
        assert reply[3] & wire.RCODE_MASK == 0  # BADVERS is 16: the header holds its low bits
        _, _, ttl, _ = struct.unpack("!HHIH", reply[-10:])
        assert ttl >> 24 == 1 and (ttl >> 16) & 0xFF == 0  # upper rcode bits 1, version 0

    def test_query_reply_copies_cd_and_clears_z(self) -> None:
        data = bytearray(query_bytes(cd=True))
        data[3] |= wire.Z
        q = wire.parse_query(bytes(data))
        reply = wire.error_reply(bytes(data), q.question_end, wire.SERVFAIL, q.edns_size)
        assert reply[3] == wire.RA | wire.CD | wire.SERVFAIL


def test_error_replies_echo_the_do_bit_and_carry_the_ede_in_their_opt() -> None:
    query = bytes(DNSRecord.question("a.example").pack())
    q_end = wire.question_end(query)
    for do in (False, True):
        reply = wire.error_reply(query, q_end, wire.SERVFAIL, 1232, 22, do=do)
        opt = reply[q_end:]
        assert opt[:3] == b"\x00\x00\x29" and reply[7] == 0 and reply[11] == 1
        ttl = int.from_bytes(opt[5:9], "big")
        assert ttl == (0x8000 if do else 0)  # DO echoed, version 0, every other flag zero
        assert opt[11:] == b"\x00\x0f\x00\x02\x00\x16"  # EDE 22, no text
