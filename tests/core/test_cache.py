"""The TTL cache with an injected clock: lifetimes, clamps, countdown, EDNS, TC, eviction."""

from __future__ import annotations

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord

from sidecar.core import wire
from sidecar.core.cache import CacheSettings, TtlCache

NAME = "resource-server.local"
SOA_RR = RR(
    "local", QTYPE.SOA, rdata=SOA("ns.local", "admin.local", (1, 3600, 600, 86400, 30)), ttl=300
)


def upstream_reply(
    *ttls: int,
    rcode: int = 0,
    soa: bool = False,
    edns: bool = True,
    tc: bool = False,
    name: str = NAME,
) -> bytes:
    reply = DNSRecord.question(name).reply()
    for index, ttl in enumerate(ttls):
        reply.add_answer(RR(name, QTYPE.A, rdata=A(f"10.0.0.{index + 1}"), ttl=ttl))
    if soa:
        reply.add_auth(SOA_RR)
    if edns:
        reply.add_ar(EDNS0(udp_len=1232))
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    return bytes(reply.pack())


def client_query(name: str = NAME, *, edns: int = 0, rd: bool = True, qid: int = 77) -> bytes:
    query = DNSRecord.question(name)
    query.header.id = qid
    query.header.rd = int(rd)
    if edns:
        query.add_ar(EDNS0(udp_len=edns))
    return bytes(query.pack())


def stored(cache: TtlCache, msg: bytes, now: float = 100.0, query: bytes | None = None) -> bytes:
    q = wire.parse_query(query or client_query())
    cache.store(q.key, msg, wire.parse_reply(msg), now, q.do)
    return q.key


def serve(
    cache: TtlCache, now: float, query: bytes | None = None, limit: int = 512
) -> DNSRecord | None:
    query = query or client_query()
    q = wire.parse_query(query)
    entry = cache.get(q.key, now)
    return None if entry is None else DNSRecord.parse(entry.render(query, q, now, limit))


class TestPositive:
    def test_lives_for_the_smallest_ttl_and_counts_down(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(60, 20, 45))
        first = serve(cache, 100.0)
        assert first is not None
        assert [rr.ttl for rr in first.rr] == [20, 20, 20]
        later = serve(cache, 109.5)
        assert later is not None and [rr.ttl for rr in later.rr] == [11, 11, 11]
        almost = serve(cache, 119.99)
        assert almost is not None and almost.rr[0].ttl == 1  # never 0 while fresh
        assert serve(cache, 120.0) is None

    def test_reply_carries_client_id_rd_and_question_case(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(60))
        reply = serve(cache, 101.0, client_query("Resource-Server.LOCAL", rd=False, qid=4242))
        assert reply is not None
        assert reply.header.id == 4242
        assert reply.header.rd == 0 and reply.header.qr == 1
        assert str(reply.q.qname) == "Resource-Server.LOCAL."
        assert [str(rr.rdata) for rr in reply.rr] == ["10.0.0.1"]

    @pytest.mark.parametrize(
        ("limits", "ttl", "expected"),
        [
            (CacheSettings(min_ttl=30), 5, 30),
            (CacheSettings(max_ttl=100), 3600, 100),
            (CacheSettings(min_ttl=10, max_ttl=100), 50, 50),
        ],
    )
    def test_clamps(self, limits: CacheSettings, ttl: int, expected: int) -> None:
        cache = TtlCache(limits)
        stored(cache, upstream_reply(ttl))
        reply = serve(cache, 100.0)
        assert reply is not None and reply.rr[0].ttl == expected
        assert serve(cache, 100.0 + expected) is None

    def test_ttl_zero_is_not_cached(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(0))
        assert serve(cache, 100.0) is None

    def test_truncated_reply_is_not_cached(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(60, tc=True))
        assert serve(cache, 100.0) is None


class TestEdnsAndTruncation:
    def test_opt_only_for_clients_that_sent_one(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(60, edns=True))
        plain = serve(cache, 100.0)
        assert plain is not None and plain.ar == []
        with_edns = serve(cache, 100.0, client_query(edns=1232), limit=1232)
        assert with_edns is not None
        assert [rr.rtype for rr in with_edns.ar] == [QTYPE.OPT]

    def test_cd_copied_and_z_cleared_on_a_hit(self) -> None:
        cache = TtlCache(CacheSettings())
        reply = bytearray(upstream_reply(60))
        reply[3] |= wire.Z | wire.CD  # an upstream that sets Z and CD on its own
        plain = client_query()
        stored(cache, bytes(reply), query=plain)
        entry = cache.get(wire.parse_query(plain).key, 100.0)
        assert entry is not None
        out = entry.render(plain, wire.parse_query(plain), 100.0, 512)
        assert out[3] & (wire.Z | wire.CD) == 0
        with_cd = bytearray(plain)
        with_cd[3] |= wire.CD
        q = wire.parse_query(bytes(with_cd))
        stored(cache, bytes(reply), query=bytes(with_cd))
        entry = cache.get(q.key, 100.0)
        assert entry is not None
        out = entry.render(bytes(with_cd), q, 100.0, 512)
        assert out[3] & (wire.Z | wire.CD) == wire.CD

    def test_stale_render_says_stale_answer_to_edns_clients_only(self) -> None:
        cache = TtlCache(CacheSettings())
        query = client_query(edns=1232)
        key = stored(cache, upstream_reply(60, edns=True), query=query)
        entry = cache.get(key, 100.0)
        assert entry is not None
        q = wire.parse_query(query)
        out = entry.render_with_ttl(query, q, 30, 1232, stale=True)
        assert out.endswith(wire.ede_option(wire.EDE_STALE_ANSWER))
        assert DNSRecord.parse(out).a.rdata is not None
        plain = client_query()
        out = entry.render_with_ttl(plain, wire.parse_query(plain), 30, 512, stale=True)
        assert wire.COUNTS.unpack_from(out, 4)[3] == 0  # no OPT for a client without EDNS

    def test_too_big_for_the_client_goes_back_truncated(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(*([60] * 40)))
        small = serve(cache, 100.0, limit=512)
        assert small is not None
        assert small.header.tc == 1 and small.rr == []
        assert str(small.q.qname) == NAME + "."
        whole = serve(cache, 100.0, client_query(edns=4096), limit=4096)
        assert whole is not None and whole.header.tc == 0 and len(whole.rr) == 40


class TestNegative:
    def test_nxdomain_lives_for_soa_minimum(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN, soa=True))
        reply = serve(cache, 100.0)
        assert reply is not None
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert reply.auth[0].ttl == 30
        assert serve(cache, 129.9) is not None
        assert serve(cache, 130.0) is None

    def test_nodata_is_negative_too(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(soa=True))
        reply = serve(cache, 100.0)
        assert reply is not None and reply.rr == [] and reply.header.rcode == 0

    def test_negative_ttl_is_clamped(self) -> None:
        cache = TtlCache(CacheSettings(max_negative_ttl=10))
        stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN, soa=True))
        assert serve(cache, 109.0) is not None
        assert serve(cache, 110.0) is None

    def test_negative_without_soa_is_not_cached(self) -> None:
        cache = TtlCache(CacheSettings())
        stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN))
        assert serve(cache, 100.0) is None

    def test_a_failure_is_remembered_briefly_and_apart(self) -> None:
        cache = TtlCache(CacheSettings(servfail_ttl=5))
        key = stored(cache, upstream_reply(60))
        cache.remember_failure(key, 101.0)
        assert cache.failed_recently(key, 105.9)
        assert not cache.failed_recently(key, 106.0)
        assert serve(cache, 106.0) is not None  # the good answer was not replaced

    def test_servfail_ttl_zero_remembers_nothing(self) -> None:
        cache = TtlCache(CacheSettings(servfail_ttl=0))
        key = stored(cache, upstream_reply(60))
        cache.remember_failure(key, 100.0)
        assert not cache.failed_recently(key, 100.0)


class TestEviction:
    def test_least_recently_used_goes_first(self) -> None:
        cache = TtlCache(CacheSettings(max_entries=2))
        names = ["a.local", "b.local", "c.local"]
        for name in names[:2]:
            stored(cache, upstream_reply(60, name=name), query=client_query(name))
        assert serve(cache, 101.0, client_query(names[0])) is not None  # a is now recent
        stored(cache, upstream_reply(60, name=names[2]), query=client_query(names[2]))
        assert len(cache) == 2 and cache.counters.cache_evictions == 1
        assert serve(cache, 101.0, client_query(names[1])) is None
        assert serve(cache, 101.0, client_query(names[0])) is not None
        assert serve(cache, 101.0, client_query(names[2])) is not None


class TestStaleAndPrefetch:
    def test_expired_entries_are_served_stale_until_max_stale(self) -> None:
        cache = TtlCache(CacheSettings(max_stale=100))
        key = stored(cache, upstream_reply(60))
        assert cache.get_stale(key, 159.0) is None  # still fresh
        stale = cache.get_stale(key, 161.0)
        assert stale is not None
        q = wire.parse_query(client_query())
        reply = DNSRecord.parse(stale.render_with_ttl(client_query(), q, 30, 512))
        assert [rr.ttl for rr in reply.rr] == [30]
        assert cache.get_stale(key, 260.0) is None  # 100 s past expiry: gone
        assert len(cache) == 0

    def test_max_stale_zero_serves_nothing_stale(self) -> None:
        cache = TtlCache(CacheSettings(max_stale=0))
        key = stored(cache, upstream_reply(60))
        assert cache.get_stale(key, 161.0) is None

    def test_nxdomain_removes_what_could_be_served_stale(self) -> None:
        cache = TtlCache(CacheSettings())
        key = stored(cache, upstream_reply(60))
        stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN), now=170.0)  # no SOA: not cached
        assert cache.get_stale(key, 171.0) is None

    def test_a_fresh_nxdomain_replaces_a_positive_entry(self) -> None:
        cache = TtlCache(CacheSettings())
        key = stored(cache, upstream_reply(60))
        stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN, soa=True), now=170.0)
        entry = cache.get(key, 171.0)
        assert entry is not None and entry.rcode == RCODE.NXDOMAIN

    @pytest.mark.parametrize(("percent", "due"), [(10, 154.0), (50, 130.0), (0, float("inf"))])
    def test_prefetch_is_due_when_the_share_of_ttl_left_is_small(
        self, percent: int, due: float
    ) -> None:
        cache = TtlCache(CacheSettings(prefetch_percent=percent))
        key = stored(cache, upstream_reply(60))
        entry = cache.get(key, 100.0)
        assert entry is not None
        assert entry.prefetch_at == pytest.approx(due)


def test_negative_entries_are_counted_as_entries_come_and_go() -> None:
    cache = TtlCache(CacheSettings(max_entries=2))
    key_a = stored(
        cache, upstream_reply(rcode=RCODE.NXDOMAIN, soa=True), query=client_query("a.local")
    )
    stored(cache, upstream_reply(rcode=RCODE.NXDOMAIN, soa=True), query=client_query("b.local"))
    assert cache.negative_entries == 2
    a_positive = upstream_reply(60, name="a.local")
    stored(cache, a_positive, query=client_query("a.local"))  # replaced by a positive
    assert cache.negative_entries == 1
    c_positive = upstream_reply(60, name="c.local")
    stored(cache, c_positive, query=client_query("c.local"))  # evicts b (negative)
    assert cache.negative_entries == 0 and len(cache) == 2
    assert cache.get(key_a, 101.0) is not None
