"""The query path in-process: the resolver, the real forwarding decisions and their driver,
over a scripted in-memory transport (tests/fakes/scripted_exchanges.py) and one fake clock.
Failover, the round rule, the one failure rule, late replies, TCP after truncation, deadlines,
stale answers, coalescing, the bound on fetches, failure memory, loop probes and the upstream
packet budget, no socket."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.cache import CHARGE_SLOT, CacheSettings, TtlCache
from sidecar.core.counters import Counters
from sidecar.core.packet_budget import TCP_PACKETS, PacketBudget
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.discovery.registry import Instance, Listing
from sidecar.discovery.shaping import ShapeSettings
from sidecar.discovery.zone import DiscoveryZone, Registry
from sidecar.errors import BadUpstreamReply, PacketBudgetSpent, UpstreamUnreachable
from sidecar.forwarder import Forwarder
from sidecar.pipeline import EDE_OTHER, REGISTRY_BASE_BYTES, RegistryBase, Resolver
from tests.fakes.scripted_exchanges import (
    FakeClock,
    ScriptedExchanges,
    Step,
    name_of,
    reply_to,
)

ROOT_A_QUESTION = b"\x00\x00\x01\x00\x01"  # the root name, type A, class IN
# Off loopback, as the VPC resolver is, so the packet budget covers them (forwarder.on_loopback);
# the scripted transport opens no socket: nothing is ever sent to these.
FIRST = HostPort("192.0.2.53", 5301)
SECOND = HostPort("192.0.2.54", 5301)
T = TypeVar("T")


class Path:
    """A resolver over two upstreams (in this order), a scripted transport and a fake clock."""

    def __init__(
        self,
        *,
        attempt_timeout: float = 1.0,
        query_timeout: float = 4.0,
        max_inflight: int = 1000,
        stale_answer_after: float = 1.8,
        cache: CacheSettings | None = None,
        discovery_zone: str | None = None,
        registry: Registry | None = None,
        packets_per_second: int = 0,
    ) -> None:
        self.clock = FakeClock()
        self.counters = Counters()
        self.transport = ScriptedExchanges(self.clock)
        self.health: list[tuple[HostPort, bool, str]] = []
        self.forwarder = Forwarder(
            self.transport,
            self.counters,
            attempt_timeout=attempt_timeout,
            clock=self.clock,
            on_health=lambda server, up, reason: self.health.append((server, up, reason)),
            budget=PacketBudget(packets_per_second, self.clock()),
        )
        self.upstreams = UpstreamSet([FIRST, SECOND], max_fails=1)
        self.resolver = Resolver(
            TtlCache(cache or CacheSettings(prefetch_percent=0)),
            ZoneRouter(self.upstreams, {}),
            self.forwarder,
            self.counters,
            query_timeout=query_timeout,
            max_inflight=max_inflight,
            stale_answer_after=stale_answer_after,
            stale_ttl=30,
            discovery=ZoneRouter(
                None,
                {discovery_zone: DiscoveryZone(ShapeSettings(), registry=registry)}
                if discovery_zone
                else {},
            ),
            clock=self.clock,
            rng=random.Random(1),
        )

    async def ask(self, name: str, qid: int = 1) -> tuple[DNSRecord, str]:
        """What a client asking `name` (A) gets, and where it came from."""
        query = DNSRecord.question(name)
        query.header.id = qid
        data = bytes(query.pack())
        q = wire.parse_query(data)
        reply = self.resolver.answer(data, q, 512)
        if reply is not None:
            return DNSRecord.parse(reply), "cache"
        reply, source = await self.resolver.resolve(data, q, 512)
        assert reply[:2] == data[:2]
        return DNSRecord.parse(reply), source

    def asked(self) -> list[tuple[HostPort, str, bool]]:
        return [(a.server, name_of(a.question), a.tcp) for a in self.transport.asked]


async def stored(p: Path, name: str) -> None:
    """Until the fetch of `name` has stored its reply (its callbacks run on the loop)."""
    key = wire.parse_query(bytes(DNSRecord.question(name).pack())).key
    for _ in range(100):
        if p.resolver.cache.get(key, p.clock()) is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{name} was not stored")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(test())  # type: ignore[arg-type]


def test_a_silent_upstream_costs_one_attempt_timeout_then_the_next_one_answers() -> None:
    async def test() -> None:
        p = Path()
        p.transport.add(SECOND, Step(reply_to("a.example", addresses=("192.0.2.2",))))
        started = p.clock()
        answer, source = await p.ask("a.example")
        assert (source, str(answer.rr[0].rdata)) == ("upstream", "192.0.2.2")
        assert p.asked() == [(FIRST, "a.example.", False), (SECOND, "a.example.", False)]
        assert p.clock() - started == pytest.approx(1.001)  # one attempt timeout, one reply
        assert p.counters.upstream_errors == {(str(FIRST), "timeout"): 1}
        assert p.health == [(FIRST, False, "timeout")]  # max_fails=1: down at once
        p.transport.asked.clear()
        p.transport.add(SECOND, Step(reply_to("b.example")))
        await p.ask("b.example")
        assert p.asked() == [(SECOND, "b.example.", False)]  # the down one is skipped

    run(test)


def test_a_round_without_a_timeout_ends_the_question_one_with_a_timeout_goes_round_again() -> None:
    async def test() -> None:
        p = Path()
        for server in (FIRST, SECOND):
            p.transport.add(server, Step(error=UpstreamUnreachable(f"{server}: refused")))
        answer, source = await p.ask("refused.example")
        assert answer.header.rcode == RCODE.SERVFAIL and source == "upstream"
        assert len(p.transport.asked) == 2  # one round, no second one

        p = Path(attempt_timeout=1.0, query_timeout=3.5)
        answer, _ = await p.ask("silent.example")  # nothing scripted: both are silent
        assert answer.header.rcode == RCODE.SERVFAIL
        timeouts = [a.timeout for a in p.transport.asked]
        assert timeouts == pytest.approx([1.0, 1.0, 1.0, 0.5])  # the last cut to the deadline
        assert [a.server for a in p.transport.asked] == [FIRST, SECOND, FIRST, SECOND]

    run(test)


@pytest.mark.parametrize(
    "rcode",
    [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.FORMERR, RCODE.NOTIMP, RCODE.NOTAUTH],
)
def test_every_failing_reply_code_moves_on_and_is_never_passed_to_the_client(rcode: int) -> None:
    async def test() -> None:
        p = Path()
        p.transport.add(FIRST, Step(reply_to("x.example", rcode=rcode)))
        p.transport.add(SECOND, Step(reply_to("x.example", addresses=("192.0.2.9",))))
        answer, _ = await p.ask("x.example")
        assert str(answer.rr[0].rdata) == "192.0.2.9"

        p = Path()
        for server in (FIRST, SECOND):
            p.transport.add(server, Step(reply_to("y.example", rcode=rcode)))
        answer, source = await p.ask("y.example")
        assert answer.header.rcode == RCODE.SERVFAIL and source == "upstream"  # never rcode
        assert len(p.transport.asked) == 2
        answer, source = await p.ask("y.example")  # remembered (RFC 9520): not asked again
        assert answer.header.rcode == RCODE.SERVFAIL and source == "cache"
        assert len(p.transport.asked) == 2

    run(test)


@pytest.mark.parametrize(
    "failure",
    [
        Step(),  # silence
        Step(reply_to("s.example", rcode=RCODE.SERVFAIL)),
        Step(reply_to("s.example", rcode=RCODE.REFUSED)),
        Step(reply_to("s.example", rcode=RCODE.FORMERR)),
        Step(reply_to("s.example", rcode=RCODE.NOTIMP)),
        Step(reply_to("s.example", rcode=RCODE.NOTAUTH)),
        Step(reply_to("s.example")[:20]),  # unreadable
        Step(error=UpstreamUnreachable("unreachable")),
    ],
)
def test_every_kind_of_upstream_failure_gets_the_stale_answer_and_is_remembered(
    failure: Step,
) -> None:
    async def test() -> None:
        p = Path(stale_answer_after=10.0)
        p.transport.add(FIRST, Step(reply_to("s.example", addresses=("192.0.2.7",), ttl=5)))
        await p.ask("s.example")
        p.clock.advance(6)  # expired
        for server in (FIRST, SECOND):
            p.transport.add(server, failure, failure)
        asked = len(p.transport.asked)
        answer, source = await p.ask("s.example")
        assert source == "stale" and answer.header.rcode == RCODE.NOERROR
        assert str(answer.rr[0].rdata) == "192.0.2.7"
        sent = len(p.transport.asked) - asked
        for _ in range(20):  # failure memory: stale answers without asking again
            answer, source = await p.ask("s.example")
            assert source == "stale" and str(answer.rr[0].rdata) == "192.0.2.7"
        assert len(p.transport.asked) - asked == sent

    run(test)


def test_an_upstream_slower_than_the_attempt_timeout_answers_in_its_own_time() -> None:
    async def test() -> None:
        p = Path(attempt_timeout=1.0, query_timeout=4.0)
        p.upstreams = UpstreamSet([FIRST], max_fails=1)
        p.resolver.router = ZoneRouter(p.upstreams, {})
        p.transport.add(FIRST, Step(reply_to("slow.example", addresses=("192.0.2.5",)), after=1.5))
        started = p.clock()
        answer, source = await p.ask("slow.example")
        assert source == "upstream" and str(answer.rr[0].rdata) == "192.0.2.5"
        assert p.clock() - started == pytest.approx(1.5)  # the late reply, not SERVFAIL at 4 s
        assert len(p.transport.asked) == 2  # the second attempt had started at 1.0
        assert p.counters.upstream_errors == {(str(FIRST), "timeout"): 1}
        assert p.health == [(FIRST, False, "timeout"), (FIRST, True, "")]

    run(test)


def test_a_truncated_reply_is_asked_again_over_tcp_of_the_same_server_with_what_remains() -> None:
    async def test() -> None:
        p = Path(attempt_timeout=1.0, query_timeout=4.0)
        p.transport.add(
            FIRST,
            Step(reply_to("big.example", truncated=True), after=0.25),
            Step(reply_to("big.example", addresses=("192.0.2.3", "192.0.2.4"))),
        )
        answer, _ = await p.ask("big.example")
        assert len(answer.rr) == 2
        assert p.asked() == [(FIRST, "big.example.", False), (FIRST, "big.example.", True)]
        assert p.transport.asked[1].timeout == pytest.approx(3.75)
        assert p.counters.upstream_errors == {(str(FIRST), "truncated"): 1}

    run(test)


def test_an_unreadable_reply_is_a_failure_of_that_upstream() -> None:
    async def test() -> None:
        p = Path()
        garbage = reply_to("bad.example")[:20]
        p.transport.add(FIRST, Step(garbage))
        p.transport.add(SECOND, Step(reply_to("bad.example")))
        answer, _ = await p.ask("bad.example")
        assert answer.header.rcode == RCODE.NOERROR
        assert p.counters.upstream_errors == {(str(FIRST), BadUpstreamReply.reason): 1}

    run(test)


def test_an_expired_entry_is_served_stale_when_the_upstream_is_slower_than_stale_answer_after() -> (
    None
):
    async def test() -> None:
        p = Path(stale_answer_after=0.05, cache=CacheSettings(prefetch_percent=0, max_stale=600))
        p.transport.add(FIRST, Step(reply_to("s.example", ttl=10)))
        await p.ask("s.example")
        p.clock.advance(20)  # expired 10 s ago
        p.transport.add(FIRST, Step(reply_to("s.example"), hold=True))
        answer, source = await p.ask("s.example")
        assert source == "stale" and answer.rr[0].ttl == 30
        assert p.counters.served_stale == 1
        p.transport.release()  # the refresh lands in the cache for the next client
        await stored(p, "s.example")
        answer, source = await p.ask("s.example")
        assert source == "cache" and answer.rr[0].ttl == 60

    run(test)


def test_a_fresh_reply_that_cannot_be_cached_is_served_not_the_stale_entrys_shaped_pool() -> None:
    async def test() -> None:
        p = Path(cache=CacheSettings(prefetch_percent=0, max_stale=600), discovery_zone="local")
        p.transport.add(FIRST, Step(reply_to("svc.local", addresses=("10.0.0.1", "10.0.0.2"))))
        answer, _ = await p.ask("svc.local")
        assert {str(rr.rdata) for rr in answer.rr} == {"10.0.0.1", "10.0.0.2"}  # shaped
        p.clock.advance(120)  # expired: only stale now
        foreign = DNSRecord.parse(reply_to("svc.local", addresses=()))
        foreign.add_answer(RR("other.example", QTYPE.A, rdata=A("192.0.2.66"), ttl=60))
        p.transport.add(FIRST, Step(bytes(foreign.pack())))  # out of bailiwick: not cached
        answer, source = await p.ask("svc.local")
        assert source == "upstream"
        assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.66"]  # this reply, as it came

    run(test)


def test_identical_misses_share_one_fetch_and_distinct_ones_beyond_the_bound_get_servfail() -> None:
    async def test() -> None:
        p = Path(max_inflight=2)
        for name in ("c.example", "d.example"):
            p.transport.add(FIRST, Step(reply_to(name), hold=True))
        waiting = [asyncio.ensure_future(p.ask("c.example", qid)) for qid in (1, 2, 3)]
        waiting.append(asyncio.ensure_future(p.ask("d.example")))
        await asyncio.sleep(0)
        answer, source = await p.ask("e.example")  # a third distinct fetch: over the bound
        assert answer.header.rcode == RCODE.SERVFAIL and source == "local"
        assert p.counters.dropped["overload"] == 1
        p.transport.release()
        results = await asyncio.gather(*waiting)
        assert [r.header.id for r, _ in results] == [1, 2, 3, 1]
        assert all(r.header.rcode == RCODE.NOERROR for r, _ in results)
        assert p.asked() == [(FIRST, "c.example.", False), (FIRST, "d.example.", False)]
        assert p.counters.coalesced == 2

    run(test)


def test_a_failed_resolution_is_not_asked_again_for_servfail_ttl_seconds() -> None:
    async def test() -> None:
        p = Path(cache=CacheSettings(prefetch_percent=0, servfail_ttl=5))
        for server in (FIRST, SECOND):
            p.transport.add(server, Step(reply_to("f.example", rcode=RCODE.SERVFAIL)))
        await p.ask("f.example")
        assert len(p.transport.asked) == 2
        p.clock.advance(4.9)
        answer, source = await p.ask("f.example")
        assert answer.header.rcode == RCODE.SERVFAIL and source == "cache"
        assert len(p.transport.asked) == 2  # remembered: not asked again
        p.clock.advance(0.2)
        p.transport.add(FIRST, Step(reply_to("f.example")))
        answer, _ = await p.ask("f.example")
        assert answer.header.rcode == RCODE.NOERROR and len(p.transport.asked) == 3

    run(test)


def test_a_loop_probe_that_comes_back_is_refused_and_names_its_path() -> None:
    async def test() -> None:
        p = Path()
        seen: list[str] = []
        p.resolver.on_loop = seen.append
        probes = p.resolver.loop_probes()
        assert [server for server, _ in probes] == [FIRST, SECOND]
        _server, question = probes[1]
        answer, source = await p.ask(name_of(question))
        assert answer.header.rcode == RCODE.REFUSED and source == "local"
        assert seen == [f"zone . via upstream {SECOND}"]
        assert not p.transport.asked  # never forwarded

    run(test)


def test_a_probe_takes_any_readable_reply_and_judges_nothing() -> None:
    async def test() -> None:
        p = Path()
        p.transport.add(FIRST, Step(reply_to(".", rcode=RCODE.REFUSED), after=0.02))
        rtt = await p.forwarder.probe(FIRST, ROOT_A_QUESTION)
        assert rtt == pytest.approx(0.02)
        assert not p.counters.upstream_errors and not p.counters.upstream_durations
        assert not p.health

    run(test)


def test_at_shutdown_what_is_in_flight_fails_without_blaming_the_upstream() -> None:
    async def test() -> None:
        p = Path()
        p.transport.add(FIRST, Step(reply_to("late.example"), hold=True))
        waiting = asyncio.ensure_future(p.ask("late.example"))
        await asyncio.sleep(0)
        p.forwarder.close(now=True)
        answer, _ = await waiting
        assert answer.header.rcode == RCODE.SERVFAIL
        assert len(p.transport.asked) == 1  # no further attempt
        assert not p.counters.upstream_errors and not p.health

    run(test)


def test_a_spent_packet_budget_gets_servfail_at_once_blames_no_upstream_and_is_not_remembered() -> (
    None
):
    async def test() -> None:
        p = Path(packets_per_second=100)  # a bucket of 10 packets
        for number in range(11):
            p.transport.add(FIRST, Step(reply_to(f"n{number}.example")))
        for number in range(10):
            answer, _ = await p.ask(f"n{number}.example")
            assert answer.header.rcode == RCODE.NOERROR
        started = p.clock()
        query = DNSRecord.question("n10.example")
        query.add_ar(EDNS0(udp_len=1232))
        data = bytes(query.pack())
        reply, source = await p.resolver.resolve(data, wire.parse_query(data), 1232)
        assert (DNSRecord.parse(reply).header.rcode, source) == (RCODE.SERVFAIL, "upstream")
        assert wire.ede_option(EDE_OTHER) in reply
        assert p.clock() == started and len(p.transport.asked) == 10  # at once, nothing sent
        assert not p.counters.upstream_errors and not p.health
        assert p.counters.budget_denials == {"client": 1, "background": 0}
        assert p.counters.upstream_packets == {str(FIRST): 10}
        p.clock.advance(0.01)  # one packet's worth: the name is asked, not remembered as failed
        answer, source = await p.ask("n10.example")
        assert (answer.header.rcode, source) == (RCODE.NOERROR, "upstream")

    run(test)


def test_a_denied_miss_gets_the_stale_answer() -> None:
    async def test() -> None:
        p = Path(packets_per_second=100, stale_answer_after=10.0)
        p.transport.add(FIRST, Step(reply_to("s.example", addresses=("192.0.2.7",), ttl=5)))
        await p.ask("s.example")
        p.clock.advance(6)  # expired; the bucket full again
        assert p.forwarder.budget.take(10, p.clock())  # spent by others
        answer, source = await p.ask("s.example")
        assert source == "stale" and str(answer.rr[0].rdata) == "192.0.2.7"

    run(test)


def test_upstreams_on_loopback_are_not_budgeted() -> None:
    async def test() -> None:
        p = Path(packets_per_second=100)  # a bucket of 10 packets
        local = HostPort("127.0.0.1", 5301)
        p.resolver.router = ZoneRouter(UpstreamSet([local]), {})
        for number in range(20):
            p.transport.add(local, Step(reply_to(f"l{number}.example")))
        for number in range(20):
            answer, _ = await p.ask(f"l{number}.example")
            assert answer.header.rcode == RCODE.NOERROR
        assert p.counters.budget_denials == {"client": 0, "background": 0}
        assert p.counters.upstream_packets == {str(local): 20}

    run(test)


def test_background_work_is_denied_before_a_client_miss_and_tcp_costs_more_packets() -> None:
    async def test() -> None:
        p = Path(packets_per_second=100)  # 10 packets; probes stop at the last 5
        p.transport.add(
            FIRST,
            Step(reply_to("big.example", truncated=True)),
            Step(reply_to("big.example")),
            Step(reply_to(".")),
            Step(reply_to("c.example")),
        )
        await p.ask("big.example")  # 1 UDP + 1 TCP query
        assert p.counters.upstream_packets == {str(FIRST): 1 + TCP_PACKETS}
        with pytest.raises(PacketBudgetSpent):  # 4 left, under the reserve
            await p.forwarder.probe(FIRST, ROOT_A_QUESTION)
        assert p.counters.budget_denials == {"client": 0, "background": 1}
        answer, _ = await p.ask("c.example")  # a client may take the reserve
        assert answer.header.rcode == RCODE.NOERROR

    run(test)


class FixedRegistry:
    """A Cloud Map registry that lists the same instances for every service."""

    def __init__(self, *addresses: str) -> None:
        self.instances = tuple(
            Instance(f"i-{n}", ipv4=address) for n, address in enumerate(addresses)
        )

    def listing(self, service: str, now: float) -> Listing | None:
        return Listing(self.instances, now)

    def ages(self, now: float) -> list[tuple[str, float]]:
        return []


def test_an_answer_made_from_the_registry_charges_what_it_keeps_to_its_entry() -> None:
    """Everything kept by cache key is charged to it (docs/architecture.md): the upstream
    reply an answer was made from, kept to make it again, too; it goes with the entry."""

    async def test() -> None:
        p = Path(discovery_zone="local", registry=FixedRegistry("10.0.0.1", "10.0.0.2"))
        msg = reply_to("svc.local", addresses=("10.0.0.1",))
        p.transport.add(FIRST, Step(msg))
        await p.ask("svc.local")
        assert p.counters.registry_answers == {("local", "merged"): 1}  # made from the registry
        key = wire.parse_query(bytes(DNSRecord.question("svc.local").pack())).key
        cache = p.resolver.cache
        held = cache.charged(key, "registry")  # beside the shaped pool's own charge
        assert held == REGISTRY_BASE_BYTES + len(msg) + CHARGE_SLOT
        assert cache.charged(key) > held
        # Retired (here: too old even to serve stale), its charges go with it.
        entry = cache.get(key, p.clock())
        assert entry is not None
        p.clock.advance(entry.expires - p.clock() + cache.limits.max_stale)
        assert cache.get_stale(key, p.clock()) is None
        assert cache.charged(key) == 0 and not p.resolver._registry_bases

    run(test)


def test_the_registry_charge_is_within_a_quarter_of_what_cpython_allocates() -> None:
    count = 2000
    datas = [bytes(DNSRecord.question(f"svc{i}.local").pack()) for i in range(count)]
    msgs = [reply_to(f"svc{i}.local") for i in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept: dict[bytes, RegistryBase] = {}
        for i in range(count):
            q = wire.parse_query(datas[i])
            reply = bytes(bytearray(msgs[i]))  # its own copy, as each upstream reply is
            kept[q.key] = RegistryBase(q, ".", reply, "local", f"svc{i}")
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    measured = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    charged = REGISTRY_BASE_BYTES + sum(len(m) for m in msgs) / count
    assert 0.75 * measured <= charged <= 1.25 * measured, (charged, measured)
