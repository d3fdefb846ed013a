"""Down upstreams are probed back every interval, and only while one is down: an idle sidecar
with every upstream up keeps no timer (issue #20: no wakeups when nothing is due)."""

from __future__ import annotations

import asyncio

from sidecar.addresses import HostPort
from sidecar.core.upstream_health import UpstreamSet
from sidecar.forwarder import probe_down_upstreams


class CountingForwarder:
    """Answers every probe at once and counts them (the probe itself is tested elsewhere)."""

    def __init__(self) -> None:
        self.probes: list[str] = []

    async def probe(self, server: HostPort, question: bytes) -> float:
        self.probes.append(server.host)
        return 0.001


def test_a_down_upstream_is_probed_back_and_then_nothing_runs() -> None:
    async def scenario() -> tuple[list[str], list[str], bool, bool]:
        a, b = HostPort("127.0.0.1", 53), HostPort("127.0.0.2", 53)
        ups = UpstreamSet([a, b], max_fails=1)
        forwarder = CountingForwarder()
        task = asyncio.ensure_future(probe_down_upstreams(forwarder, [ups], b"q", 0.05))
        await asyncio.sleep(0.3)
        idle = list(forwarder.probes)  # nothing down: no probe, whatever the time
        ups.failed(b)
        await asyncio.sleep(0.12)
        back_up = ups.healthy(b)
        await asyncio.sleep(0.3)
        after = list(forwarder.probes)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return idle, after, back_up, ups.on_down is None

    idle, after, back_up, released = asyncio.run(scenario())
    assert idle == []
    assert back_up and after == ["127.0.0.2"]  # one probe brought it up; none since
    assert released  # the cancelled task no longer listens


def test_the_set_tells_when_an_upstream_goes_down_once() -> None:
    ups = UpstreamSet(["a"], max_fails=2)
    told: list[bool] = []
    ups.on_down = lambda: told.append(True)
    ups.failed("a")
    assert told == []
    ups.failed("a")
    ups.failed("a")
    assert told == [True]
