"""The probe loop's timing against a real TCP listener: no timer with no endpoint, a probe as
soon as one is added, and then about one look per probe interval rather than one per tick."""

from __future__ import annotations

import asyncio
import socket
from time import monotonic

from sidecar.config import HealthCheck
from sidecar.discovery.endpoints import HEALTHY, EndpointTable, ProbeSettings
from sidecar.discovery.probes import run_probes


def test_the_loop_sleeps_without_endpoints_and_looks_once_per_interval_with_one() -> None:
    async def scenario() -> tuple[int, int, str, int]:
        table = EndpointTable(ProbeSettings(interval=1.0, timeout=0.5))
        looks = 0
        due = table.due

        def counted(now: float) -> list:  # type: ignore[type-arg]
            nonlocal looks
            looks += 1
            return due(now)

        table.due = counted  # type: ignore[method-assign]
        with socket.create_server(("127.0.0.1", 0)) as server:
            check = HealthCheck("tcp", server.getsockname()[1])
            task = asyncio.ensure_future(
                run_probes(table, {"local": check}, timeout=0.5, max_concurrent=4)
            )
            await asyncio.sleep(0.5)
            idle_looks = looks  # the first look, then asleep with no timer
            table.seen("local", ["127.0.0.1"], monotonic())
            await asyncio.sleep(0.2)
            endpoint = table.get("local", "127.0.0.1")
            assert endpoint is not None
            first_state = endpoint.state
            looks = 0
            await asyncio.sleep(2.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return idle_looks, looks, first_state, len(table.on_first)

    idle_looks, looks, first_state, listeners = asyncio.run(scenario())
    assert idle_looks == 1
    assert first_state == HEALTHY  # probed at once when the endpoint came
    assert looks <= 6, looks  # ~2-3 at a 1 s interval; every TICK would be 2 / TICK = 40
    assert listeners == 0  # the cancelled loop no longer listens
