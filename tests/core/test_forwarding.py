"""The forwarding decisions as plain code: events in, the next attempt out, `now` given."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from sidecar.addresses import HostPort
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt, Forwarding
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import BadUpstreamReply, UpstreamError, UpstreamTimeout, UpstreamUnreachable

A1 = HostPort("127.0.0.1", 53)
A2 = HostPort("127.0.0.2", 53)
A3 = HostPort("127.0.0.3", 53)


def reply(rcode: int = RCODE.NOERROR, tc: bool = False) -> bytes:
    record = DNSRecord(DNSHeader(qr=1, rcode=rcode, tc=int(tc)), q=DNSQuestion("a.example"))
    if rcode == RCODE.NOERROR and not tc:
        record.add_answer(RR("a.example", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    return bytes(record.pack())


def forwarding(
    *servers: HostPort, deadline: float = 104.0, attempt_timeout: float = 1.0
) -> tuple[Forwarding, Counters, list[tuple[HostPort, bool, str]]]:
    counters = Counters()
    changes: list[tuple[HostPort, bool, str]] = []
    f = Forwarding(
        UpstreamSet(servers or (A1, A2), max_fails=1),
        counters,
        attempt_timeout=attempt_timeout,
        deadline=deadline,
        on_health=lambda server, up, reason: changes.append((server, up, reason)),
    )
    return f, counters, changes


def timeout(f: Forwarding, attempt: Attempt, now: float) -> Attempt | None:
    return f.failed(attempt, UpstreamTimeout("t"), now)


def test_each_attempt_gets_the_attempt_timeout_or_what_remains_and_lingers_to_the_deadline() -> (
    None
):
    f, _, _ = forwarding(deadline=102.5)
    a1 = f.first(100.0)
    assert a1 == Attempt(A1, 1.0, number=1, linger=1.5)
    a2 = timeout(f, a1, 101.0)
    assert a2 == Attempt(A2, 1.0, number=2, linger=0.5)
    a3 = timeout(f, a2, 102.0)
    assert a3 == Attempt(A1, 0.5, number=3, linger=0.0)
    assert timeout(f, a3, 102.4995) is None  # under a millisecond left
    assert isinstance(f.error, UpstreamTimeout) and f.outcome is None
    assert f.error.timed_out_only


@pytest.mark.parametrize(
    ("rcode", "reason"),
    [
        (RCODE.SERVFAIL, "servfail"),
        (RCODE.REFUSED, "refused"),
        (RCODE.FORMERR, "formerr"),
        (RCODE.NOTIMP, "notimp"),
        (RCODE.NOTAUTH, "notauth"),
        (RCODE.NXRRSET, "rcode"),
    ],
)
def test_every_reply_code_but_noerror_and_nxdomain_is_a_failure_of_its_upstream(
    rcode: int, reason: str
) -> None:
    f, counters, changes = forwarding(A1, A2)
    a1 = f.first(100.0)
    assert a1 is not None
    a2 = f.replied(a1, reply(rcode), 100.01)
    assert a2 is not None and a2.server == A2  # on to the next upstream
    assert f.replied(a2, reply(rcode), 100.02) is None  # a round without a timeout: over
    assert f.outcome is None and f.error is not None
    assert f.error.reason == reason and not f.error.timed_out_only
    assert counters.upstream_errors == {(str(A1), reason): 1, (str(A2), reason): 1}
    assert changes == [(A1, False, reason), (A2, False, reason)]  # health: as for a timeout
    assert sum(sum(h.counts) for h in counters.upstream_durations.values()) == 2  # still timed


def test_nxdomain_and_nodata_are_answers() -> None:
    for rcode in (RCODE.NXDOMAIN, RCODE.NOERROR):
        f, counters, _ = forwarding()
        a1 = f.first(100.0)
        assert a1 is not None
        assert f.replied(a1, reply(rcode), 100.01) is None
        assert f.outcome is not None and f.outcome[1].rcode == rcode
        assert not counters.upstream_errors


def test_a_round_without_a_timeout_ends_and_the_last_failure_is_the_error() -> None:
    f, counters, changes = forwarding()
    a1 = f.first(100.0)
    assert a1 is not None
    a2 = timeout(f, a1, 101.0)
    assert a2 is not None and a2.server == A2
    a3 = f.failed(a2, UpstreamUnreachable("r"), 101.1)
    assert a3 is not None and a3.server == A1  # a timeout this round: round two
    a4 = f.replied(a3, reply(RCODE.SERVFAIL), 101.2)
    assert a4 is not None and a4.server == A2
    assert f.failed(a4, UpstreamUnreachable("r2"), 101.3) is None  # no timeout in round two
    assert str(f.error) == "r2" and f.error is not None and not f.error.timed_out_only
    assert counters.upstream_errors == {
        (str(A1), "timeout"): 1,
        (str(A2), "unreachable"): 2,
        (str(A1), "servfail"): 1,
    }
    assert changes == [(A1, False, "timeout"), (A2, False, "unreachable")]


def test_a_late_reply_to_an_earlier_attempt_settles_the_question() -> None:
    f, counters, changes = forwarding(A1, deadline=104.0)
    a1 = f.first(100.0)
    assert a1 is not None and a1.linger == pytest.approx(3.0)
    a2 = timeout(f, a1, 101.0)  # the same upstream again (round two): a1 still listens
    assert a2 is not None and a2.number == 2
    assert f.replied(a1, reply(), 101.5) is None
    assert f.outcome is not None and f.error is None
    (histogram,) = counters.upstream_durations.values()
    assert histogram.total == pytest.approx(1.5)  # from the start of the attempt it answers
    assert changes == [(A1, False, "timeout"), (A1, True, "")]
    assert timeout(f, a2, 102.0) is None and f.error is None  # settled: later events ignored


def test_a_late_failure_of_an_earlier_attempt_does_not_move_the_current_one_on() -> None:
    f, counters, _ = forwarding(A1, A2, deadline=104.0)
    a1 = f.first(100.0)
    assert a1 is not None
    a2 = timeout(f, a1, 101.0)
    assert a2 is not None
    assert f.replied(a1, reply(RCODE.SERVFAIL), 101.2) is None  # a2 goes on
    assert not f.done and f.attempts == 2
    assert f.replied(a2, reply(), 101.3) is None and f.outcome is not None
    assert counters.upstream_errors == {(str(A1), "timeout"): 1, (str(A1), "servfail"): 1}


def test_an_unreadable_reply_is_a_failure() -> None:
    f, counters, _ = forwarding(A1)
    a1 = f.first(100.0)
    assert a1 is not None
    assert f.replied(a1, reply()[:20], 100.1) is None
    assert isinstance(f.error, BadUpstreamReply) and f.error.reason == "unreadable"
    assert counters.upstream_errors == {(str(A1), "unreadable"): 1}


def test_when_time_runs_out_the_last_failure_is_the_error() -> None:
    f, _, _ = forwarding(deadline=101.5)
    a1 = f.first(100.0)
    assert a1 is not None
    a2 = f.replied(a1, reply(RCODE.SERVFAIL), 100.01)
    assert a2 == Attempt(A2, pytest.approx(1.0), number=2, linger=pytest.approx(0.49))
    a3 = timeout(f, a2, 101.01)
    assert a3 is not None and a3.timeout == pytest.approx(0.49)
    assert timeout(f, a3, 101.5) is None
    assert f.outcome is None and f.error is not None and f.error.reason == "timeout"
    assert not f.error.timed_out_only  # an upstream was reached: it said SERVFAIL


def test_truncation_retries_the_same_server_over_tcp_once_with_all_that_remains() -> None:
    f, counters, _ = forwarding()
    a1 = f.first(100.0)
    assert a1 is not None
    tcp = f.replied(a1, reply(tc=True), 100.1)
    assert tcp == Attempt(A1, pytest.approx(3.9), tcp=True, number=1)
    assert f.replied(tcp, reply(tc=True), 100.2) is None  # over TCP it is taken as it is
    assert f.outcome is not None
    assert counters.upstream_errors == {(str(A1), "truncated"): 1}
    (histogram,) = counters.upstream_durations.values()
    assert histogram.total == pytest.approx(0.2)  # from the UDP attempt's start


def test_a_reply_marks_its_upstream_up_with_its_round_trip_time() -> None:
    f, _, changes = forwarding()
    f.upstreams.failed(A1)  # down
    f.order = [A1]
    a1 = f.first(100.0)
    assert a1 is not None
    f.replied(a1, reply(), 100.25)
    assert changes == [(A1, True, "")]
    assert f.upstreams.state[A1].srtt == pytest.approx(0.25)


def test_a_probe_takes_any_readable_reply_and_judges_nothing() -> None:
    counters = Counters()
    upstreams = UpstreamSet((A1,))
    f = Forwarding(
        upstreams, counters, attempt_timeout=1.0, deadline=101.0, order=(A1,), judge=False
    )
    a1 = f.first(100.0)
    assert a1 == Attempt(A1, 1.0, number=1, linger=0.0)
    assert f.replied(a1, reply(RCODE.REFUSED), 100.1) is None and f.outcome is not None
    assert not counters.upstream_errors and not counters.upstream_durations
    assert not upstreams.state[A1].failures


def test_after_stop_no_attempt_starts_and_failures_are_not_the_upstreams() -> None:
    f, counters, changes = forwarding()
    a1 = f.first(100.0)
    assert a1 is not None
    f.stop()
    assert f.failed(a1, UpstreamError("shutting down"), 100.1) is None
    assert not counters.upstream_errors and not changes
    assert str(f.error) == "shutting down"
