"""``--manage-resolv-conf``: point the task's resolv.conf at the sidecar, and put it back.

Where ``dnsServers`` cannot be used (``awsvpc`` on EC2, Fargate), every container of a task
shares one network namespace, so the sidecar's 127.0.0.1:53 is reachable from all of them, and
with Docker they also share one resolv.conf: the pause container's file, bind-mounted into each
container. Rewriting that file once, from the sidecar, sends the whole task's DNS through it.

What is written: comment lines carrying the original file verbatim (so a restarted sidecar, or a
SIGHUP reload, can still learn the original nameservers and put the original back), then
``nameserver <our first listen address>``, then the original's other lines (``search``,
``options``, ``domain``...) unchanged.

How it is written: atomically (a temporary file renamed over it) when that is possible. A file
that is a bind mount (Docker's resolv.conf) cannot be renamed over (EBUSY), and renaming would
only change our own mount namespace anyway; such a file is rewritten in place, keeping its inode,
which is what makes the change visible to the other containers that mount the same file.

Reading the file belongs here too: config loading asks :func:`original_nameservers` for the
default upstreams (the original's, when the file is our rewrite); ``sidecar.app`` calls
:func:`take_over` once the listeners are up and :func:`restore` when it stops. This module does
not import ``sidecar.config`` (which imports it), so it can be used and tested on its own.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.addresses import DNS_PORT, HostPort, reachable_at
from sidecar.errors import ConfigError

MARKER = "#dns-sidecar-original:"
HEADER = (
    "# Rewritten by dns-sidecar (--manage-resolv-conf): DNS goes through the sidecar.\n"
    "# The original, below after '#dns-sidecar-original:', is put back when it stops.\n"
)
SETTING = "manage_resolv_conf"
DEFAULT_PATH = "/etc/resolv.conf"

# errno values after which an atomic rename is not possible here, but writing in place may be.
_NO_RENAME = {errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True, slots=True)
class Original:
    """What :func:`take_over` replaced: enough to put it back with :func:`restore`."""

    path: str  # the file written (symlinks resolved)
    text: str  # the original content, byte for byte
    written: str  # what we wrote; restore() leaves a file that no longer holds it alone
    nameserver: str  # the address we wrote


def original_text(text: str) -> str:
    """The original content of a file we rewrote (embedded in it), or ``text`` itself."""
    embedded = [line[len(MARKER) :] for line in text.split("\n") if line.startswith(MARKER)]
    return "\n".join(embedded) if embedded else text


def nameservers(text: str) -> list[HostPort]:
    """The ``nameserver`` addresses of resolv.conf text, in order; unparsable lines are skipped
    (the C resolver ignores them too, and a default must not fail on what it would accept)."""
    found: list[HostPort] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue  # blank, comment (# or ;) or another option
        try:
            ip = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        found.append(HostPort(str(ip), DNS_PORT))
    return found


def original_nameservers(path: str) -> list[HostPort]:
    """The nameservers of the file at ``path`` as it was before we rewrote it (if we did), so
    a restarted or reloaded sidecar never takes itself for an upstream; none when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = original_text(f.read())
    except OSError:
        return []
    return nameservers(text)


def our_nameserver(listen: Sequence[HostPort], key: str = SETTING) -> str:
    """The address resolv.conf must name: our first listen host (a wildcard -> loopback).

    resolv.conf has no way to give a port, so that address must listen on port 53.
    """
    first = listen[0]
    if first.port != DNS_PORT:
        raise ConfigError(
            key,
            True,
            f"resolv.conf cannot name a port: the first listen address ({first}) must use "
            "port 53 to manage resolv.conf",
        )
    return reachable_at(first).host


def render(original: str, nameserver: str) -> str:
    """The managed file: the original embedded as comments, our nameserver, its other lines."""
    kept = []
    for line in original.split("\n"):
        words = line.split()
        if not words or words[0].startswith(("#", ";")) or words[0] == "nameserver":
            continue
        kept.append(line.rstrip() + "\n")
    embedded = "".join(f"{MARKER}{line}\n" for line in original.split("\n"))
    return f"{HEADER}{embedded}nameserver {nameserver}\n{''.join(kept)}"


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _write_in_place(path: str, data: bytes) -> None:
    """Overwrite the file's content keeping its inode (what bind mounts of it see)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes) -> None:
    """A temporary file in the same directory, with the file's mode and owner, renamed over."""
    import tempfile  # lazy: only --manage-resolv-conf writes, once at start and once at stop

    st = os.stat(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".resolv.conf.", dir=directory)
    try:
        try:
            os.fchmod(fd, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write(path: str, text: str) -> str:
    """Replace the content of ``path``; returns ``"rename"`` or ``"in place"`` (how)."""
    data = text.encode("utf-8", errors="surrogateescape")
    try:
        _write_atomically(path, data)
        return "rename"
    except OSError as e:
        if e.errno not in _NO_RENAME:
            raise
    _write_in_place(path, data)
    return "in place"


def take_over(path: str, listen: Sequence[HostPort]) -> Original:
    """Rewrite resolv.conf to name only our first listen address; returns what to restore.

    A file that already is our rewrite (a sidecar that died without restoring it) is taken
    over again with the original it carries, so the original is never lost.
    """
    nameserver = our_nameserver(listen)
    real = os.path.realpath(path)
    original = original_text(_read(real))
    managed = render(original, nameserver)
    write(real, managed)
    return Original(real, original, managed, nameserver)


def restore(original: Original) -> bool:
    """Put the original back; False (and nothing written) when the file has changed since."""
    try:
        current = _read(original.path)
    except FileNotFoundError:
        return False
    if current != original.written:
        return False
    write(original.path, original.text)
    return True
