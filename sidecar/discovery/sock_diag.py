"""The kernel's TCP socket diagnostics on the wire: the dump request and the replies, as bytes.

What `ss -ti` reads (netlink NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY; linux/inet_diag.h,
linux/sock_diag.h, linux/tcp.h). No privilege is needed to dump the sockets of one's own network
namespace. The request asks for TCP sockets in SYN_SENT or ESTABLISHED with a destination among
the given (address, port) pairs: the kernel runs that filter (an INET_DIAG_REQ_BYTECODE program
of D_COND tests, one per destination), so only the application's connections to known endpoints
cross into user space. Each reply carries `struct tcp_info` (INET_DIAG_INFO): the state, the
retransmission timeouts in a row, the smoothed RTT, the RTO and the segment counts.

Plain bytes in and out; the socket is opened in discovery/passive_reader.py. A malformed or
truncated reply message is skipped, never raised.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP = 6
TCP_ESTABLISHED, TCP_SYN_SENT = 1, 2
INET_DIAG_INFO = 2  # reply attribute: struct tcp_info; also bit (INET_DIAG_INFO - 1) of idiag_ext
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP, INET_DIAG_BC_D_COND = 1, 4

NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, protocol, ext, pad, states, then inet_diag_sockid (sport, dport, src, dst, if, cookie)
REQUEST = struct.Struct("=BBBBI48s")
# family, state, timer, retrans, sport, dport (network order), src, dst, if, cookie, expires,
# rqueue, wqueue, uid, inode
MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
ATTRIBUTE = struct.Struct("=HH")
BC_OP = struct.Struct("=BBH")  # code, yes, no: jump lengths in bytes
U32, I32 = struct.Struct("=I"), struct.Struct("=i")
HOSTCOND = struct.Struct("=BBxxi")  # family, prefix_len, port (-1: any)
# struct tcp_info offsets (linux/tcp.h): fields added since 2.6 are read only when present
TCPI_STATE, TCPI_RETRANSMITS, TCPI_RTO, TCPI_RTT, TCPI_TOTAL_RETRANS = 0, 2, 8, 68, 100
TCPI_DATA_SEGS_OUT = 156  # Linux 4.6+


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One of the application's TCP connections, as the kernel reports it."""

    address: str  # destination address, as the endpoint table spells it
    port: int
    cookie: bytes  # the kernel's socket id: stable for the socket's life
    state: int  # TCP_SYN_SENT or TCP_ESTABLISHED
    retransmits: int  # timeouts in a row without an ack (SYN retransmits in SYN_SENT)
    rtt: float | None  # smoothed RTT in seconds; None before any sample
    rto: float  # seconds
    total_retrans: int  # segments retransmitted over the socket's life
    data_segs_out: int | None  # None on kernels older than 4.6


def _bytecode(destinations: Iterable[tuple[str, int | None]]) -> bytes:
    """An OR of destination tests, laid out as `ss` does: a test that matches falls through to
    a jump to the end (accept), one that misses skips that jump to the next test; the last
    test's miss lands 4 bytes past the end, which the kernel reads as reject. The kernel's
    audit only allows jumps to places reachable by falling through, hence the jumps."""
    tests = []
    for address, port in destinations:
        ip = ipaddress.ip_address(address)
        family = AF_INET if ip.version == 4 else AF_INET6
        cond = HOSTCOND.pack(family, ip.max_prefixlen, -1 if port is None else port)
        tests.append(cond + ip.packed)
    sizes = [BC_OP.size + len(test) for test in tests]
    total = sum(sizes) + BC_OP.size * (len(tests) - 1)
    out = bytearray()
    for test, size in zip(tests, sizes, strict=True):
        out += BC_OP.pack(INET_DIAG_BC_D_COND, size, size + BC_OP.size) + test
        if len(out) < total:
            out += BC_OP.pack(INET_DIAG_BC_JMP, BC_OP.size, total - len(out))
    return bytes(out)


def dump_request(family: int, destinations: Iterable[tuple[str, int | None]], seq: int) -> bytes:
    """A dump request for TCP sockets of `family` in SYN_SENT or ESTABLISHED whose destination
    is one of `destinations` ((address, port or None for any port), all of that family)."""
    states = (1 << TCP_SYN_SENT) | (1 << TCP_ESTABLISHED)
    body = REQUEST.pack(family, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states, bytes(48))
    program = _bytecode(destinations)
    attribute = ATTRIBUTE.pack(ATTRIBUTE.size + len(program), INET_DIAG_REQ_BYTECODE) + program
    length = NLMSG_HEADER.size + len(body) + len(attribute)
    header = NLMSG_HEADER.pack(length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body + attribute


class DumpError(Exception):
    """The kernel refused the dump (an NLMSG_ERROR): errno in args[0]."""


def _tcp_socket(message: bytes) -> TcpSocket | None:
    if len(message) < MESSAGE.size:
        return None
    family, state, _timer, _retrans, _sport, dport, _src, dst, _if, cookie, *_ = (
        MESSAGE.unpack_from(message)
    )
    if family == AF_INET:
        address = str(ipaddress.IPv4Address(dst[:4]))
    elif family == AF_INET6:
        v6 = ipaddress.IPv6Address(dst)
        address = str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)
    else:
        return None
    info = b""
    offset = MESSAGE.size
    while offset + ATTRIBUTE.size <= len(message):
        length, kind = ATTRIBUTE.unpack_from(message, offset)
        if length < ATTRIBUTE.size or offset + length > len(message):
            return None
        if kind == INET_DIAG_INFO:
            info = message[offset + ATTRIBUTE.size : offset + length]
        offset += (length + 3) & ~3
    if len(info) < TCPI_TOTAL_RETRANS + 4:
        return None
    rtt_us = U32.unpack_from(info, TCPI_RTT)[0]
    segs = (
        U32.unpack_from(info, TCPI_DATA_SEGS_OUT)[0]
        if len(info) >= TCPI_DATA_SEGS_OUT + 4
        else None
    )
    return TcpSocket(
        address=address,
        port=int.from_bytes(dport, "big"),
        cookie=cookie,
        state=state,
        retransmits=info[TCPI_RETRANSMITS],
        rtt=rtt_us / 1e6 if rtt_us else None,
        rto=U32.unpack_from(info, TCPI_RTO)[0] / 1e6,
        total_retrans=U32.unpack_from(info, TCPI_TOTAL_RETRANS)[0],
        data_segs_out=segs,
    )


def parse_dump(data: bytes) -> tuple[list[TcpSocket], bool]:
    """The sockets in one read of the dump, and whether the dump is complete (NLMSG_DONE).
    Raises DumpError when the kernel answers with an error."""
    sockets: list[TcpSocket] = []
    for kind, payload in _messages(data):
        if kind == NLMSG_DONE:
            return sockets, True
        if kind == NLMSG_ERROR:
            errno = -I32.unpack_from(payload)[0] if len(payload) >= 4 else 0
            raise DumpError(errno)
        if kind == SOCK_DIAG_BY_FAMILY and (found := _tcp_socket(payload)) is not None:
            sockets.append(found)
    return sockets, False


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            return
        yield kind, data[offset + NLMSG_HEADER.size : offset + length]
        offset += (length + 3) & ~3
