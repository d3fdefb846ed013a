"""Passive health with an injected clock: the application's sockets summed per endpoint, and
the endpoint table demoting, measuring and stretching probes from them."""

from __future__ import annotations

import random

import pytest

from sidecar.discovery.endpoints import HEALTHY, UNHEALTHY, EndpointTable, ProbeSettings
from sidecar.discovery.passive import PassiveSettings, PassiveWatch, Traffic
from sidecar.discovery.sock_diag import TCP_ESTABLISHED, TCP_SYN_SENT, TcpSocket


def connecting(address: str, cookie: int, retransmits: int = 0) -> TcpSocket:
    return TcpSocket(address, 80, bytes([cookie]), TCP_SYN_SENT, retransmits, None, 1.0, 0, 0)


def talking(
    address: str,
    cookie: int,
    rtt: float = 0.002,
    retrans: int = 0,
    segs: int = 100,
    rtos: int = 0,
    ack_age: float = 60.0,
) -> TcpSocket:
    return TcpSocket(
        address, 80, bytes([cookie]), TCP_ESTABLISHED, rtos, rtt, 0.2, retrans, segs, ack_age
    )


def test_a_connect_stalls_after_the_timeout_from_first_sight_and_counts_once() -> None:
    watch = PassiveWatch(PassiveSettings(connect_timeout=1.0))
    assert watch.summarise([connecting("10.0.0.1", 1)], 10.0)["10.0.0.1"].stalls == 0
    assert watch.summarise([connecting("10.0.0.1", 1)], 10.75)["10.0.0.1"].stalls == 0
    stalled = watch.summarise([connecting("10.0.0.1", 1)], 11.0)["10.0.0.1"]
    assert (stalled.connections, stalled.stalls) == (1, 1)
    assert "SYN_SENT" in stalled.reason
    assert watch.summarise([connecting("10.0.0.1", 1)], 11.25)["10.0.0.1"].stalls == 0
    assert watch.summarise([], 11.5) == {}
    assert watch.first_seen == {} and watch.stalled == set()


def test_a_connect_whose_syn_was_retransmitted_is_at_least_a_second_old() -> None:
    watch = PassiveWatch(PassiveSettings(connect_timeout=1.0))
    assert watch.summarise([connecting("10.0.0.1", 1, retransmits=1)], 5.0)["10.0.0.1"].stalls == 1
    watch = PassiveWatch(PassiveSettings(connect_timeout=2.0))
    assert watch.summarise([connecting("10.0.0.1", 1, retransmits=1)], 5.0)["10.0.0.1"].stalls == 0


def test_three_timeouts_in_a_row_stall_an_established_connection_until_it_recovers() -> None:
    watch = PassiveWatch()
    assert watch.summarise([talking("10.0.0.1", 1, rtos=2)], 1.0)["10.0.0.1"].timeouts == 0
    assert watch.summarise([talking("10.0.0.1", 1, rtos=3)], 1.25)["10.0.0.1"].timeouts == 1
    assert watch.summarise([talking("10.0.0.1", 1, rtos=4)], 1.5)["10.0.0.1"].timeouts == 0
    assert watch.summarise([talking("10.0.0.1", 1, rtos=0)], 1.75)["10.0.0.1"].timeouts == 0
    seen = watch.summarise([talking("10.0.0.1", 1, rtos=3)], 2.0)["10.0.0.1"]
    assert (seen.timeouts, seen.stalls) == (1, 0)


def test_a_stalled_transfer_counts_as_one_failure_as_a_failed_probe_does() -> None:
    t = table()
    first = t.get("local", "10.0.0.1")
    assert first is not None
    assert t.passive({"10.0.0.1": Traffic(connections=1, timeouts=1)}, 1.0) == []
    assert (first.state, first.failures) == (HEALTHY, 1)
    t.probed(first, True, 0.001, 2.0)  # a good probe in between: not in a row
    t.passive({"10.0.0.1": Traffic(connections=1, timeouts=1)}, 3.0)
    assert first.state == HEALTHY
    assert [e for e, _ in t.passive({"10.0.0.1": Traffic(connections=1, timeouts=1)}, 3.25)] == [
        first
    ]
    assert first.state == UNHEALTHY and t.passive_demotions == {"local": 1}


def test_an_ack_since_the_last_complete_dump_on_an_unstalled_connection_is_news() -> None:
    watch = PassiveWatch()
    first = watch.summarise([talking("10.0.0.1", 1, ack_age=0.1)], 1.0)
    assert not first["10.0.0.1"].acked  # no complete dump before it: no window yet
    assert watch.summarise([talking("10.0.0.1", 1, ack_age=0.9)], 2.0)["10.0.0.1"].acked
    assert not watch.summarise([talking("10.0.0.1", 1, ack_age=1.1)], 3.0)["10.0.0.1"].acked
    stalled = watch.summarise([talking("10.0.0.1", 1, rtos=3, ack_age=0.5)], 4.0)["10.0.0.1"]
    assert stalled.timeouts == 1 and not stalled.acked
    both = watch.summarise(
        [talking("10.0.0.1", 1, rtos=3, ack_age=2.0), talking("10.0.0.1", 2, ack_age=0.2)], 5.0
    )["10.0.0.1"]
    assert both.acked and both.timeouts == 0  # socket 1's stall was counted at 4.0
    standing_in = watch.summarise([], 5.25, complete=False)["10.0.0.1"]
    assert not standing_in.acked  # the last complete dump's acks are not news again


def test_acked_traffic_ends_a_run_of_stalled_transfers_but_never_brings_one_back() -> None:
    t = table()
    first = t.get("local", "10.0.0.1")
    assert first is not None
    t.passive({"10.0.0.1": Traffic(connections=2, timeouts=1)}, 1.0)
    t.passive({"10.0.0.1": Traffic(connections=2, acked=True)}, 2.0)  # the endpoint answers
    assert (first.state, first.failures) == (HEALTHY, 0)
    t.passive({"10.0.0.1": Traffic(connections=2, timeouts=1, acked=True)}, 3.0)
    assert (first.state, first.failures) == (HEALTHY, 1)  # a stall in the dump still counts
    t.passive({"10.0.0.1": Traffic(connections=2, timeouts=1)}, 4.0)
    assert first.state == UNHEALTHY
    t.passive({"10.0.0.1": Traffic(connections=2, acked=True)}, 5.0)
    assert first.state == UNHEALTHY  # only probes bring it back
    t.probed(first, True, 0.001, 11.0)
    t.probed(first, True, 0.001, 21.0)
    assert first.state == HEALTHY


def test_latency_is_the_kernel_rtt_plus_the_rto_share_of_lost_segments() -> None:
    watch = PassiveWatch()
    seen = watch.summarise(
        [talking("10.0.0.1", 1, rtt=0.002), talking("10.0.0.1", 2, rtt=0.004, retrans=10, segs=50),
         talking("10.0.0.2", 3, rtt=0.001), connecting("10.0.0.2", 4)],
        1.0,
    )  # fmt: skip
    assert seen["10.0.0.1"].latency == pytest.approx((0.002 + 0.004 + 0.2 * 10 / 50) / 2)
    assert seen["10.0.0.1"].retransmits == 10
    assert seen["10.0.0.2"].latency == pytest.approx(0.001)
    assert seen["10.0.0.2"].connections == 2


def table(stretch: float = 5.0) -> EndpointTable:
    settings = ProbeSettings(interval=10.0, fall=2, rise=2, stretch=stretch)
    t = EndpointTable(settings, rng=random.Random(1))
    t.seen("local", ["10.0.0.1", "10.0.0.2"], 0.0)
    for endpoint in t.due(0.0):
        t.probed(endpoint, True, 0.001, 0.0)
    return t


def test_a_stall_demotes_at_once_counts_a_demotion_and_only_probes_bring_it_back() -> None:
    t = table()
    version = t.version
    demoted = t.passive({"10.0.0.1": Traffic(connections=1, stalls=1, reason="why")}, 1.0)
    first = t.get("local", "10.0.0.1")
    assert first is not None
    assert demoted == [(first, "why")]
    assert (first.state, first.stalls, first.connections) == (UNHEALTHY, 1, 1)
    assert t.passive_demotions == {"local": 1} and t.version > version
    assert t.passive({"10.0.0.1": Traffic(connections=1, stalls=1)}, 1.25) == []
    assert t.passive_demotions == {"local": 1}
    t.passive({"10.0.0.1": Traffic(connections=1, latency=0.001)}, 1.5)  # no stall: still down
    assert first.state == UNHEALTHY
    t.probed(first, True, 0.001, 11.0)
    t.probed(first, True, 0.001, 21.0)
    assert first.state == HEALTHY


def test_kernel_latency_is_weighted_over_the_probes_while_there_is_traffic() -> None:
    t = table()
    second = t.get("local", "10.0.0.2")
    assert second is not None and second.latency == pytest.approx(0.001)
    t.passive({"10.0.0.2": Traffic(connections=3, latency=0.041)}, 1.0)
    assert second.kernel_latency == pytest.approx(0.041)
    assert second.latency == pytest.approx(0.8 * 0.041 + 0.2 * 0.001)
    t.passive({}, 60.0)  # traffic older than interval * stretch: the probe's alone again
    assert second.latency == pytest.approx(0.001)
    assert second.connections == 0


@pytest.mark.parametrize(("stretch", "low", "high"), [(5.0, 40.0, 60.0), (1.0, 8.0, 12.0)])
def test_recent_healthy_traffic_stretches_the_probe_interval(
    stretch: float, low: float, high: float
) -> None:
    t = table(stretch)
    first = t.get("local", "10.0.0.1")
    assert first is not None
    t.passive({"10.0.0.1": Traffic(connections=1, latency=0.001)}, 5.0)
    t.probed(first, True, 0.001, 6.0)
    assert low <= first.next_probe - 6.0 <= high


def test_without_traffic_the_probe_schedule_is_not_stretched() -> None:
    t = table(5.0)
    first = t.get("local", "10.0.0.1")
    assert first is not None
    t.probed(first, True, 0.001, 6.0)
    assert 8.0 <= first.next_probe - 6.0 <= 12.0


def test_the_first_endpoint_wakes_the_reader() -> None:
    t = EndpointTable()
    woken: list[int] = []
    t.on_first.append(lambda: woken.append(1))
    t.seen("local", ["10.0.0.1", "10.0.0.2"], 0.0)
    t.seen("local", ["10.0.0.3"], 0.0)
    assert woken == [1]


def test_the_debug_view_shows_the_passive_state() -> None:
    t = table()
    t.passive({"10.0.0.1": Traffic(connections=2, retransmits=4, latency=0.003)}, 1.0)
    [row] = [r for r in t.describe(2.0) if r["address"] == "10.0.0.1"]
    assert row["passive"] == {
        "connections": 2, "stalls": 0, "retransmits": 4, "kernel_rtt_ms": 3.0,
        "traffic_ago_s": 1.0,
    }  # fmt: skip
    assert row["probe_latency_ms"] == 1.0


def test_between_complete_dumps_the_last_established_sockets_stand_in() -> None:
    watch = PassiveWatch()
    complete = watch.summarise([talking("10.0.0.1", 1, rtt=0.004), connecting("10.0.0.2", 2)], 1.0)
    assert (complete["10.0.0.1"].connections, complete["10.0.0.1"].latency) == (1, 0.004)
    partial = watch.summarise([connecting("10.0.0.2", 2)], 1.25, complete=False)
    assert partial["10.0.0.1"].latency == 0.004  # stood in
    assert partial["10.0.0.2"].connections == 1
    assert watch.summarise([connecting("10.0.0.2", 2)], 2.0, complete=False)["10.0.0.2"].stalls == 1
    assert "10.0.0.1" not in watch.summarise([], 2.25)  # a complete dump without it: gone
    assert watch.summarise([], 2.5, complete=False) == {}
