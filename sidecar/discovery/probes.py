"""Probing discovery endpoints: TCP connect or HTTP GET, a bounded number at a time.

The schedule lives in discovery/endpoints.py (who is due, rise/fall, latency); this module only
does the I/O and reports back. A probe's round trip is measured on the clock it is given (the
sidecar's one monotonic clock, nanosecond-grained on Linux): uvloop's loop.time() has
millisecond grain, too coarse for loopback and same-AZ latencies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from time import monotonic

from sidecar import logs
from sidecar.config import HealthCheck
from sidecar.discovery.endpoints import JITTER, Endpoint, EndpointTable

TICK = 0.05  # the shortest sleep between two looks for due probes
MAX_SLEEP = 1.0  # the longest, while there are endpoints (log summaries, forgetting)


class EndpointSaidNo(OSError):
    """The endpoint answered, and the answer is no: an HTTP status other than 2xx/3xx (a 503
    while it drains). Like a refused connection, a definite failure, not a lost packet."""


def definite(error: Exception) -> bool:
    """Whether a probe failure is the endpoint's own answer (it refused the connection or said
    no), which demotes it at once, rather than silence (a timeout), which counts toward fall."""
    return isinstance(error, (ConnectionRefusedError, EndpointSaidNo))


async def probe(
    check: HealthCheck,
    address: str,
    timeout: float,
    clock: Callable[[], float] = monotonic,
    port: int | None = None,
) -> float:
    """The round trip of one probe in seconds; raises OSError (EndpointSaidNo for an HTTP
    status other than 2xx/3xx) or TimeoutError on failure. `port`: an SRV target's, in place
    of the check's."""
    port = check.port if port is None else port
    start = clock()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            if check.kind == "http":
                host = f"[{address}]" if ":" in address else address
                writer.write(
                    f"GET {check.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "User-Agent: dns-sidecar\r\nConnection: close\r\n\r\n".encode()
                )
                status_line = await reader.readline()
                parts = status_line.split()
                if (
                    len(parts) < 2
                    or not parts[0].startswith(b"HTTP/")
                    or parts[1][:1]
                    not in (
                        b"2",
                        b"3",
                    )
                ):
                    raise EndpointSaidNo(f"HTTP status {status_line[:40]!r}")
        return clock() - start
    finally:
        if writer is not None:
            writer.close()


async def run_probes(
    table: EndpointTable,
    checks: Mapping[str, HealthCheck],
    *,
    timeout: float,
    max_concurrent: int,
    clock: Callable[[], float] = monotonic,
) -> None:
    """Forever: start the probes that are due, at most `max_concurrent` at a time; forget
    endpoints no answer has mentioned for a while. Health transitions are logged. It sleeps
    until the next probe is due (a probe under way is due again no sooner than the shortest
    jittered interval), and with no endpoint, with no timer, until one is added."""
    running: set[asyncio.Task[None]] = set()
    endpoints_added = asyncio.Event()
    table.on_first.append(endpoints_added.set)
    # A probe finishing now is due again no sooner than this.
    soonest = max(TICK, min(MAX_SLEEP, table.settings.interval * (1 - JITTER)))
    slots = asyncio.Semaphore(max_concurrent)

    async def one(endpoint: Endpoint, check: HealthCheck) -> None:
        async with slots:
            said_no = False
            try:
                rtt: float | None = await probe(
                    check, endpoint.address, timeout, clock, endpoint.port
                )
                ok = True
            except (OSError, TimeoutError) as error:
                rtt, ok, said_no = None, False, definite(error)
            now = clock()
            if table.probed(endpoint, ok, rtt, now, definite=said_no):
                logs.endpoint_changed(
                    endpoint.zone,
                    endpoint.name,
                    endpoint.health_name,
                    now,
                    source="probe",
                    check=str(check),
                )

    last_forget = clock()
    try:
        while True:
            now = clock()
            logs.endpoint_summaries(now)
            for endpoint in table.due(now):
                check = checks.get(endpoint.zone)
                if check is None:
                    endpoint.probing = False
                    continue
                task = asyncio.ensure_future(one(endpoint, check))
                running.add(task)
                task.add_done_callback(running.discard)
            if now - last_forget > 10.0:
                last_forget = now
                table.forget(now)
            if not table.endpoints and not running:
                endpoints_added.clear()
                await endpoints_added.wait()
                continue
            due = table.next_due()
            wait = soonest if due is None else min(max(due - clock(), TICK), soonest)
            await asyncio.sleep(wait)
    finally:
        table.on_first.remove(endpoints_added.set)
        for task in running:
            task.cancel()
