"""Who may ask: allowed networks, the verdict cache and its bound, the per-client rate limit."""

from __future__ import annotations

import pytest

from sidecar.core import access
from sidecar.core.access import ClientFilter, RateLimiter, parse_networks

DEFAULT = ClientFilter(parse_networks(access.DEFAULT_ALLOW))


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.12",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.253",  # the Route 53 Resolver address, and the task metadata endpoint's
        "fd00::1",
        "fe80::1",
        "fe80::1%eth0",  # link-local with a scope, as recvfrom reports it
        "::ffff:10.0.0.1",  # an IPv4 client on a dual-stack socket
    ],
)
def test_default_allows_what_a_task_and_its_vpc_can_be(host: str) -> None:
    assert DEFAULT.allowed(host)


@pytest.mark.parametrize(
    "host",
    [
        "8.8.8.8",
        "172.32.0.1",
        "192.169.0.1",
        "100.128.0.1",
        "2001:db8::1",
        "::ffff:8.8.8.8",
        "0.0.0.0",
        "not an address",
        "",
    ],
)
def test_default_refuses_the_internet(host: str) -> None:
    assert not DEFAULT.allowed(host)


def test_verdicts_are_cached_and_bounded() -> None:
    narrow = ClientFilter(parse_networks(["127.0.0.1/32"]))
    assert narrow.allowed("127.0.0.1") and not narrow.allowed("127.0.0.12")
    assert narrow.verdicts == {"127.0.0.1": True, "127.0.0.12": False}
    for i in range(3 * access.MAX_VERDICTS):
        narrow.allowed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")  # spoofed sources
        assert len(narrow.verdicts) <= access.MAX_VERDICTS
    assert narrow.allowed("127.0.0.1") and not narrow.allowed("10.0.0.1")


def test_rate_limit_is_a_token_bucket_per_client() -> None:
    limiter = RateLimiter(10)
    now = 100.0
    assert all(limiter.allow("10.0.0.1", now) for _ in range(10))  # a burst of 10
    assert not limiter.allow("10.0.0.1", now)
    assert limiter.allow("10.0.0.2", now)  # another client has its own bucket
    assert limiter.allow("10.0.0.1", now + 0.11)  # one token back after 1/rate s
    assert not limiter.allow("10.0.0.1", now + 0.11)
    assert sum(limiter.allow("10.0.0.1", now + 60) for _ in range(50)) == 10  # capped at burst


def test_rate_limit_sustained_rate() -> None:
    limiter = RateLimiter(100)
    allowed = sum(limiter.allow("10.0.0.1", i * 0.001) for i in range(10_000))  # 1000 qps, 10 s
    assert 1000 <= allowed <= 1100  # the burst plus 100 per second


def test_rate_limit_table_is_bounded() -> None:
    limiter = RateLimiter(5, max_clients=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i >> 8}.{i & 255}", 0.0)
        assert len(limiter) <= 100
