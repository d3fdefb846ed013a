"""Talking to upstream servers: one UDP exchange, one TCP exchange, and the retry loop.

Every exchange treats the reply as hostile (RFC 5452): a fresh connected UDP socket per query
(the kernel picks a random source port and drops datagrams from any other address), a random
16-bit ID from the OS CSPRNG, and a reply is taken only when ID, QR and question match. Anything
else is counted and ignored; it never ends the wait early.

Why not asyncio-dgram: its recv() does not wake up when the kernel reports ICMP port
unreachable, so a refused attempt would cost the whole attempt timeout. A protocol that
resolves one future is also fewer objects per query.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter

from sidecar.config import HostPort
from sidecar.core import wire
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import (
    BadUpstreamReply,
    FormError,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)
from sidecar.metrics import Metrics

log = logging.getLogger("dns_sidecar")


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes, question: bytes, mismatch: Callable[[], None]) -> None:
        self.qid = qid
        self.question = question
        self.mismatch = mismatch
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.reply.done():
            return
        if wire.reply_matches(data, self.qid, self.question):
            self.reply.set_result(data)
        else:
            self.mismatch()

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            if isinstance(exc, ConnectionRefusedError):
                self.reply.set_exception(UpstreamRefused(str(exc)))
            else:
                self.reply.set_exception(UpstreamError(str(exc)))


async def udp_exchange(
    server: HostPort,
    question: bytes,
    *,
    cd: bool,
    do: bool,
    timeout: float,
    mismatch: Callable[[], None],
) -> bytes:
    qid = secrets.randbits(16)
    query = wire.build_query(qid, question, cd=cd, do=do)
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _OneReply(query[:2], question, mismatch), remote_addr=(server.host, server.port)
        )
    except OSError as exc:
        raise UpstreamError(f"{server}: {exc}") from None
    try:
        transport.sendto(query)
        return await asyncio.wait_for(protocol.reply, timeout)
    except TimeoutError:
        raise UpstreamTimeout(f"{server}: no reply within {timeout:.2f}s") from None
    finally:
        transport.close()


async def tcp_exchange(
    server: HostPort,
    question: bytes,
    *,
    cd: bool,
    do: bool,
    timeout: float,
    mismatch: Callable[[], None],
) -> bytes:
    qid = secrets.randbits(16)
    query = wire.build_query(qid, question, cd=cd, do=do)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(wire.frame(query))
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(size)
                if wire.reply_matches(reply, query[:2], question):
                    return reply
                mismatch()
    except TimeoutError:
        raise UpstreamTimeout(f"{server}: no TCP reply within {timeout:.2f}s") from None
    except ConnectionRefusedError as exc:
        raise UpstreamRefused(f"{server}: {exc}") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise UpstreamError(f"{server}: TCP: {exc!r}") from None
    finally:
        if writer is not None:
            writer.close()


@dataclass
class Forwarder:
    """Sends a question to a zone's upstreams until one answers or the deadline passes."""

    attempt_timeout: float
    metrics: Metrics

    async def exchange(
        self, server: HostPort, question: bytes, *, cd: bool, do: bool, deadline: float
    ) -> tuple[bytes, wire.Reply]:
        """One attempt at one server: UDP, then TCP with what remains if the reply was
        truncated; the reply walked. Raises UpstreamError."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        name = str(server)

        def mismatch() -> None:
            self.metrics.upstream_error(name, "mismatch")

        msg = await udp_exchange(
            server,
            question,
            cd=cd,
            do=do,
            timeout=min(self.attempt_timeout, remaining),
            mismatch=mismatch,
        )
        if msg[2] & wire.TC:
            self.metrics.upstream_error(name, "truncated")
            msg = await tcp_exchange(
                server,
                question,
                cd=cd,
                do=do,
                timeout=max(deadline - loop.time(), 0.001),
                mismatch=mismatch,
            )
        try:
            return msg, wire.parse_reply(msg)
        except FormError as exc:
            raise BadUpstreamReply(f"{server}: unreadable reply: {exc}") from None

    async def forward(
        self,
        question: bytes,
        upstreams: UpstreamSet[HostPort],
        *,
        cd: bool,
        do: bool,
        deadline: float,
    ) -> tuple[bytes, wire.Reply]:
        """The first usable reply. Each attempt gets min(attempt_timeout, what remains) and
        failures move on to the next upstream in the set's order, round and round until the
        deadline; SERVFAIL or REFUSED from one upstream moves on while one is not yet asked.
        A round in which no attempt timed out (every upstream refused or sent garbage) ends
        the query: asking again at once would only hammer a server that is restarting."""
        loop = asyncio.get_running_loop()
        order = upstreams.order()
        last_error: UpstreamError = UpstreamTimeout("no time left for any attempt")
        fallback: tuple[bytes, wire.Reply] | None = None
        attempt = 0
        timed_out_this_round = False
        while deadline - loop.time() > 0.001:
            if attempt and attempt % len(order) == 0:
                if not timed_out_this_round:
                    break
                timed_out_this_round = False
            server = order[attempt % len(order)]
            attempt += 1
            sent = perf_counter()  # loop.time() is millisecond-grained under uvloop
            try:
                msg, reply = await self.exchange(server, question, cd=cd, do=do, deadline=deadline)
            except UpstreamError as exc:
                self.metrics.upstream_error(str(server), exc.reason)
                self._failed(upstreams, server, exc.reason)
                last_error = exc
                timed_out_this_round |= isinstance(exc, UpstreamTimeout)
                continue
            rtt = perf_counter() - sent
            self.metrics.upstream_reply(str(server), reply.rcode, rtt)
            if reply.rcode == wire.REFUSED:
                self._failed(upstreams, server, "refused")  # misconfigured for us
            elif upstreams.answered(server, rtt):
                log.info("upstream up", extra={"fields": {"upstream": str(server)}})
            if reply.rcode in (wire.SERVFAIL, wire.REFUSED) and attempt < len(order):
                fallback = (msg, reply)
                continue
            return msg, reply
        if fallback is not None:
            return fallback
        raise last_error

    @staticmethod
    def _failed(upstreams: UpstreamSet[HostPort], server: HostPort, reason: str) -> None:
        if upstreams.failed(server):
            log.warning(
                "upstream down", extra={"fields": {"upstream": str(server), "reason": reason}}
            )

    async def probe(self, server: HostPort, question: bytes) -> float:
        """One probe query; its round-trip time, or UpstreamError. Any reply counts."""
        loop = asyncio.get_running_loop()
        sent = perf_counter()
        await self.exchange(
            server, question, cd=False, do=False, deadline=loop.time() + self.attempt_timeout
        )
        return perf_counter() - sent


async def probe_down_upstreams(
    forwarder: Forwarder,
    sets: Sequence[UpstreamSet[HostPort]],
    question: bytes,
    interval: float,
) -> None:
    """Forever: every `interval`, ask each down upstream `question`; an answer marks it up."""

    async def probe_one(upstreams: UpstreamSet[HostPort], server: HostPort) -> None:
        try:
            rtt = await forwarder.probe(server, question)
        except UpstreamError:
            return
        if upstreams.answered(server, rtt):
            log.info("upstream up", extra={"fields": {"upstream": str(server), "by": "probe"}})

    while True:
        await asyncio.sleep(interval)
        probes = [probe_one(ups, server) for ups in sets for server in ups.down()]
        if probes:
            await asyncio.gather(*probes)
