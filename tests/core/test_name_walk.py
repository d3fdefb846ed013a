"""wire.walk_name, the one reader of (compressed) names, and what is built on it: the offset
past a name, the name uncompressed (bailiwick.read_name), whether a name points below a limit,
and the question's end."""

from __future__ import annotations

import pytest
from dnslib import CNAME, QTYPE, RR, A, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import bailiwick, wire
from sidecar.core.routing import name_to_wire
from sidecar.errors import FormError
from tests.fakes.hostile_traffic import header, name_of, question

PAD = bytes(wire.HEADER_SIZE)  # names start after a header, as in a message


def pointer(target: int) -> bytes:
    return (0xC000 | target).to_bytes(2, "big")


def uncompressed(msg: bytes, offset: int) -> bytes:
    runs: list[tuple[int, int]] = []
    wire.walk_name(msg, offset, runs)
    return b"".join(msg[start:stop] for start, stop in runs)


def test_a_plain_name_ends_after_its_root_label() -> None:
    name = name_of([b"www", b"example", b"test"])
    msg = PAD + name + b"\x00\x01"
    assert wire.walk_name(msg, 12) == 12 + len(name)
    assert uncompressed(msg, 12) == name
    assert wire.walk_name(PAD + b"\x00", 12) == 13  # the root


def test_a_compressed_name_ends_after_its_first_pointer_and_reads_whole() -> None:
    base = name_of([b"example", b"test"])
    mid = b"\x03www" + pointer(12)  # www.example.test
    top = b"\x01a" + pointer(12 + len(base))  # a.www.example.test: a chain of two pointers
    msg = PAD + base + mid + top
    top_at = 12 + len(base) + len(mid)
    assert wire.walk_name(msg, top_at) == len(msg)
    assert uncompressed(msg, top_at) == name_of([b"a", b"www", b"example", b"test"])
    assert wire.walk_name(msg + pointer(top_at), len(msg)) == len(msg) + 2


@pytest.mark.parametrize(
    ("msg", "start"),
    [
        (PAD, 12),  # nothing there
        (PAD + b"\x03ww", 12),  # label cut short
        (PAD + b"\x03www", 12),  # no root label
        (PAD + b"\xc0", 12),  # half a pointer
        (PAD + pointer(12), 12),  # onto itself
        (PAD + pointer(14) + b"\x00", 12),  # forwards
        (PAD + b"\x40" + bytes(64), 12),  # reserved label type 01
        (PAD + b"\x80" + bytes(64), 12),  # reserved label type 10
        (PAD + b"\x01a" + pointer(12), 14),  # the name pointed at runs into its pointer
        # the name pointed at is a pointer whose second byte is the first pointer's first
        (PAD + b"\x00\xc0" + pointer(13), 14),
    ],
)
def test_unreadable_names_raise_form_error(msg: bytes, start: int) -> None:
    with pytest.raises(FormError):
        wire.walk_name(msg, start)


def test_labels_of_63_bytes_and_names_of_255_bytes_at_most() -> None:
    longest = name_of([b"a" * 63] * 3 + [b"b" * 61])
    assert len(longest) == 255
    assert wire.walk_name(PAD + longest, 12) == 12 + 255
    with pytest.raises(FormError):
        wire.walk_name(PAD + name_of([b"a" * 63] * 3 + [b"b" * 62]), 12)
    # the same limit when the name is put together from a pointer
    tail = name_of([b"a" * 63] * 2 + [b"b" * 61])
    msg = PAD + tail + b"\x3f" + b"c" * 63 + pointer(12)
    assert uncompressed(msg, 12 + len(tail)) == b"\x3f" + b"c" * 63 + tail
    with pytest.raises(FormError):
        wire.walk_name(PAD + tail + b"\x01d\x3f" + b"c" * 63 + pointer(12), 12 + len(tail))


def test_a_question_name_must_not_be_compressed() -> None:
    msg = header() + question()
    assert wire.walk_name(msg, 12, None, False) == len(msg) - 4
    compressed = PAD + b"\x00" + pointer(12)
    assert wire.walk_name(compressed, 13) == 15
    with pytest.raises(FormError):
        wire.walk_name(compressed, 13, None, False)


def test_a_name_points_below_a_limit_when_its_first_pointer_does() -> None:
    base = name_of([b"example", b"test"])
    msg = PAD + base + b"\x03www" + pointer(12)
    at = 12 + len(base)
    assert wire.name_points_below(msg, 12, 12)  # no pointer at all
    assert wire.name_points_below(msg, at, 13)
    assert not wire.name_points_below(msg, at, 12)


def test_read_name_decompresses_and_lowercases_what_dnslib_wrote() -> None:
    record = DNSRecord.question("WWW.Example.TEST").reply()
    record.add_answer(RR("WWW.Example.TEST", QTYPE.CNAME, rdata=CNAME("Web.Example.TEST"), ttl=9))
    record.add_answer(RR("Web.Example.TEST", QTYPE.A, rdata=A("192.0.2.1"), ttl=9))
    msg = bytes(record.pack())
    reply = wire.parse_reply(msg)
    owners = [bailiwick.read_name(msg, r.start) for r in reply.records]
    assert owners == [name_to_wire("www.example.test"), name_to_wire("web.example.test")]
    assert bailiwick.read_name(msg, reply.records[0].rdata_offset) == owners[1]


@given(st.binary(max_size=80), st.integers(min_value=0, max_value=80))
def test_any_bytes_are_walked_or_refused_with_form_error(data: bytes, offset: int) -> None:
    msg = PAD + data
    try:
        end = wire.walk_name(msg, offset)
    except FormError:
        return
    assert offset < end <= len(msg)
    name = uncompressed(msg, offset)
    assert len(name) <= wire.MAX_NAME and name.endswith(b"\x00")
