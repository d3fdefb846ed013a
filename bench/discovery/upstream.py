"""The upstream DNS server: a real NSD serving `local.` inside the service namespace.

It plays the VPC resolver answering for a Cloud Map namespace: the service's A records with a
60 s TTL. Deregistering or registering a backend rewrites the zone file (new serial) and has NSD
reload it through its control socket, with no restart, so no query is lost. The same control
socket gives NSD's own counters (`stats_noreset`): how many queries the upstream received, the
figure the 1024 packets/s limit of the VPC resolver applies to.

The server itself is `tests.fakes.nsd.NsdServer` (the interop tests' NSD), with two changes:
remote control on a Unix socket, and the process started inside a network namespace.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fakes.nsd import NSD_BINARY, NsdServer

NSD_CONTROL = shutil.which("nsd-control") or "/usr/sbin/nsd-control"


def zone_text(name: str, addresses: list[str], ttl: int, serial: int) -> str:
    """The `local.` zone with `name` (a label of it) pointing at `addresses`.

    NSD puts the zone's NS record in the authority section of every answer, and caches keep an
    answer for the smallest TTL in it (CoreDNS and the sidecar do): the NS record gets the
    service's TTL so that the answer lives as long as its A records say."""
    return "\n".join(
        [
            "$ORIGIN local.",
            f"$TTL {ttl}",
            f"@ 30 IN SOA ns.local. hostmaster.local. {serial} 3600 600 86400 30",
            f"@ {ttl} IN NS ns.local.",
            f"ns {ttl} IN A 127.0.0.1",
            *(f"{name} {ttl} IN A {address}" for address in addresses),
            "",
        ]
    )


@dataclass
class NamespacedNsd(NsdServer):
    """NSD on host:port inside network namespace `netns`, with a control socket."""

    netns: str = ""
    label: str = "resource-server"
    ttl: int = 60
    serial: int = 1

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nsd.conf"

    @property
    def zone_path(self) -> Path:
        return self.workdir / "zone0.zone"  # NsdServer names the first zone's file so

    def _write_config(self) -> Path:
        conf = super()._write_config()
        text = conf.read_text()
        control = f'  control-enable: yes\n  control-interface: "{self.workdir / "nsd.ctl"}"\n'
        if "  control-enable: no\n" not in text:
            raise RuntimeError(f"unexpected NSD configuration from NsdServer: {conf}")
        conf.write_text(text.replace("  control-enable: no\n", control))
        return conf

    def control(self, *command: str) -> str:
        proc = subprocess.run(
            [NSD_CONTROL, "-c", str(self.conf_path), *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nsd-control {' '.join(command)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def start(self, timeout: float = 10.0) -> NamespacedNsd:
        conf = self._write_config()
        stderr = (self.workdir / "nsd.stderr").open("wb")
        with stderr:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, NSD_BINARY, "-d", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nsd exited with {self.proc.returncode}: {self.log_text()}")
            try:
                self.control("status")
                return self
            except RuntimeError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
            time.sleep(0.05)

    def set_addresses(self, addresses: list[str]) -> None:
        """Serve `addresses` from now on (a new serial, reloaded without a restart)."""
        self.serial += 1
        self.zone_path.write_text(zone_text(self.label, addresses, self.ttl, self.serial))
        self.control("reload", "local.")

    def stats(self) -> dict[str, int]:
        """NSD's counters since it started (num.queries, num.rcode.NOERROR, num.type.A...)."""
        out: dict[str, int] = {}
        for line in self.control("stats_noreset").splitlines():
            key, _, value = line.partition("=")
            if value.isdigit():
                out[key] = int(value)
        return out


def start_nsd(
    netns: str, workdir: Path, host: str, label: str, addresses: list[str], ttl: int
) -> NamespacedNsd:
    workdir.mkdir(parents=True, exist_ok=True)
    server = NamespacedNsd(
        zones={"local.": zone_text(label, addresses, ttl, 1)},
        workdir=workdir,
        host=host,
        port=53,
        netns=netns,
        label=label,
        ttl=ttl,
    )
    return server.start()
