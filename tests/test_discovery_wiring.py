"""The discovery modules load only with a discovery zone (sidecar/discovery_wiring.py): a
sidecar without one starts sooner and holds none of them."""

from __future__ import annotations

import pytest

from tests.fresh_python import run_python

# A server started in a fresh interpreter, on loopback ports of its own (the upstream: a port
# nobody listens on; nothing is asked), then drained; prints the discovery modules it loaded.
START_AND_LIST = """
import asyncio, socket, sys
from sidecar.app import Server, build_resolver, cloudmap_sources
from sidecar.config import load
from sidecar.core.counters import Counters

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

config = load(
    ["--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{free_port()}",
     "--metrics-listen", f"127.0.0.1:{free_port()}", *EXTRA],
    {},
)

async def main():
    counters = Counters()
    cloudmap = cloudmap_sources(config)
    server = Server(config, build_resolver(config, counters, cloudmap=cloudmap), counters)
    server.cloudmap = cloudmap
    await server.start()
    loaded = sorted(
        m for m in sys.modules if m.startswith(("sidecar.discovery.", "sidecar.discovery_wiring"))
    )
    print("loaded:" + ",".join(loaded))
    print(type(server.resolver.endpoints).__name__, type(server.resolver.shaper).__name__)
    print(server.endpoint_table())
    await server.drain(0)

asyncio.run(main())
"""


def started_with(*extra: str) -> list[str]:
    return run_python(f"EXTRA = {list(extra)!r}\n" + START_AND_LIST).splitlines()


def test_a_sidecar_without_a_discovery_zone_loads_no_discovery_module() -> None:
    loaded, parts, table = started_with()
    assert loaded == "loaded:"
    assert parts == "NoneType NoneType"
    assert table == "{'discovery_zones': {}, 'endpoints': []}"


@pytest.mark.parametrize("passive", ["on", "off"])
def test_a_discovery_zone_loads_the_wiring_the_table_and_the_shaper(passive: str) -> None:
    loaded, parts, table = started_with(
        "--health-check", "local=tcp:8080", "--passive-health", passive
    )
    modules = loaded.removeprefix("loaded:").split(",")
    for name in ("discovery_wiring", "discovery.endpoints", "discovery.pools", "discovery.probes"):
        assert f"sidecar.{name}" in modules
    assert parts == "EndpointTable Shaper"
    assert table == "{'discovery_zones': {'local': 'tcp:8080'}, 'endpoints': []}"
