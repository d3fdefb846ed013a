"""Many datagrams per system call: Linux `recvmmsg` and `sendmmsg`, through ctypes.

Why: on this machine a Python `recvfrom` plus `sendto` pair costs about 2 us of a cache hit's
~11 us beyond the kernel's own work: two system calls, an address tuple made for every
datagram (a str for the host) and parsed again for the reply (`sendto` encodes the host and
converts it back). Reading up to SIZE waiting datagrams in one call and sending their replies
in one more, with each reply going back to the sockaddr the kernel wrote for its query, does
neither per datagram (bench/NOTES.md, session 4: ~1.2x the plain loop).

Theory of operation
- All buffers live in one anonymous mmap, so the pages are only touched (and resident) once
  traffic uses them: headers, I/O vectors and sockaddrs first, then SIZE query slots and SIZE
  reply slots of SLOT bytes each.
- `receive()` blocks in recvmmsg with MSG_WAITFORONE: it waits for one datagram, then takes
  whatever else is already queued, up to SIZE, without waiting more. So one query in flight
  costs no latency, and a busy socket is read SIZE at a time.
- `query(i)` copies datagram i out as bytes; `client(i)` gives its sender's raw address
  (bytes, no port) for a cheap admission lookup; `address(i)` decodes the sender as the tuple
  Python's socket module would give (for the slow path).
- `stage(j, i, reply)` copies a reply into reply slot j, whose header then names the sockaddr
  of datagram i; `send(n)` sends slots 0..n-1 with sendmmsg. A reply longer than SLOT goes out
  with a plain `sendto` (`send_one`). A reply the kernel refuses (an unreachable client) is
  skipped: it is lost, as with `sendto`.
- The caller runs `receive` in a thread of its own: ctypes releases the GIL for the call.
- On x86_64 and aarch64 the two calls are made with libc's `syscall()`, the buffers being laid
  out as the kernel reads them: musl, the image's libc, implements sendmmsg on 64-bit machines
  as one sendmsg per message. Elsewhere on Linux, libc's own recvmmsg/sendmmsg.
- ctypes's structures are used to lay the buffers out (so the offsets are the platform's);
  the per-datagram fields are then read and written through memoryview casts, which cost a
  fraction of a ctypes field access. The reader thread's hot path inlines `query`, `client`
  and `stage` over the public layout (`memory`, `lengths`, `incoming`, ...): when a query
  comes alone, each Python call on the way costs a microsecond or more of cold caches, and
  the per-datagram calls cost ~15 us at one query in flight (bench/NOTES.md, session 4).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial

SIZE = 32  # datagrams per call
SLOT = 4096  # bytes per query and per reply slot; a longer query is cut (and fails to parse)
MSG_WAITFORONE = 0x10000  # linux/socket.h
ERROR_PAUSE = 0.001  # after an unexpected receive error, so a persistent one cannot spin


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_NAME = 32  # bytes per sockaddr slot: sockaddr_in6 is 28
_HDR = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IoVec)
_POINTER = ctypes.sizeof(ctypes.c_void_p)
_SIZE_T = ctypes.sizeof(ctypes.c_size_t)


# The system call numbers of recvmmsg and sendmmsg, on the machines ECS runs tasks on. There
# the calls go straight to the kernel through libc's syscall(): musl (the image's libc) turns
# sendmmsg into one sendmsg per message on 64-bit machines, because its struct msghdr has
# int-sized fields where the kernel's are size_t; these buffers are laid out as the kernel's.
_SYSCALL_NUMBERS = {"x86_64": (299, 307), "aarch64": (243, 269)}


def _libc_calls() -> tuple[Callable[..., int], Callable[..., int]] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd, pointer, uint, flags = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    numbers = _SYSCALL_NUMBERS.get(os.uname().machine)
    if numbers is not None:
        recv_call, send_call = libc["syscall"], libc["syscall"]  # two objects: own argtypes
        recv_call.argtypes = [ctypes.c_long, fd, pointer, uint, flags, pointer]
        send_call.argtypes = [ctypes.c_long, fd, pointer, uint, flags]
        recv_call.restype = send_call.restype = ctypes.c_int
        return partial(recv_call, numbers[0]), partial(send_call, numbers[1])
    try:
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except AttributeError:
        return None
    recvmmsg.argtypes = [fd, pointer, uint, flags, pointer]
    sendmmsg.argtypes = [fd, pointer, uint, flags]
    recvmmsg.restype = sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()


def available() -> bool:
    """Whether this platform has recvmmsg/sendmmsg (Linux)."""
    return _CALLS is not None


class DatagramBatch:
    """Receive buffers for SIZE datagrams and reply buffers for SIZE replies, on one socket."""

    def __init__(self, sock: socket.socket) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _CALLS
        self.sock = sock
        self.family = sock.family
        self.fd = sock.fileno()
        headers = 2 * SIZE * (_HDR + _IOV) + SIZE * _NAME
        slots_at = -(-headers // mmap.PAGESIZE) * mmap.PAGESIZE
        self._memory = mmap.mmap(-1, slots_at + 2 * SIZE * SLOT)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        in_hdrs, out_hdrs = 0, SIZE * _HDR
        in_iovs, out_iovs = 2 * SIZE * _HDR, 2 * SIZE * _HDR + SIZE * _IOV
        names = 2 * SIZE * (_HDR + _IOV)
        out_slots = slots_at + SIZE * SLOT
        name_len = 16 if self.family == socket.AF_INET else 28
        for i in range(SIZE):
            for hdrs, iovs, slots in (
                (in_hdrs, in_iovs, slots_at),
                (out_hdrs, out_iovs, out_slots),
            ):
                iov = _IoVec.from_buffer(self._memory, iovs + i * _IOV)
                iov.iov_base, iov.iov_len = base + slots + i * SLOT, SLOT
                hdr = _MMsgHdr.from_buffer(self._memory, hdrs + i * _HDR).msg_hdr
                hdr.msg_name, hdr.msg_namelen = base + names + i * _NAME, name_len
                hdr.msg_iov, hdr.msg_iovlen = base + iovs + i * _IOV, 1
        self._in_hdrs_at, self._out_hdrs_at = base + in_hdrs, base + out_hdrs
        # The layout, as indexes into typed views of the same memory. The reader thread's hot
        # path (server/udp.py) inlines `query`, `client` and `stage` with these.
        memory = memoryview(self._memory)
        self.memory = memory
        self.lengths = memory.cast("I")
        self.sizes = memory.cast("Q") if _SIZE_T == 8 else memory.cast("I")
        self.pointers = memory.cast("P")
        length_at = (in_hdrs + _MMsgHdr.msg_len.offset) // 4
        host_start, host_end = (4, 8) if self.family == socket.AF_INET else (8, 24)
        # Per datagram i: where it starts, the index of its length in `lengths`, and where
        # its sender's address (without the port) starts and ends.
        self.incoming = [
            (
                slots_at + i * SLOT,
                length_at + i * _HDR // 4,
                names + i * _NAME + host_start,
                names + i * _NAME + host_end,
            )
            for i in range(SIZE)
        ]
        # Per reply slot j: where it starts, and the indexes of its length in `sizes` and of
        # its destination in `pointers`.
        size_at = (out_iovs + _IoVec.iov_len.offset) // _SIZE_T
        name_at = (out_hdrs + _MsgHdr.msg_name.offset) // _POINTER
        self.outgoing = [
            (out_slots + j * SLOT, size_at + j * _IOV // _SIZE_T, name_at + j * _HDR // _POINTER)
            for j in range(SIZE)
        ]
        # Per datagram i: the address of the sockaddr the kernel wrote for its sender.
        self.senders = [base + names + i * _NAME for i in range(SIZE)]
        self._names = names

    def receive(self) -> int:
        """Block until at least one datagram is waiting; take up to SIZE. 0 after
        shutdown(SHUT_RD) (or on an unexpected error, after a short pause)."""
        while True:
            count: int = self._recvmmsg(self.fd, self._in_hdrs_at, SIZE, MSG_WAITFORONE, None)
            if count >= 0:
                return count
            if ctypes.get_errno() != errno.EINTR:
                time.sleep(ERROR_PAUSE)
                return 0

    def query(self, i: int) -> bytes:
        """Datagram `i` of the last receive()."""
        start, length, _, _ = self.incoming[i]
        return bytes(self.memory[start : start + self.lengths[length]])

    def client(self, i: int) -> bytes:
        """The sender of datagram `i`: its raw address, without the port."""
        _, _, start, end = self.incoming[i]
        return bytes(self.memory[start:end])

    def address(self, i: int) -> tuple[str | int, ...]:
        """The sender of datagram `i`, as `socket.recvfrom` gives it."""
        o = self._names + i * _NAME
        name = bytes(self.memory[o : o + _NAME])
        port = int.from_bytes(name[2:4], "big")
        if self.family == socket.AF_INET:
            return socket.inet_ntoa(name[4:8]), port
        flow = int.from_bytes(name[4:8], "big")
        scope = int.from_bytes(name[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flow, scope

    def stage(self, j: int, i: int, reply: bytes) -> bool:
        """Put `reply` in reply slot `j`, addressed to the sender of datagram `i`; False if it
        is longer than a slot (send it with `send_one`)."""
        size = len(reply)
        if size > SLOT:
            return False
        start, size_at, name_at = self.outgoing[j]
        self.memory[start : start + size] = reply
        self.sizes[size_at] = size
        self.pointers[name_at] = self.senders[i]
        return True

    def send(self, count: int) -> None:
        """Send reply slots 0..count-1."""
        sent = 0
        while sent < count:
            done: int = self._sendmmsg(self.fd, self._out_hdrs_at + sent * _HDR, count - sent, 0)
            if done > 0:
                sent += done
            elif ctypes.get_errno() != errno.EINTR:
                sent += 1  # the kernel refused this one (an unreachable client): lost

    def send_one(self, reply: bytes, i: int) -> None:
        """Send `reply` to the sender of datagram `i` at once, with a plain sendto."""
        with contextlib.suppress(OSError):  # as a refused reply in a batch
            self.sock.sendto(reply, self.address(i))
