"""The socket-diagnostics wire format on bytes: the request's filter program, replies parsed,
hostile and truncated replies skipped."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from sidecar.discovery import sock_diag as d


def run_filter(program: bytes, address: str, port: int) -> bool:
    """The kernel's reading of a filter program (inet_diag_bc_run) for D_COND and JMP: a test
    that holds moves by `yes`, one that fails (and every JMP) by `no`; accepted when the walk
    ends exactly at the end."""
    ip = ipaddress.ip_address(address)
    rest, offset = len(program), 0
    while rest > 0:
        code, yes, no = d.BC_OP.unpack_from(program, offset)
        holds = False
        if code == d.INET_DIAG_BC_D_COND:
            family, prefix, want_port = d.HOSTCOND.unpack_from(program, offset + d.BC_OP.size)
            start = offset + d.BC_OP.size + d.HOSTCOND.size
            want = program[start : start + (4 if family == d.AF_INET else 16)]
            holds = (
                (want_port in (-1, port))
                and family == (d.AF_INET if ip.version == 4 else d.AF_INET6)
                and prefix == ip.max_prefixlen
                and want == ip.packed
            )
        step = yes if holds else no
        rest, offset = rest - step, offset + step
    return rest == 0


def request_program(request: bytes) -> bytes:
    body = request[d.NLMSG_HEADER.size + d.REQUEST.size :]
    length, kind = d.ATTRIBUTE.unpack_from(body)
    assert kind == d.INET_DIAG_REQ_BYTECODE and length == len(body)
    return body[d.ATTRIBUTE.size :]


@pytest.mark.parametrize(
    ("address", "port", "accepted"),
    [
        ("10.0.0.1", 80, True),
        ("10.0.0.1", 81, False),
        ("10.0.0.2", 1234, True),  # any port
        ("10.0.0.3", 8080, True),
        ("10.0.0.4", 80, False),
    ],
)
def test_the_filter_accepts_exactly_the_destinations(
    address: str, port: int, accepted: bool
) -> None:
    request = d.dump_request(
        d.AF_INET, [("10.0.0.1", 80), ("10.0.0.2", None), ("10.0.0.3", 8080)], seq=7
    )
    assert run_filter(request_program(request), address, port) is accepted


def test_a_one_destination_filter_and_the_request_header() -> None:
    request = d.dump_request(d.AF_INET6, [("fd00::5", 443)], seq=9)
    length, kind, flags, seq, _pid = d.NLMSG_HEADER.unpack_from(request)
    assert (length, kind, flags, seq) == (len(request), 20, 0x301, 9)
    family, protocol, ext, _pad, states, _id = d.REQUEST.unpack_from(request, 16)
    assert (family, protocol, ext, states) == (d.AF_INET6, 6, 2, 0b110)
    program = request_program(request)
    assert run_filter(program, "fd00::5", 443)
    assert not run_filter(program, "fd00::5", 80)
    assert not run_filter(program, "fd00::6", 443)


def test_the_request_carries_the_states_and_the_destination_port() -> None:
    request = d.dump_request(d.AF_INET, [("10.0.0.1", 8080)], 1, states=d.CONNECTING, port=8080)
    *_, states, sockid = d.REQUEST.unpack_from(request, d.NLMSG_HEADER.size)
    assert states == 1 << d.TCP_SYN_SENT
    assert struct.unpack_from("!HH", sockid) == (0, 8080)  # any source port, this destination
    assert sockid[4:] == bytes(44)


def tcp_info(
    state: int, retransmits: int, rto_us: int, rtt_us: int, retrans: int, segs: int, ack_ms: int = 0
) -> bytes:
    info = bytearray(232)
    info[0], info[2] = state, retransmits
    for offset, value in ((8, rto_us), (56, ack_ms), (68, rtt_us), (100, retrans), (156, segs)):
        struct.pack_into("=I", info, offset, value)
    return bytes(info)


def reply(
    address: str, port: int, cookie: int, info: bytes | None, family: int = d.AF_INET
) -> bytes:
    ip = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    body = d.MESSAGE.pack(
        family, info[0] if info else 1, 0, 0, b"\0\1", port.to_bytes(2, "big"), bytes(16), ip, 0,
        cookie.to_bytes(8, "little"), 0, 0, 0, 0, 0,
    )  # fmt: skip
    if info is not None:
        body += d.ATTRIBUTE.pack(d.ATTRIBUTE.size + len(info), d.INET_DIAG_INFO) + info
    return d.NLMSG_HEADER.pack(16 + len(body), 20, 2, 1, 0) + body


DONE = d.NLMSG_HEADER.pack(20, d.NLMSG_DONE, 2, 1, 0) + bytes(4)


def test_replies_are_parsed_until_done() -> None:
    data = reply("10.0.0.1", 80, 5, tcp_info(1, 0, 204_000, 1500, 3, 30, 250)) + DONE
    sockets, done = d.parse_dump(data)
    assert done
    assert sockets == [
        d.TcpSocket("10.0.0.1", 80, (5).to_bytes(8, "little"), 1, 0, 0.0015, 0.204, 3, 30, 0.25)
    ]


def test_an_ipv4_mapped_destination_is_spelled_as_ipv4_and_an_old_tcp_info_has_no_segments() -> (
    None
):
    data = reply("::ffff:10.0.0.2", 443, 1, tcp_info(2, 1, 1_000_000, 0, 0, 0)[:104], d.AF_INET6)
    [sock], done = d.parse_dump(data)
    assert not done
    assert (sock.address, sock.state, sock.retransmits, sock.rtt, sock.data_segs_out) == (
        "10.0.0.2", 2, 1, None, None,
    )  # fmt: skip
    assert sock.ack_age == float("inf")  # a connect has received no ack


@pytest.mark.parametrize(
    "hostile",
    [
        reply("10.0.0.1", 80, 1, None),  # no tcp_info
        reply("10.0.0.1", 80, 1, bytes(20)),  # tcp_info too short
        reply("10.0.0.1", 80, 1, tcp_info(1, 0, 0, 0, 0, 0))[:-5],  # cut inside the attribute
        reply("10.0.0.1", 80, 1, tcp_info(1, 0, 0, 0, 0, 0), family=99),
        d.NLMSG_HEADER.pack(8, 20, 0, 0, 0),  # length shorter than the header
        d.NLMSG_HEADER.pack(500, 20, 0, 0, 0) + bytes(20),  # longer than the data
        b"\x01\x02\x03",
        b"",
    ],
)
def test_hostile_replies_are_skipped(hostile: bytes) -> None:
    assert d.parse_dump(hostile) == ([], False)


def test_an_error_reply_raises_dump_error_with_the_errno() -> None:
    error = d.NLMSG_HEADER.pack(36, d.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -22) + bytes(16)
    with pytest.raises(d.DumpError) as raised:
        d.parse_dump(error)
    assert raised.value.args == (22,)


def test_only_wanted_destinations_are_parsed() -> None:
    info = tcp_info(1, 0, 204_000, 1500, 0, 1)
    data = reply("10.0.0.1", 80, 1, info) + reply("10.0.0.2", 80, 2, info)
    data += reply("10.0.0.1", 81, 3, info) + reply("fd00::1", 80, 4, info, d.AF_INET6)
    wanted = {d.destination_key("10.0.0.1", 80), d.destination_key("fd00::1", 80)}
    sockets, _ = d.parse_dump(data, wanted)
    assert [(s.address, s.port) for s in sockets] == [("10.0.0.1", 80), ("fd00::1", 80)]
