"""The health check's reading of the answer it gets: the first TXT string, whatever the owner's
form, and "" for anything it cannot read (the check still passes on NOERROR)."""

from __future__ import annotations

import socket

from dnslib import CLASS, QTYPE, RR, TXT, DNSRecord

from sidecar import healthcheck, local_answers
from sidecar.core import wire


def test_the_sidecars_own_answer_is_read() -> None:
    query = healthcheck.query(7)
    reply = local_answers.local_reply(query, wire.parse_query(query))
    assert healthcheck._txt(reply) == socket.gethostname()[:255]


def test_an_uncompressed_owner_is_read() -> None:
    record = DNSRecord.parse(healthcheck.query(7)).reply()
    record.add_answer(RR("id.server", QTYPE.TXT, CLASS.CH, rdata=TXT("node-1"), ttl=0))
    packed = bytes(record.pack())
    assert healthcheck._txt(packed) == "node-1"
    owner_at = len(healthcheck.query(7))
    spelled_out = packed[:owner_at] + healthcheck.QNAME + packed[owner_at + 2 :]
    assert healthcheck._txt(spelled_out) == "node-1"


def test_what_cannot_be_read_is_empty() -> None:
    query = healthcheck.query(7)
    assert healthcheck._txt(query) == ""  # no answer at all
    assert healthcheck._txt(query + b"\xc0") == ""  # half a pointer
    assert healthcheck._txt(query + b"\xc0\x40") == ""  # a pointer forwards
    assert healthcheck._txt(query + b"\xc0\x0c" + bytes(9)) == ""  # record header cut short
