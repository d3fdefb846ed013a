"""The forwarding decisions as plain code: events in, the next attempt out, `now` given."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from sidecar.addresses import HostPort
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt, Forwarding
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import UpstreamError, UpstreamRefused, UpstreamTimeout

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


def test_each_attempt_gets_the_attempt_timeout_or_what_remains() -> None:
    f, _, _ = forwarding(deadline=102.5)
    assert f.first(100.0) == Attempt(A1, 1.0)
    assert f.failed(UpstreamTimeout("t"), 101.0) == Attempt(A2, 1.0)
    assert f.failed(UpstreamTimeout("t"), 102.0) == Attempt(A1, 0.5)
    assert f.failed(UpstreamTimeout("t"), 102.4995) is None  # under a millisecond left
    assert isinstance(f.error, UpstreamTimeout) and f.outcome is None


def test_a_round_without_a_timeout_ends_and_the_last_error_is_the_outcome() -> None:
    f, counters, changes = forwarding()
    assert f.first(100.0) == Attempt(A1, 1.0)
    assert f.failed(UpstreamTimeout("t"), 101.0) == Attempt(A2, 1.0)
    assert f.failed(UpstreamRefused("r"), 101.1) == Attempt(A1, 1.0)  # a timeout this round
    assert f.failed(UpstreamRefused("r1"), 101.2) == Attempt(A2, 1.0)
    assert f.failed(UpstreamRefused("r2"), 101.3) is None  # no timeout in round two
    assert str(f.error) == "r2"
    assert counters.upstream_errors == {
        (str(A1), "timeout"): 1,
        (str(A2), "refused"): 2,
        (str(A1), "refused"): 1,
    }
    assert changes == [(A1, False, "timeout"), (A2, False, "refused")]


def test_servfail_and_refused_fall_back_while_an_upstream_is_unasked() -> None:
    f, counters, changes = forwarding(A1, A2, A3)
    f.first(100.0)
    assert f.replied(reply(RCODE.SERVFAIL), 100.01) == Attempt(A2, 1.0)
    assert f.replied(reply(RCODE.REFUSED), 100.02) == Attempt(A3, 1.0)
    assert changes == [(A2, False, "refused")]  # REFUSED counts against the upstream
    assert f.failed(UpstreamTimeout("t"), 101.02) == Attempt(A1, 1.0)  # timed out: round two
    assert f.fallback is not None and f.fallback[1].rcode == RCODE.REFUSED  # the latest kept
    f2, _, _ = forwarding(A1, A2)
    f2.first(100.0)
    f2.replied(reply(RCODE.SERVFAIL), 100.01)
    assert f2.replied(reply(RCODE.SERVFAIL), 100.02) is None  # all asked: SERVFAIL it is
    assert f2.outcome is not None and f2.outcome[1].rcode == RCODE.SERVFAIL
    assert sum(sum(h.counts) for h in counters.upstream_durations.values()) == 2


def test_a_kept_fallback_is_the_outcome_when_time_runs_out() -> None:
    f, _, _ = forwarding(deadline=101.5)
    f.first(100.0)
    assert f.replied(reply(RCODE.SERVFAIL), 100.01) == Attempt(A2, pytest.approx(1.0))
    assert f.failed(UpstreamTimeout("t"), 101.01) == Attempt(A1, pytest.approx(0.49))
    assert f.failed(UpstreamTimeout("t"), 101.5) is None
    assert f.outcome is not None and f.outcome[1].rcode == RCODE.SERVFAIL and f.error is None


def test_truncation_retries_the_same_server_over_tcp_once_with_all_that_remains() -> None:
    f, counters, _ = forwarding()
    f.first(100.0)
    assert f.replied(reply(tc=True), 100.1) == Attempt(A1, pytest.approx(3.9), tcp=True)
    assert f.replied(reply(tc=True), 100.2) is None  # over TCP it is taken as it is
    assert f.outcome is not None
    assert counters.upstream_errors == {(str(A1), "truncated"): 1}
    (histogram,) = counters.upstream_durations.values()
    assert histogram.total == pytest.approx(0.2)  # from the UDP attempt's start


def test_a_reply_marks_its_upstream_up_with_its_round_trip_time() -> None:
    f, _, changes = forwarding()
    f.upstreams.failed(A1)  # down
    f.order = [A1]
    f.first(100.0)
    f.replied(reply(), 100.25)
    assert changes == [(A1, True, "")]
    assert f.upstreams.state[A1].srtt == pytest.approx(0.25)


def test_a_probe_takes_any_readable_reply_and_judges_nothing() -> None:
    counters = Counters()
    upstreams = UpstreamSet((A1,))
    f = Forwarding(
        upstreams, counters, attempt_timeout=1.0, deadline=101.0, order=(A1,), judge=False
    )
    assert f.first(100.0) == Attempt(A1, 1.0)
    assert f.replied(reply(RCODE.REFUSED), 100.1) is None and f.outcome is not None
    assert not counters.upstream_errors and not counters.upstream_durations
    assert not upstreams.state[A1].failures


def test_after_stop_no_attempt_starts_and_failures_are_not_the_upstreams() -> None:
    f, counters, changes = forwarding()
    f.first(100.0)
    f.stop()
    assert f.failed(UpstreamError("shutting down"), 100.1) is None
    assert not counters.upstream_errors and not changes
    assert str(f.error) == "shutting down"
