"""Property tests (hypothesis): the wire reader, the cache and the whole query path in-process
never raise anything but the documented errors, whatever bytes a client or an upstream sends.

- parse_query: ClientError only; parse_reply: FormError only (arbitrary bytes and mutations
  of valid messages, which reach far deeper than random bytes do);
- whatever parse_reply accepts can be stored, judged for bailiwick and rendered;
- Resolver.answer / Resolver.resolve with a fake forwarder that returns arbitrary upstream
  bytes: always a reply for the client's ID, never an exception.

The atheris harness (fuzz/fuzz_wire.py) runs the same checks coverage-guided.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.addresses import HostPort
from sidecar.core import bailiwick, wire
from sidecar.core.cache import CacheSettings, TtlCache
from sidecar.core.counters import Counters
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import FormError, UpstreamError, UpstreamTimeout
from sidecar.forwarder import Forwarder
from sidecar.pipeline import Resolver
from tests.fakes.hostile_traffic import CASES, header, name_of, opt, query, question
from tests.fakes.scripted_exchanges import FakeClock, ScriptedExchanges, Step

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

labels = st.lists(
    st.binary(min_size=1, max_size=20).filter(lambda b: b"." not in b), min_size=0, max_size=6
)


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    name = name_of(draw(labels))
    qtype = draw(st.sampled_from([1, 2, 5, 6, 12, 15, 16, 28, 33, 65, 255, 252, 251, 41, 0]))
    edns = draw(st.sampled_from([0, 0, 512, 1232, 4096, 65535]))
    data = query(name, qtype, edns=edns, qid=draw(st.integers(0, 65535)))
    if draw(st.booleans()):
        data = data[:2] + bytes((data[2], data[3] | wire.CD)) + data[4:]
    return data


@st.composite
def valid_replies(draw: st.DrawFn) -> bytes:
    """A reply with compressed names, several sections, maybe an OPT record last."""
    qname = name_of(draw(labels))
    answers = draw(st.integers(0, 4))
    authority = draw(st.integers(0, 2))
    additional = draw(st.integers(0, 2))
    with_opt = draw(st.booleans())
    body = question(qname)
    records = b""
    for index in range(answers + authority + additional):
        owner = b"\xc0\x0c" if draw(st.booleans()) else name_of(draw(labels))
        rtype = draw(st.sampled_from([1, 5, 6, 28, 39, 46, 2]))
        if rtype in (5, 39, 2):
            rdata = b"\xc0\x0c" if index % 2 else name_of(draw(labels))
        elif rtype == 6:
            rdata = b"\x00\x00" + struct.pack("!IIIII", 1, 2, 3, 4, draw(st.integers(0, 3600)))
        else:
            rdata = draw(st.binary(min_size=0, max_size=16))
        ttl = draw(st.integers(0, 2**32 - 1))
        records += owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
    rcode = draw(st.sampled_from([0, 0, 2, 3, 5]))
    flags = 0x8180 | rcode | (0x0200 if draw(st.booleans()) else 0)
    head = header(an=answers, ns=authority, ar=additional + with_opt, flags=flags)
    return head + body + records + (opt() if with_opt else b"")


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data)))
        if action == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == 1:
            del data[at:]
        elif action == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at + 2 <= len(data):
            data[at : at + 2] = draw(st.sampled_from([b"\xc0\x0c", b"\xff\xff", b"\x00\x00"]))
    return bytes(data)


def check_query(data: bytes) -> None:
    try:
        q = wire.parse_query(data)
    except wire.ClientError as exc:
        assert exc.rcode in (None, wire.FORMERR, wire.NOTIMP, wire.BADVERS)
        if exc.rcode is not None:  # answered: the reply is never bigger than the query + OPT
            reply = wire.error_reply(data, exc.question_end, exc.rcode, exc.edns_size)
            assert reply[:2] == data[:2] and len(reply) <= max(len(data), wire.HEADER_SIZE)
        else:
            assert len(data) < wire.HEADER_SIZE or data[2] & wire.QR
        return
    assert wire.HEADER_SIZE < q.question_end <= len(data)
    assert q.edns_size == 0 or 512 <= q.edns_size <= 65535
    assert q.key[:-5] == q.key[:-5].lower() == data[wire.HEADER_SIZE : q.question_end - 4].lower()
    wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size)
    wire.any_reply(data, q)


def check_reply(msg: bytes) -> None:
    try:
        reply = wire.parse_reply(msg)
    except FormError:
        return
    for record in reply.records:
        assert record.start < record.ttl_offset < record.rdata_offset <= record.end <= len(msg)
    qend = reply.question_end
    cache = TtlCache(CacheSettings())
    key = msg[wire.HEADER_SIZE : qend].lower() + b"\x00"
    for zone in (bailiwick.ROOT, msg[wire.HEADER_SIZE : qend - 4].lower()):
        bailiwick.in_bailiwick(msg, reply, key[:-5], zone)
    entry = cache.store(key, msg, reply, 100.0, False)
    client = header() + msg[wire.HEADER_SIZE : qend]
    q = wire.parse_query(client)
    for limit in (512, 65535):
        rendered = entry.render(client, q, 100.5, limit)
        assert rendered[:2] == client[:2]
        # The forwarder takes only replies with QR set (wire.reply_matches); so do clients.
        assert rendered[2] & wire.QR == msg[2] & wire.QR
    wire.soa_negative_ttl(msg, reply)


@FUZZ
@given(st.binary(max_size=600))
def test_parse_query_on_arbitrary_bytes(data: bytes) -> None:
    check_query(data)


@FUZZ
@given(mutated(valid_queries()) | mutated(st.sampled_from([case.data for case in CASES])))
def test_parse_query_on_mutated_queries(data: bytes) -> None:
    check_query(data)


@FUZZ
@given(st.binary(max_size=600))
def test_parse_reply_on_arbitrary_bytes(data: bytes) -> None:
    check_reply(data)


@FUZZ
@given(valid_replies())
def test_parse_reply_on_valid_replies(data: bytes) -> None:
    check_reply(data)


@FUZZ
@given(mutated(valid_replies()))
def test_parse_reply_on_mutated_replies(data: bytes) -> None:
    check_reply(data)


# --- the whole query path, in-process ---------------------------------------------------------


def scripted(items: list[bytes | UpstreamError]) -> list[Step]:
    """One exchange's outcome per item, as the socket transport would deliver it: a datagram
    that is not a reply is never taken (the exchange times out)."""
    steps = []
    for item in items:
        if isinstance(item, UpstreamError):
            steps.append(Step(error=item))
        elif len(item) < 3 or not item[2] & wire.QR:  # as wire.reply_matches would
            steps.append(Step())
        else:
            steps.append(Step(reply=item))
    return steps


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


UPSTREAM = HostPort("127.0.0.1", 53)


def resolver() -> tuple[Resolver, ScriptedExchanges]:
    """The real query path (forwarding decisions included) over a scripted transport."""
    clock = FakeClock()
    transport = ScriptedExchanges(clock)
    metrics = Counters()
    forwarder = Forwarder(transport, metrics, attempt_timeout=1.0, clock=clock)
    router = ZoneRouter(UpstreamSet([UPSTREAM]), {})
    cache = TtlCache(CacheSettings(max_entries=50, max_bytes=1 << 20))
    res = Resolver(
        cache, router, forwarder, metrics, query_timeout=1.0, clock=clock, rng=random.Random(1)
    )
    return res, transport


def answer_with_upstream(
    loop: asyncio.AbstractEventLoop, client: bytes, upstream: list[bytes | UpstreamError]
) -> bytes | None:
    """What the sidecar answers `client`; None for silence. Fails on any exception."""
    res, transport = resolver()
    transport.add(UPSTREAM, *scripted(upstream))
    try:
        q = wire.parse_query(client)
    except wire.ClientError as exc:
        if exc.rcode is None:
            return None
        return wire.error_reply(client, exc.question_end, exc.rcode, 0)
    limit = wire.udp_limit(q.edns_size)
    reply = res.answer(client, q, limit)
    if reply is None:
        reply, source = loop.run_until_complete(res.resolve(client, q, limit))
        assert source in ("cache", "upstream", "stale", "local")
    again = res.answer(client, q, limit)  # and from the cache, if it was cached
    if again is not None:
        assert again[:2] == client[:2]
    return reply


upstream_items = st.lists(
    valid_replies()
    | mutated(valid_replies())
    | st.binary(max_size=200)
    | st.just(UpstreamTimeout("silence")),
    max_size=3,
)


@FUZZ
@given(valid_queries() | mutated(valid_queries()) | st.binary(max_size=300), upstream_items)
def test_query_path_never_raises(
    loop: asyncio.AbstractEventLoop, client: bytes, upstream: list[bytes | UpstreamError]
) -> None:
    reply = answer_with_upstream(loop, client, upstream)
    if reply is not None:
        assert reply[:2] == client[:2] and reply[2] & wire.QR


@FUZZ
@given(valid_queries(), upstream_items)
def test_upstream_reply_for_another_question_is_served_but_never_cached(
    loop: asyncio.AbstractEventLoop, client: bytes, upstream: list[bytes | UpstreamError]
) -> None:
    """The scripted transport does not check the question (the socket one does); the cache
    must still never keep records that are not about the question asked."""
    res, transport = resolver()
    transport.add(UPSTREAM, *scripted(upstream))
    q = wire.parse_query(client)
    if q.qtype in wire.ZONE_TRANSFERS or q.qtype == wire.TYPE_ANY:
        return
    loop.run_until_complete(res.resolve(client, q, 65535))
    entry = res.cache.get(q.key, res.clock())
    if entry is not None:
        msg = scripted(upstream)[len(transport.asked) - 1].reply  # the last exchange's reply
        assert msg is not None
        assert bailiwick.in_bailiwick(msg, wire.parse_reply(msg), q.key[:-5])
