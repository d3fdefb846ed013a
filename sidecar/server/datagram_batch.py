"""Many datagrams per system call (Linux `recvmmsg` and `sendmmsg`, through ctypes), and the
one code that answers fast-path rows from such a batch.

Why: a Python `recvfrom` plus `sendto` pair costs about 2 us of a cache hit's ~11 us beyond
the kernel's own work (bench/results/ceiling.md): two system calls, an address tuple made for
every datagram (a str for the host) and parsed again for the reply (`sendto` encodes the host
and converts it back). Reading up to SIZE waiting datagrams in one call and sending their
replies in one more, with each reply going back to the sockaddr the kernel wrote for its
query, does neither per datagram (bench/NOTES.md: ~1.2x the plain loop).

Theory of operation
- All buffers live in one anonymous mmap, so the pages are only touched (and resident) once
  traffic uses them: headers, I/O vectors and sockaddrs first, then SIZE query slots and SIZE
  reply slots of SLOT bytes each.
- `receive()` takes whatever is queued, up to SIZE, in one recvmmsg (MSG_DONTWAIT), so a
  busy socket is read SIZE at a time. When nothing is queued (FIONREAD, asked only after a
  batch that was not full, says 0; or recvmmsg finds nothing) it blocks in a plain
  `recvfrom` and takes that one datagram alone (`lone_data`): `lone` is then its sender as
  `socket.recvfrom` gives it, and the closure sends its reply with a plain `sendto`. Each
  ctypes call costs ~1.5 us more than the plain socket call (3.1 against 1.9 us to read one
  datagram, 4.2 against 2.4 to answer one), all of it on the way of a query that comes
  alone: p50 at one query in flight 1.31x -> 1.18x dnsmasq (bench/NOTES.md).
  `receive(wait=False)` never blocks: the reader thread's look for more while it gathers
  misses.
- `server(...)` makes the closure that serves the datagrams of the last receive(): each one
  whose row is current (and whose client is admitted) gets `ID + the row's tail`; one with no
  current row gets what `answer_cold` makes of it (a reply rendered from its cache entry), if
  anything. Each reply is copied into the next reply slot, whose header then names the
  sockaddr of that datagram; the slots go out in sendmmsg calls of FLUSH_EVERY (the first
  reply of a batch of 32 waited for the other 31 to be made: 2.2x dnsmasq's p50 at half
  load), and the batch's served rows and its time go to `hand_off` in one call (its cold hits
  to `hand_off_cold`). A full batch (SIZE datagrams: more are waiting in the socket, the
  server is behind) sends its replies in one call: each reply waits behind the queue anyway,
  and three system calls fewer per batch let it drain sooner (QPS with 5% misses 0.90x ->
  0.97x dnsmasq, hits 1.13x -> 1.2x; the sidecar's p50 and p99 at half load within their
  noise: bench/NOTES.md).
  A reply longer than SLOT goes out with a plain `sendto`. A reply the kernel refuses (an
  unreachable client) is skipped: it is lost, as with `sendto`. Everything else goes to
  `lend` as (datagram, address as `socket.recvfrom` gives it).
- The caller runs `receive` and the closure in a thread of its own: ctypes releases the GIL
  for the calls.
- On x86_64 and aarch64 the two calls are made with libc's `syscall()`, the buffers being laid
  out as the kernel reads them: musl, the image's libc, implements sendmmsg on 64-bit machines
  as one sendmsg per message. Elsewhere on Linux, libc's own recvmmsg/sendmmsg.

Invariants of the closure (what keeps a lone query's path short)
- One Python function per batch, nothing called per datagram with a current row but builtins
  and the row's `next_tail` for shaped rows: when a query comes alone, each Python call on the
  way costs a microsecond or more of cold caches, and per-datagram helper calls cost ~15 us at
  one query in flight (bench/NOTES.md). Only a datagram without a current row calls
  `answer_cold` (the alternative is lending the socket to the loop, which costs more). So
  the layout is read inline, through memoryview casts (a fraction of a ctypes field access),
  with per-slot offsets computed once here.
- A lone datagram (`lone` set) is served first, on its own short branch, with the same
  decisions as a batch's: a current row (client admitted: `admitted_get` of its host) gives
  `ID + the row's tail`, else `answer_cold`, else `lend`; the served row or cold hit goes to
  `hand_off` / `hand_off_cold` as a batch of one.
- Reply slot j is filled in order, j = the number of replies staged since the last send
  (at most FLUSH_EVERY); only slots 0..staged-1 are sent, and a slot's size and destination
  are written before the send that reads them. Query slot i and sockaddr i belong to datagram
  i of this receive() until the next receive().
- The layout (offsets, casts, slots) is private to this module: nothing outside indexes it.
- The closure writes only this batch's buffers and its own admission memory; it reads the rows
  (`rows_get`, a row's `valid_until`, `tail`, `next_tail`) and the admission verdicts
  (`admitted_get`) that the event loop owns. Counting is the loop's: see `hand_off`.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable
from fcntl import ioctl
from functools import partial
from termios import FIONREAD
from typing import Protocol, TypeVar

from sidecar.server.msghdr import IoVec, MMsgHdr, MsgHdr

SIZE = 32  # datagrams per call
SLOT = 4096  # bytes per query and per reply slot; a longer query is cut (and fails to parse)
FLUSH_EVERY = 8  # replies staged at most before a send (a full batch: SIZE, see above)
ERROR_PAUSE = 0.001  # after an unexpected receive error, so a persistent one cannot spin
MAX_KNOWN_CLIENTS = 1024  # raw client addresses a batch server remembers as admitted

Address = tuple[str | int, ...]
BatchServer = Callable[[int], None]  # serves datagrams 0..n-1 of the last receive()


class Row(Protocol):
    """What the batch server reads of a fast-path row (core/fast_path.py's FastHit)."""

    @property
    def valid_until(self) -> float:
        """Monotonic seconds: the row is current before this moment."""

    @property
    def tail(self) -> bytes:
        """The reply after its ID; b"" when the replies come from `next_tail`."""

    @property
    def next_tail(self) -> Callable[[], bytes]:
        """Gives the reply after its ID (a shaped row's variants in turn)."""


R = TypeVar("R", bound=Row)
C = TypeVar("C")  # what `answer_cold` notes of a datagram it answered, for `hand_off_cold`


_NAME = 32  # bytes per sockaddr slot: sockaddr_in6 is 28
_HDR = ctypes.sizeof(MMsgHdr)
_IOV = ctypes.sizeof(IoVec)
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
                iov = IoVec.from_buffer(self._memory, iovs + i * _IOV)
                iov.iov_base, iov.iov_len = base + slots + i * SLOT, SLOT
                hdr = MMsgHdr.from_buffer(self._memory, hdrs + i * _HDR).msg_hdr
                hdr.msg_name, hdr.msg_namelen = base + names + i * _NAME, name_len
                hdr.msg_iov, hdr.msg_iovlen = base + iovs + i * _IOV, 1
        self._in_hdrs_at, self._out_hdrs_at = base + in_hdrs, base + out_hdrs
        # The layout, as indexes into typed views of the same memory (see the module's notes).
        memory = memoryview(self._memory)
        self._view = memory
        self._lengths = memory.cast("I")
        self._sizes = memory.cast("Q") if _SIZE_T == 8 else memory.cast("I")
        self._pointers = memory.cast("P")
        length_at = (in_hdrs + MMsgHdr.msg_len.offset) // 4
        host_start, host_end = (4, 8) if self.family == socket.AF_INET else (8, 24)
        # Per datagram i: where it starts, the index of its length in `_lengths`, and where
        # its sender's address (without the port) starts and ends.
        self._incoming = [
            (
                slots_at + i * SLOT,
                length_at + i * _HDR // 4,
                names + i * _NAME + host_start,
                names + i * _NAME + host_end,
            )
            for i in range(SIZE)
        ]
        # Per reply slot j: where it starts, and the indexes of its length in `_sizes` and of
        # its destination in `_pointers`.
        size_at = (out_iovs + IoVec.iov_len.offset) // _SIZE_T
        name_at = (out_hdrs + MsgHdr.msg_name.offset) // _POINTER
        self._outgoing = [
            (out_slots + j * SLOT, size_at + j * _IOV // _SIZE_T, name_at + j * _HDR // _POINTER)
            for j in range(SIZE)
        ]
        # Per datagram i: the address of the sockaddr the kernel wrote for its sender.
        self._senders = [base + names + i * _NAME for i in range(SIZE)]
        self._names = names
        # The last receive()'s one datagram and its sender when it came alone (read with a
        # plain recvfrom, its reply sent with a plain sendto); None after a batch.
        self.lone: Address | None = None
        self.lone_data = b""
        self._full = False  # the last receive() took SIZE: more are waiting, surely
        self._next_size = array.array("i", [0])  # FIONREAD's answer

    def receive(self, wait: bool = True) -> int:
        """Take up to SIZE waiting datagrams; when none is waiting, block until one comes
        and take it alone (`lone` is then its sender). 0 after shutdown(SHUT_RD) (or on an
        unexpected error, after a short pause). `wait=False`: 0 at once when nothing waits."""
        self.lone = None
        if wait and not self._full:
            # The last receive emptied the socket: is anything waiting now? (FIONREAD: the
            # size of the next datagram, 0 when none; a datagram of 0 bytes is read below.)
            ioctl(self.fd, FIONREAD, self._next_size)
            if not self._next_size[0]:
                return self._receive_lone()
        count: int = self._recvmmsg(self.fd, self._in_hdrs_at, SIZE, socket.MSG_DONTWAIT, None)
        self._full = count == SIZE
        if count > 0:
            return count
        if count < 0:
            error = ctypes.get_errno()
            if error in (errno.EAGAIN, errno.EINTR):
                return self._receive_lone() if wait else 0
            time.sleep(ERROR_PAUSE)
        return 0

    def _receive_lone(self) -> int:
        """Block until a datagram comes; take it alone, with a plain recvfrom (its reply
        goes out with a plain sendto): one query in flight costs what a plain loop costs."""
        try:
            data, sender = self.sock.recvfrom(SLOT)  # a longer one is cut, as in a slot
        except OSError:
            time.sleep(ERROR_PAUSE)
            return 0
        if sender is None:  # woken by shutdown(SHUT_RD)
            return 0
        self.lone, self.lone_data = sender, data
        return 1

    def _address(self, i: int) -> Address:
        """The sender of datagram `i`, as `socket.recvfrom` gives it."""
        o = self._names + i * _NAME
        name = bytes(self._view[o : o + _NAME])
        port = int.from_bytes(name[2:4], "big")
        if self.family == socket.AF_INET:
            return socket.inet_ntoa(name[4:8]), port
        flow = int.from_bytes(name[4:8], "big")
        scope = int.from_bytes(name[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flow, scope

    def _send(self, count: int) -> None:
        """Send reply slots 0..count-1."""
        sent = 0
        while sent < count:
            done: int = self._sendmmsg(self.fd, self._out_hdrs_at + sent * _HDR, count - sent, 0)
            if done > 0:
                sent += done
            elif ctypes.get_errno() != errno.EINTR:
                sent += 1  # the kernel refused this one (an unreachable client): lost

    def _send_one(self, reply: bytes, i: int) -> None:
        """Send `reply` to the sender of datagram `i` at once, with a plain sendto."""
        with contextlib.suppress(OSError):  # as a refused reply in a batch
            self.sock.sendto(reply, self._address(i))

    def server(
        self,
        rows_get: Callable[[bytes], R | None],
        admitted_get: Callable[[str | int], bool | None] | None,
        hand_off: Callable[[tuple[list[R], float]], None],
        lend: Callable[[list[tuple[bytes, Address]]], None],
        clock: Callable[[], float],
        answer_cold: Callable[[bytes, float, list[C], R | None], bytes | None] | None = None,
        hand_off_cold: Callable[[tuple[list[C], float, float]], None] | None = None,
    ) -> BatchServer:
        """The closure that serves datagrams 0..count-1 of the last receive(): a datagram
        whose row (`rows_get` of its bytes after the ID) is current at the batch's `clock()`
        and whose client is admitted is answered from the row, one with no current row by
        `answer_cold(datagram, now, cold)` if it gives a reply (noting the hit in `cold`);
        the replies go out together, then `hand_off((rows served, seconds the batch took))`
        and `hand_off_cold((cold, now, seconds))`; the rest go to `lend`, once per batch.
        `admitted_get` (None: everyone is) gives True for a client host judged allowed; a
        client's raw address found so is remembered, so the next datagram from it is one dict
        lookup before its address is decoded."""
        known: dict[bytes, bool] = {}
        known_get = known.get
        memory, lengths, sizes, pointers = self._view, self._lengths, self._sizes, self._pointers
        incoming, outgoing, senders = self._incoming, self._outgoing, self._senders
        address, send, send_one = self._address, self._send, self._send_one
        batch, sock_sendto = self, self.sock.sendto

        def admitted(i: int) -> bool:
            """A client not in `known` yet: its verdict, remembered if it is True."""
            assert admitted_get is not None
            if admitted_get(address(i)[0]) is not True:
                return False  # not judged yet, or refused: the loop's admission says which
            if len(known) >= MAX_KNOWN_CLIENTS:
                known.clear()
            _, _, client_start, client_end = incoming[i]
            known[bytes(memory[client_start:client_end])] = True
            return True

        def serve(count: int) -> None:
            now = clock()
            lone = batch.lone
            if lone is not None:
                # One datagram, read with recvfrom (`receive`): the same decisions as below,
                # its reply sent with a plain sendto, straight to its sender.
                data = batch.lone_data
                row = rows_get(data[2:])
                resting = None
                if row is not None and now >= row.valid_until:
                    resting, row = row, None
                if (row is not None or answer_cold is not None) and (
                    admitted_get is None or admitted_get(lone[0]) is True
                ):
                    reply: bytes | None = None
                    if row is not None:
                        reply = data[:2] + (row.tail or row.next_tail())
                    elif answer_cold is not None:
                        lone_cold: list[C] = []  # a row's hit allocates nothing it need not
                        reply = answer_cold(data, now, lone_cold, resting)
                    if reply is not None:
                        try:  # noqa: SIM105 (contextlib.suppress: ~0.5 us more here)
                            sock_sendto(reply, lone)
                        except OSError:
                            pass  # as a refused reply in a batch: lost
                        if row is not None:
                            hand_off(([row], clock() - now))
                        elif hand_off_cold is not None:
                            hand_off_cold((lone_cold, now, clock() - now))
                        return
                lend([(data, lone)])
                return
            served: list[R] = []
            cold: list[C] = []
            slow: list[tuple[bytes, Address]] | None = None
            staged = 0
            # A full batch: more datagrams wait in the socket, and every reply of the batch
            # waits behind them anyway; its replies go out in one call (see FLUSH_EVERY).
            flush_every = SIZE if count == SIZE else FLUSH_EVERY
            for i in range(count):
                start, length, client_start, client_end = incoming[i]
                data = bytes(memory[start : start + lengths[length]])
                row = rows_get(data[2:])
                resting = None
                if row is not None and now >= row.valid_until:
                    resting, row = row, None  # past its moment: the entry's, or the loop's
                reply = None
                if (row is not None or answer_cold is not None) and (
                    admitted_get is None
                    or known_get(bytes(memory[client_start:client_end]))
                    or admitted(i)
                ):
                    if row is not None:
                        reply = data[:2] + (row.tail or row.next_tail())
                        served.append(row)
                    elif answer_cold is not None:
                        reply = answer_cold(data, now, cold, resting)
                if reply is not None:
                    size = len(reply)
                    if size <= SLOT:
                        at, size_at, name_at = outgoing[staged]
                        memory[at : at + size] = reply
                        sizes[size_at] = size
                        pointers[name_at] = senders[i]
                        staged += 1
                        if staged == flush_every:
                            send(staged)
                            staged = 0
                    else:
                        send_one(reply, i)
                    continue
                if slow is None:
                    slow = []
                slow.append((data, address(i)))
            if staged:
                send(staged)
            if served or cold:
                seconds = clock() - now
                if served:
                    hand_off((served, seconds))
                if cold and hand_off_cold is not None:
                    hand_off_cold((cold, now, seconds))
            if slow is not None:
                lend(slow)

        return serve
