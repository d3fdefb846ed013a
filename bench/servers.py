"""Start and stop the servers of the benchmark on loopback: NSD (the authoritative upstream),
dnsmasq, Unbound and the sidecar, each configured alike (see bench/README.md, "Fairness").

Every server runs in the foreground as a child of the benchmark, in its own work directory,
pinned with `taskset`, and is stopped with SIGTERM (SIGKILL after 5 s). Nothing here reads
/etc/resolv.conf or talks to anything outside 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.image import image_bin
from bench.zones import hit_name

REPO = Path(__file__).resolve().parent.parent


def image_python_env() -> dict[str, str]:
    """The PYTHON* settings the Dockerfile's ENV gives the sidecar (PYTHONOPTIMIZE=2), so that
    the benchmark runs it as the image does."""
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"\b(PYTHONOPTIMIZE)=(\S+)", text))


_warmed: set[str] = set()


def warm_bytecode(env: Mapping[str, str]) -> None:
    """`python -m sidecar.warm` of the image-like install (bench/image.py) with `env`, once
    per benchmark process: writes the bytecode cache for the sidecar's optimization level, as
    the image build does (not timed). Run from the virtualenv's directory, so that it is the
    installed copy that is imported, not this tree's."""
    key = env.get("PYTHONOPTIMIZE", "")
    if key in _warmed:
        return
    _warmed.add(key)
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    bin_dir = image_bin()
    subprocess.run(
        [str(bin_dir / "python"), "-m", "sidecar.warm"], env=env, cwd=bin_dir.parent, check=True
    )


PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, however it dies."""
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def free_port(host: str) -> int:
    """A port free on `host` for both UDP and TCP at the time of the call."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    raise
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def build_query(name: str, qtype: int = 1, qid: int = 0x4242, rd: bool = True) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0)
    qname = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".") if label)
    return header + qname + b"\x00" + struct.pack("!HH", qtype, 1)


def reply_rcode(msg: bytes) -> tuple[int, int, int]:
    """(id, rcode, answer count) of a reply; raises ValueError for anything not a reply."""
    if len(msg) < 12 or not msg[2] & 0x80:
        raise ValueError("not a DNS reply")
    qid, flags, _qd, an = struct.unpack_from("!HHHH", msg)
    return qid, flags & 0x0F, an


def ask(host: str, port: int, name: str, timeout: float = 0.2) -> tuple[int, int] | None:
    """(rcode, answer count) of one UDP query, or None when nothing answered in time.
    Connected, so a port nobody listens on yet answers at once (ICMP port unreachable, as
    ECONNREFUSED): a server starting up is seen within the caller's retry pause of its bind,
    not at the end of a timeout (unconnected, start-up was measured in `timeout` steps)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(build_query(name))
            data = s.recv(4096)
            _qid, rcode, an = reply_rcode(data)
        except (OSError, ValueError):
            return None
        return rcode, an


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                    out.extend(int(c) for c in children)
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` and its descendants, KiB (VmRSS)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Server:
    """One server process. Subclasses write its configuration and name its command line."""

    kind = "server"

    def __init__(self, label: str, host: str, workdir: Path, cpus: str | None) -> None:
        self.label = label
        self.host = host
        self.port = 0
        self.workdir = workdir
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """The process environment; None: the benchmark's own."""
        return None

    def configure(self) -> None:
        """Write config files into workdir (called after the port is chosen)."""

    def probe_name(self) -> str:
        """A name whose answer means 'serving' (for the start-up time)."""
        return hit_name(0)

    def start(self, timeout: float = 20.0) -> float:
        """Start the server; return the seconds from exec to its first NOERROR answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        self.configure()
        cmd = self.command()
        env = self.env()
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        with (self.workdir / "stderr.log").open("ab") as err:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                env=env,
                preexec_fn=_die_with_parent,
            )
        return self.wait_answer(timeout)

    def wait_answer(self, timeout: float) -> float:
        assert self.proc is not None
        deadline = self.started_at + timeout
        name = self.probe_name()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}: {self.stderr_tail()}"
                )
            got = ask(self.host, self.port, name, timeout=0.05)
            if got is not None and got[0] == 0 and got[1] > 0:
                return time.perf_counter() - self.started_at
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.label} did not answer {name}: {self.stderr_tail()}")
            time.sleep(0.002)

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def version(self) -> str:
        return ""


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


class Nsd(Server):
    """The authoritative upstream of every server: all zones, rate limiting off."""

    kind = "nsd"

    def __init__(
        self, host: str, workdir: Path, cpus: str | None, zones: Mapping[str, str]
    ) -> None:
        super().__init__("nsd", host, workdir, cpus)
        self.zones = zones

    def probe_name(self) -> str:
        return hit_name(0)

    def configure(self) -> None:
        d = self.workdir
        lines = [
            "server:",
            f'  ip-address: "{self.host}@{self.port}"',
            f"  port: {self.port}",
            "  do-ip6: no",
            '  username: ""',
            '  chroot: ""',
            '  database: ""',
            f'  zonesdir: "{d}"',
            f'  pidfile: "{d / "nsd.pid"}"',
            f'  xfrdfile: "{d / "xfrd.state"}"',
            f'  xfrdir: "{d}"',
            f'  zonelistfile: "{d / "zone.list"}"',
            f'  logfile: "{d / "nsd.log"}"',
            "  verbosity: 0",
            "  server-count: 1",
            "  hide-version: yes",
            "  minimal-responses: yes",
            "  rrl-ratelimit: 0",
            "  rrl-whitelist-ratelimit: 0",
            "  reuseport: no",
            "remote-control:",
            "  control-enable: no",
        ]
        for i, (origin, text) in enumerate(self.zones.items()):
            (d / f"zone{i}.zone").write_text(text)
            lines += ["zone:", f'  name: "{origin}."', f'  zonefile: "zone{i}.zone"']
        (d / "nsd.conf").write_text("\n".join(lines) + "\n")
        check = subprocess.run(
            ["nsd-checkconf", str(d / "nsd.conf")], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"nsd-checkconf: {check.stderr or check.stdout}")

    def command(self) -> list[str]:
        return [shutil.which("nsd") or "/usr/sbin/nsd", "-d", "-c", str(self.workdir / "nsd.conf")]

    def version(self) -> str:
        return _first_line(["nsd", "-v"])


class Dnsmasq(Server):
    kind = "dnsmasq"

    def __init__(
        self,
        label: str,
        host: str,
        workdir: Path,
        cpus: str | None,
        upstream: str,
        zone_upstreams: Mapping[str, str],
        cache_size: int,
    ) -> None:
        super().__init__(label, host, workdir, cpus)
        self.upstream = upstream
        self.zone_upstreams = zone_upstreams
        self.cache_size = cache_size

    def command(self) -> list[str]:
        def hp(address: str) -> str:
            host, port = address.rsplit(":", 1)
            return f"{host}#{port}"

        return [
            shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--user=root",
            "--group=root",
            "--pid-file=",
            f"--log-facility={self.workdir / 'dnsmasq.log'}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            f"--port={self.port}",
            f"--server={hp(self.upstream)}",
            *(f"--server=/{zone}/{hp(up)}" for zone, up in self.zone_upstreams.items()),
            f"--cache-size={self.cache_size}",
            "--dns-forward-max=1000",
        ]

    def version(self) -> str:
        return _first_line(["dnsmasq", "--version"])


class Unbound(Server):
    kind = "unbound"

    def __init__(
        self,
        label: str,
        host: str,
        workdir: Path,
        cpus: str | None,
        upstream: str,
        zone_upstreams: Mapping[str, str],
        local_zones: Sequence[str],
    ) -> None:
        super().__init__(label, host, workdir, cpus)
        self.upstream = upstream
        self.zone_upstreams = zone_upstreams
        self.local_zones = local_zones

    def configure(self) -> None:
        d = self.workdir

        def at(address: str) -> str:
            host, port = address.rsplit(":", 1)
            return f"{host}@{port}"

        lines = [
            "server:",
            f"  interface: {self.host}@{self.port}",
            f"  port: {self.port}",
            "  do-ip6: no",
            "  num-threads: 1",
            "  so-reuseport: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{d}"',
            f'  pidfile: "{d / "unbound.pid"}"',
            '  logfile: ""',
            "  use-syslog: no",
            "  verbosity: 0",
            "  log-queries: no",
            "  log-replies: no",
            "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no",
            '  module-config: "iterator"',
            "  prefetch: no",
            "  msg-cache-size: 256m",
            "  rrset-cache-size: 512m",
            "  key-cache-size: 1m",
            "  neg-cache-size: 16m",
            "  num-queries-per-thread: 1024",
            "  outgoing-range: 2048",
            "  qname-minimisation: no",
            "  statistics-interval: 0",
            *(f'  local-zone: "{z}." nodefault' for z in self.local_zones),
            *(f'  domain-insecure: "{z}."' for z in self.local_zones),
            "remote-control:",
            "  control-enable: no",
        ]
        for zone, up in self.zone_upstreams.items():
            lines += ["forward-zone:", f'  name: "{zone}."', f"  forward-addr: {at(up)}"]
        lines += ["forward-zone:", '  name: "."', f"  forward-addr: {at(self.upstream)}"]
        (d / "unbound.conf").write_text("\n".join(lines) + "\n")
        check = subprocess.run(
            ["unbound-checkconf", str(d / "unbound.conf")],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"unbound-checkconf: {check.stderr or check.stdout}")

    def command(self) -> list[str]:
        return [
            shutil.which("unbound") or "/usr/sbin/unbound",
            "-d",
            "-c",
            str(self.workdir / "unbound.conf"),
        ]

    def version(self) -> str:
        return _first_line(["unbound", "-V"])


_SIDECAR_HELP: list[str] = []


def sidecar_flags() -> str:
    """`dns-sidecar --help`, read once: which flags this version of the sidecar has."""
    if not _SIDECAR_HELP:
        done = subprocess.run(
            [str(image_bin() / "dns-sidecar"), "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        _SIDECAR_HELP.append(done.stdout)
    return _SIDECAR_HELP[0]


class Sidecar(Server):
    kind = "sidecar"

    def __init__(
        self,
        label: str,
        host: str,
        workdir: Path,
        cpus: str | None,
        upstream: str,
        zone_upstreams: Mapping[str, str],
        cache_entries: int,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(label, host, workdir, cpus)
        self.upstream = upstream
        self.zone_upstreams = zone_upstreams
        self.cache_entries = cache_entries
        self.extra = list(extra)
        self.metrics_port = 0

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        if self.metrics_port == 0:
            self.metrics_port = free_port(self.host)
        return [
            str(image_bin() / "dns-sidecar"),
            "--listen",
            self.address,
            "--upstream",
            self.upstream,
            *(a for zone, up in self.zone_upstreams.items() for a in ("--zone", f"{zone}={up}")),
            "--log-format",
            "json",
            "--log-level",
            "warning",
            "--metrics-listen",
            f"{self.host}:{self.metrics_port}",
            "--cache-max-entries",
            str(self.cache_entries),
            # A memory cap (when this version has one) large enough not to bind before the
            # entry count does: 8 KiB per entry.
            *(
                ["--cache-max-bytes", str(self.cache_entries * 8192)]
                if "--cache-max-bytes" in sidecar_flags()
                else []
            ),
            "--prefetch-percent",
            "0",
            *self.extra,
        ]

    def env(self) -> dict[str, str]:
        """As the image runs it: installed as the image installs it (bench/image.py), with the
        image's PYTHON* settings (image_python_env), its bytecode written beforehand. Without
        PYTHONPATH, which the toys' runs set to this tree (bench/ceiling.py): with it, the
        sidecar imported this tree's modules, compiled in place or not, not the installed."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(image_python_env())
        warm_bytecode(env)
        return env

    def version(self) -> str:
        return _first_line([str(image_bin() / "dns-sidecar"), "--version"])
