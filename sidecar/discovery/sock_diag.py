"""The kernel's TCP socket diagnostics on the wire: the dump request and the replies, as bytes.

What `ss -ti` reads (netlink NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY; linux/inet_diag.h,
linux/sock_diag.h, linux/tcp.h). No privilege is needed to dump the sockets of one's own network
namespace. The request asks for TCP sockets in some states (SYN_SENT, ESTABLISHED) with a
destination among the given (address, port) pairs. Two kernel-side filters carry that: the
request's destination port (inet_diag_sockid.idiag_dport: a dump skips sockets of any other
port), and an INET_DIAG_REQ_BYTECODE program of D_COND tests, one per destination. The test
machine's kernel (6.18) honours the states and the port and ignores the program, so replies are
also matched on their destination in user space (parse_dump's `wanted`). Each reply carries
`struct tcp_info` (INET_DIAG_INFO): the state, the retransmission timeouts in a row, the
time since the last ack, the smoothed RTT, the RTO and the segment counts.

Plain bytes in and out; the socket is opened in discovery/passive_reader.py. A malformed or
truncated reply message is skipped, never raised.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import struct
from collections.abc import Container, Iterable, Iterator
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP = 6
TCP_ESTABLISHED, TCP_SYN_SENT = 1, 2
CONNECTING = 1 << TCP_SYN_SENT  # idiag_states bits
CONNECTED = 1 << TCP_ESTABLISHED
INET_DIAG_INFO = 2  # reply attribute: struct tcp_info; also bit (INET_DIAG_INFO - 1) of idiag_ext
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP, INET_DIAG_BC_D_COND = 1, 4

NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, protocol, ext, pad, states, then inet_diag_sockid (sport, dport, src, dst, if, cookie)
REQUEST = struct.Struct("=BBBBI48s")
# family, state, timer, retrans, sport, dport (network order), src, dst, if, cookie, expires,
# rqueue, wqueue, uid, inode
MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
MESSAGE_FIELDS = struct.Struct("=BB4x2s16x16s4x8s")  # family, state, dport, dst, cookie
ATTRIBUTE = struct.Struct("=HH")
BC_OP = struct.Struct("=BBH")  # code, yes, no: jump lengths in bytes
U32, I32 = struct.Struct("=I"), struct.Struct("=i")
HOSTCOND = struct.Struct("=BBxxi")  # family, prefix_len, port (-1: any)
# struct tcp_info offsets (linux/tcp.h): fields added since 2.6 are read only when present
# tcpi_retransmits, tcpi_rto, tcpi_last_ack_recv, tcpi_rtt, tcpi_total_retrans: the fields
# present since 2.6
TCP_INFO_HEAD = struct.Struct("=2xB5xI44xI8xI28xI")
TCPI_DATA_SEGS_OUT = 156  # Linux 4.6+


class TcpSocket(NamedTuple):
    """One of the application's TCP connections, as the kernel reports it (a tuple: a dump
    makes thousands of them, four times a second)."""

    address: str  # destination address, as the endpoint table spells it
    port: int
    cookie: bytes  # the kernel's socket id: stable for the socket's life
    state: int  # TCP_SYN_SENT or TCP_ESTABLISHED
    retransmits: int  # timeouts in a row without an ack (SYN retransmits in SYN_SENT)
    rtt: float | None  # smoothed RTT in seconds; None before any sample
    rto: float  # seconds
    total_retrans: int  # segments retransmitted over the socket's life
    data_segs_out: int | None  # None on kernels older than 4.6
    ack_age: float = math.inf  # seconds since the last ack received (none in SYN_SENT)


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


def dump_request(
    family: int,
    destinations: Iterable[tuple[str, int | None]],
    seq: int,
    *,
    states: int = CONNECTING | CONNECTED,
    port: int | None = None,
) -> bytes:
    """A dump request for TCP sockets of `family` in `states` whose destination is one of
    `destinations` ((address, port or None for any port), all of that family), and, when
    `port` is given, whose destination port is `port`."""
    sockid = (port or 0).to_bytes(4, "big") + bytes(44)  # sport 0 (any), dport
    body = REQUEST.pack(family, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states, sockid)
    program = _bytecode(destinations)
    attribute = ATTRIBUTE.pack(ATTRIBUTE.size + len(program), INET_DIAG_REQ_BYTECODE) + program
    length = NLMSG_HEADER.size + len(body) + len(attribute)
    header = NLMSG_HEADER.pack(length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body + attribute


class DumpError(Exception):
    """The kernel refused the dump (an NLMSG_ERROR): errno in args[0]."""


def destination_key(address: str, port: int) -> tuple[bytes, int]:
    """How a reply spells a destination before parsing (see parse_dump's `wanted`): the packed
    address (IPv4 in the first 4 of 16 bytes, as inet_diag_sockid holds it) and the port."""
    return ipaddress.ip_address(address).packed.ljust(16, b"\0"), port


@functools.lru_cache(maxsize=4096)
def _address_text(family: int, dst: bytes) -> str | None:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(dst[:4]))
    if family == AF_INET6:
        v6 = ipaddress.IPv6Address(dst)
        return str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)
    return None


def _tcp_socket(
    data: bytes, start: int, end: int, wanted: Container[tuple[bytes, int]] | None
) -> TcpSocket | None:
    """The socket in data[start:end] (one inet_diag_msg and its attributes), or None."""
    if end - start < MESSAGE.size:
        return None
    family, state, port_bytes, dst, cookie = MESSAGE_FIELDS.unpack_from(data, start)
    dport = int.from_bytes(port_bytes, "big")
    if family == AF_INET:
        dst = dst[:4] + bytes(12)  # the rest of the field is not the address's
    # Kernels that ignore the request's filter send every socket: the cheap test comes first.
    if wanted is not None and (dst, dport) not in wanted:
        return None
    address = _address_text(family, dst)
    if address is None:
        return None
    offset = start + MESSAGE.size
    while offset + ATTRIBUTE.size <= end:
        length, kind = ATTRIBUTE.unpack_from(data, offset)
        if length < ATTRIBUTE.size or offset + length > end:
            return None
        if kind == INET_DIAG_INFO:
            break
        offset += (length + 3) & ~3
    else:
        return None
    info, size = offset + ATTRIBUTE.size, length - ATTRIBUTE.size
    if size < TCP_INFO_HEAD.size:
        return None
    retransmits, rto_us, ack_age_ms, rtt_us, total_retrans = TCP_INFO_HEAD.unpack_from(data, info)
    segs = (
        U32.unpack_from(data, info + TCPI_DATA_SEGS_OUT)[0]
        if size >= TCPI_DATA_SEGS_OUT + 4
        else None
    )
    ack_age = ack_age_ms / 1e3 if state == TCP_ESTABLISHED else math.inf
    return TcpSocket(
        address, dport, cookie, state, retransmits, rtt_us / 1e6 if rtt_us else None,
        rto_us / 1e6, total_retrans, segs, ack_age,
    )  # fmt: skip


def parse_dump(
    data: bytes, wanted: Container[tuple[bytes, int]] | None = None
) -> tuple[list[TcpSocket], bool]:
    """The sockets in one read of the dump (only those whose destination_key is in `wanted`,
    when given), and whether the dump is complete (NLMSG_DONE). Raises DumpError when the
    kernel answers with an error."""
    sockets: list[TcpSocket] = []
    for kind, start, end in _messages(data):
        if kind == NLMSG_DONE:
            return sockets, True
        if kind == NLMSG_ERROR:
            errno = -I32.unpack_from(data, start)[0] if end - start >= 4 else 0
            raise DumpError(errno)
        if (
            kind == SOCK_DIAG_BY_FAMILY
            and (found := _tcp_socket(data, start, end, wanted)) is not None
        ):
            sockets.append(found)
    return sockets, False


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each netlink message's payload in data."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            return
        yield kind, offset + NLMSG_HEADER.size, offset + length
        offset += (length + 3) & ~3
