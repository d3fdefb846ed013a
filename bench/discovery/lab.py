"""Network namespaces, their resolv.conf files and the processes of one run; `close()` undoes
everything it made, whatever state the run stopped in.

Each setup gets two namespaces joined by a veth pair and reaching nothing else:
- the task namespace (the client task): CLIENT_ADDR/24 on its veth, lo up, the DNS server under
  test on 127.0.0.1:53 (or none), the application processes, and its own resolv.conf
  (/etc/netns/NAME/resolv.conf, which `ip netns exec` mounts over /etc/resolv.conf);
- the service namespace: the backends' addresses and UPSTREAM_ADDR on its veth, the backends
  and NSD.
Every setup uses the same addresses: the namespaces keep them apart, and glibc sees the same
subnet layout in each.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.discovery.scenario import BACKEND_ADDRS, CLIENT_ADDR, SUBNET_PREFIX, UPSTREAM_ADDR

REPO_ROOT = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/etc/netns")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def check(*argv: str) -> None:
    proc = run(*argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def clean_env() -> dict[str, str]:
    """The environment for our processes: nothing that could point a sidecar elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DNS_SIDECAR_") and k != "ECS_CONTAINER_METADATA_URI_V4"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def netns_problem() -> str | None:
    """None when the host can run the benchmark, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, /etc/netns)"
    if platform.libc_ver()[0] != "glibc":
        return "needs a glibc Python: the point is glibc's getaddrinfo"
    if run("ip", "-V").returncode != 0:
        return "needs iproute2 (`ip`)"
    return None


@dataclass
class Pair:
    task: str  # namespace of the client task
    service: str  # namespace of the backends and the upstream


class Lab:
    def __init__(self, workdir: Path, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.netns_files: list[Path] = []
        self.netns_dirs: list[Path] = []
        self.netns_root_made = False

    # --- namespaces ---------------------------------------------------------------------------

    def pair(self, key: str, nameserver: str) -> Pair:
        """Two namespaces for setup `key`; the task's resolv.conf names `nameserver`."""
        pair = Pair(f"dscb{self.tag}-{key}-t", f"dscb{self.tag}-{key}-s")
        for ns in (pair.task, pair.service):
            check("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            check("ip", "-n", ns, "link", "set", "lo", "up")
        t, s = pair.task, pair.service
        check("ip", "-n", t, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", s)
        check("ip", "-n", t, "addr", "add", f"{CLIENT_ADDR}/{SUBNET_PREFIX}", "dev", "v0")
        for address in (UPSTREAM_ADDR, *BACKEND_ADDRS):
            check("ip", "-n", s, "addr", "add", f"{address}/{SUBNET_PREFIX}", "dev", "v1")
        check("ip", "-n", t, "link", "set", "v0", "up")
        check("ip", "-n", s, "link", "set", "v1", "up")
        self._resolv_conf(t, nameserver)
        return pair

    def _resolv_conf(self, ns: str, nameserver: str) -> None:
        if not NETNS_DIR.exists():
            NETNS_DIR.mkdir()
            self.netns_root_made = True
        directory = NETNS_DIR / ns
        directory.mkdir()
        self.netns_dirs.append(directory)
        resolv = directory / "resolv.conf"
        self.netns_files.append(resolv)
        resolv.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:2\n")

    # --- processes ----------------------------------------------------------------------------

    def spawn(
        self,
        ns: str,
        name: str,
        *argv: str,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        """`argv` inside `ns` (`ip netns exec` execs it: the Popen's pid is the program's);
        stderr (and stdout unless piped) to WORKDIR/NAME.log."""
        log = (self.workdir / f"{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=stdin,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                bufsize=0,
                cwd=REPO_ROOT,
                env=clean_env(),
            )
        self.procs.append(proc)
        return proc

    def python(self, ns: str, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        """`python -m module args` inside `ns`, driven over unbuffered stdin/stdout pipes."""
        return self.spawn(
            ns,
            name,
            sys.executable,
            "-m",
            module,
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- tear down ----------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for ns in self.namespaces:
            # anything still in a namespace of ours was started by this run (e.g. a child
            # of a program that did not stop): end it by pid before the namespace goes
            pids = run("ip", "netns", "pids", ns).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns)
        self.namespaces.clear()
        for path in self.netns_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for directory in self.netns_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if self.netns_root_made:
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; closes our ends of its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
