"""A scripted in-memory transport for the forwarder (sidecar/forwarder.py's `Exchanges`) and a
clock the test moves: the whole query path runs in-process, with real forwarding decisions,
and no socket.

Each exchange takes the next `Step` scripted for its server (silence when none is left):
- `Step(reply=...)`: the reply arrives after `after` seconds of the fake clock;
- `Step(error=...)`: the exchange fails with that UpstreamError;
- `Step()` (no reply, no error): silence, the exchange times out after its whole timeout;
- a reply later than the timeout, on an exchange that lingers (`late`, `linger`): the exchange
  times out, then the reply goes to `late` when the clock has moved on to `after`;
- `hold=True`: the exchange waits until the test calls `release()`, so that other queries can
  arrive meanwhile (coalescing, stale answers, bounds).
Time passes only on the fake clock: a timeout costs no real waiting.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from sidecar.addresses import HostPort
from sidecar.core.forwarding import Attempt
from sidecar.core.routing import wire_to_name
from sidecar.errors import UpstreamError, UpstreamTimeout
from sidecar.forwarder import Asker


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Step:
    reply: bytes | None = None
    error: UpstreamError | None = None
    after: float = 0.001
    hold: bool = False
    late: Callable[[bytes], None] | None = None  # set by the transport: a late reply goes here


@dataclass
class Asked:
    server: HostPort
    question: bytes
    timeout: float
    tcp: bool
    at: float


@dataclass
class ScriptedExchanges:
    clock: FakeClock
    script: dict[HostPort, list[Step]] = field(default_factory=dict)
    asked: list[Asked] = field(default_factory=list)
    held: list[tuple[asyncio.Future[bytes], Step, float]] = field(default_factory=list)
    closed: bool = False

    def add(self, server: HostPort, *steps: Step) -> None:
        self.script.setdefault(server, []).extend(steps)

    def start(
        self, attempt: Attempt, question: bytes, cd: bool, do: bool, asker: Asker
    ) -> asyncio.Future[bytes]:
        """The forwarder's way in (`Exchanges.start`): the next step scripted for the
        attempt's server, its end told to `asker` (on a later turn of the loop); the future
        is the handle (cancelled, nothing is told)."""
        server, timeout, linger = attempt.server, attempt.timeout, attempt.linger
        self.asked.append(Asked(server, question, timeout, attempt.tcp, self.clock()))
        steps = self.script.get(server)
        step = steps.pop(0) if steps else Step()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if linger and step.reply is not None and timeout <= step.after < timeout + linger:
            late = functools.partial(asker.exchanged, attempt, error=None)
            step = Step(reply=step.reply, after=step.after, hold=step.hold, late=late)
        if step.hold:
            self.held.append((future, step, timeout))
        else:
            asyncio.get_running_loop().call_soon(self._finish, future, step, timeout)

        def done(future: asyncio.Future[bytes]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is None:
                asker.exchanged(attempt, future.result(), None)
            else:
                assert isinstance(error, UpstreamError)
                asker.exchanged(attempt, None, error)

        future.add_done_callback(done)
        return future

    def release(self) -> None:
        """Let every held exchange finish as scripted."""
        held, self.held = self.held, []
        for future, step, timeout in held:
            self._finish(future, step, timeout)

    def _finish(self, future: asyncio.Future[bytes], step: Step, timeout: float) -> None:
        if future.done():
            return
        if step.error is not None:
            self.clock.advance(min(step.after, timeout))
            future.set_exception(step.error)
        elif step.reply is None or step.after >= timeout:
            self.clock.advance(timeout)
            future.set_exception(UpstreamTimeout(f"no reply within {timeout:.2f}s"))
            if step.late is not None and step.reply is not None:  # it comes, late
                asyncio.get_running_loop().call_soon(self._late, step, step.after - timeout)
        else:
            self.clock.advance(step.after)
            future.set_result(step.reply)

    def _late(self, step: Step, after: float) -> None:
        self.clock.advance(after)
        assert step.late is not None and step.reply is not None
        step.late(step.reply)

    def close(self, *, now: bool = False) -> None:
        self.closed = True
        if now:
            for future, _step, _timeout in self.held:
                if not future.done():
                    future.set_exception(UpstreamError("shutting down"))
            self.held.clear()


def reply_to(
    name: str,
    *,
    addresses: tuple[str, ...] = ("192.0.2.1",),
    ttl: int = 60,
    rcode: int = RCODE.NOERROR,
    truncated: bool = False,
) -> bytes:
    """An upstream reply to an A question for `name` (ID 0: the transport matched it)."""
    record = DNSRecord(
        DNSHeader(qr=1, aa=1, ra=1, rcode=rcode, tc=int(truncated)),
        q=DNSQuestion(name, QTYPE.A),
    )
    if rcode == RCODE.NOERROR and not truncated:
        for address in addresses:
            record.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    return bytes(record.pack())


def name_of(question: bytes) -> str:
    """The name asked in a question as the forwarder sends it (wire name + type + class)."""
    return wire_to_name(question[:-4])
