"""Run a real NSD on a loopback address, serving zone texts given by the test.

NSD is the "real upstream" of the interop tests: a well-behaved authoritative server whose
answers (truncation, negative answers with SOA, EDNS handling) are what a real network gives.
Each instance lives in its own temporary directory, runs in the foreground as the current user
(no privilege drop, no database file, no remote control) and is stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.processes import end

NSD_BINARY = shutil.which("nsd") or "/usr/sbin/nsd"

_next_host = itertools.count(random.randrange(250))  # apart from other runs on this host


def loopback_host(block: int) -> str:
    """A fresh IPv4 loopback address 127.0.<block>.<n>, distinct per call within a block.

    Giving each server its own address keeps servers apart even if a port is reused.
    """
    return f"127.0.{block}.{next(_next_host) % 250 + 2}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port number free on `host` for both UDP and TCP at the time of the call."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    raise
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


@dataclass
class NsdServer:
    """A running (or not yet started) NSD; use as a context manager or call start()/stop()."""

    zones: Mapping[str, str]
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    extra_hosts: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """HOST:PORT, the form the sidecar's --upstream/--zone flags take."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nsd.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        hosts = (self.host, *self.extra_hosts)
        lines = [
            "server:",
            *(f'  ip-address: "{h}@{self.port}"' for h in hosts),
            f"  port: {self.port}",
            f"  do-ip6: {'yes' if any(':' in h for h in hosts) else 'no'}",
            '  username: ""',
            '  chroot: ""',
            '  database: ""',
            f'  zonesdir: "{self.workdir}"',
            f'  pidfile: "{self.workdir / "nsd.pid"}"',
            f'  xfrdfile: "{self.workdir / "xfrd.state"}"',
            f'  xfrdir: "{self.workdir}"',
            f'  zonelistfile: "{self.workdir / "zone.list"}"',
            f'  logfile: "{self.log_path}"',
            "  verbosity: 0",
            "  server-count: 1",
            "  hide-version: yes",
            "  rrl-ratelimit: 0",
            "  rrl-whitelist-ratelimit: 0",
            "  reuseport: no",
            "remote-control:",
            "  control-enable: no",
        ]
        for i, (origin, text) in enumerate(self.zones.items()):
            zonefile = self.workdir / f"zone{i}.zone"
            zonefile.write_text(text)
            lines += ["zone:", f'  name: "{_fqdn(origin)}"', f'  zonefile: "{zonefile.name}"']
        conf = self.workdir / "nsd.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> NsdServer:
        if self.port == 0:
            self.port = free_port(self.host)
        conf = self._write_config()
        check = subprocess.run(
            [shutil.which("nsd-checkconf") or "nsd-checkconf", str(conf)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nsd-checkconf rejected {conf}: {check.stderr or check.stdout}")
        stderr = (self.workdir / "nsd.stderr").open("wb")
        with stderr:
            self.proc = subprocess.Popen(
                [NSD_BINARY, "-d", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        origin = _fqdn(next(iter(self.zones)))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out = (self.workdir / "nsd.stderr").read_text(errors="replace")
                raise RuntimeError(
                    f"nsd exited with {self.proc.returncode}:\n{out}\n{self.log_text()}"
                )
            query = dns.message.make_query(origin, dns.rdatatype.SOA, use_edns=False)
            with contextlib.suppress(dns.exception.Timeout, OSError):
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nsd did not answer on {self.address}:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        end(proc, signal.SIGTERM, timeout=5)

    def __enter__(self) -> NsdServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running_nsd(
    zones: Mapping[str, str],
    workdir: Path,
    host: str | None = None,
    port: int = 0,
    extra_hosts: tuple[str, ...] = (),
) -> Iterator[NsdServer]:
    """Start NSD serving `zones` ({origin: zone text}) and stop it when the block ends."""
    server = NsdServer(
        zones=zones,
        workdir=workdir,
        host=host or loopback_host(2),
        port=port,
        extra_hosts=extra_hosts,
    )
    with server:
        yield server
