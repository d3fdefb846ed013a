"""glibc's getaddrinfo through the sidecar, run inside fresh namespaces by
tests/integration/test_interop.py (never on its own):

    unshare --net --mount --propagation private -- \
        python -m tests.fakes.getaddrinfo_lab WORKDIR ORIGIN ZONEFILE NAME...

glibc asks the nameserver of /etc/resolv.conf on port 53 and no other, so the lab needs its own
network namespace (only its loopback: nothing sent in it can leave) and its own mount namespace,
where WORKDIR/resolv.conf ("nameserver 127.0.0.1") is bind-mounted over /etc/resolv.conf; the
machine's own file is never touched. NSD serves ZONEFILE on 127.0.0.1:5300, the sidecar listens
on 127.0.0.1:53 in front of it. For each NAME, getaddrinfo(NAME, 80, SOCK_STREAM) with
AI_CANONNAME; prints {NAME: {"addresses": [...], "canonname": str} | {"error": gaierror name}}
as one JSON object. The test makes the assertions.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query

from tests.fakes.nsd import running_nsd

NSD_PORT = 5300
GAI_ERRORS = {
    getattr(socket, name): name for name in dir(socket) if name.startswith("EAI_")
}  # fmt: skip


def _wait_answering(host: str, port: int, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            dns.query.udp(dns.message.make_query(name, "SOA"), host, port=port, timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def lookup(name: str) -> dict[str, Any]:
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME)
    except socket.gaierror as exc:
        return {"error": GAI_ERRORS.get(exc.errno, str(exc.errno))}
    return {
        "addresses": sorted({str(info[4][0]) for info in infos}),
        "canonname": infos[0][3],
    }


def main(workdir: Path, origin: str, zone_file: Path, names: list[str]) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    zones = {origin: zone_file.read_text()}
    with running_nsd(zones, workdir / "nsd", host="127.0.0.1", port=NSD_PORT):
        log = (workdir / "sidecar.log").open("wb")
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--listen", "127.0.0.1:53", "--upstream",
             f"127.0.0.1:{NSD_PORT}", "--metrics-listen", "127.0.0.1:9153", "--drain-seconds",
             "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            _wait_answering("127.0.0.1", 53, origin)
            return {name: lookup(name) for name in names}
        finally:
            sidecar.terminate()
            sidecar.wait(timeout=10)
            log.close()


if __name__ == "__main__":
    workdir, origin, zone_file, *names = sys.argv[1:]
    (Path(workdir) / "nsd").mkdir(exist_ok=True)
    print(json.dumps(main(Path(workdir), origin, Path(zone_file), names)))
