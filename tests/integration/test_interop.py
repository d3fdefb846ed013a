"""Real clients against the sidecar, with NSD as the upstream: dig, kdig (Knot), drill (ldns),
dnspython, glibc's getaddrinfo and, where `node` is installed, Node's c-ares resolver.

Each client asks the same questions (A, AAAA, SRV, MX, a chain of two CNAMEs, NXDOMAIN, and a
TXT set too big for a UDP reply, asked over TCP), all with 0x20 mixed-case names, and checks
the answers it parsed itself. The sidecar must keep the case of the question in its reply
(clients that randomise case compare it); kdig lower-cases names before it sends them, so
for kdig only the answers are compared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer, running_nsd
from tests.integration.conftest import REPO_ROOT, Sidecar, StartSidecar, clean_env

pytestmark = pytest.mark.integration

ORIGIN = "interop.test."
TXT_STRINGS = [f"{i:02d}-" + "t" * 197 for i in range(12)]  # about 2.4 kB: over any UDP size
ZONE = "\n".join(
    [
        f"$ORIGIN {ORIGIN}",
        "$TTL 300",
        "@ 300 IN SOA ns hostmaster 1 3600 600 86400 30",
        "@ 300 IN NS ns",
        "@ 300 IN MX 10 mail",
        "ns 300 IN A 127.0.0.1",
        "mail 300 IN A 192.0.2.25",
        "www 300 IN A 192.0.2.1",
        "www 300 IN A 192.0.2.2",
        "www 300 IN AAAA 2001:db8::1",
        "_http._tcp 300 IN SRV 10 5 8080 www",
        "alias 300 IN CNAME hop",
        "hop 300 IN CNAME www",
        *(f'big 300 IN TXT "{text}"' for text in TXT_STRINGS),
        "",
    ]
)
WWW_A = {("A", "192.0.2.1"), ("A", "192.0.2.2")}
CHAIN = {("CNAME", "hop.interop.test."), ("CNAME", "www.interop.test.")}


@dataclass(frozen=True)
class Case:
    """One question, in mixed case, and the answer section every client must see."""

    name: str
    rtype: str
    status: str
    answer: frozenset[tuple[str, str]]
    tcp: bool = False


CASES = [
    Case("WwW.InTeRoP.TeSt.", "A", "NOERROR", frozenset(WWW_A)),
    Case("www.INTEROP.test.", "A", "NOERROR", frozenset(WWW_A)),  # a cache hit, other case
    Case("wWw.iNtErOp.tEsT.", "AAAA", "NOERROR", frozenset({("AAAA", "2001:db8::1")})),
    Case(
        "_HtTp._TcP.InTeRoP.tEsT.",
        "SRV",
        "NOERROR",
        frozenset({("SRV", "10 5 8080 www.interop.test.")}),
    ),
    Case("InTeRoP.TeSt.", "MX", "NOERROR", frozenset({("MX", "10 mail.interop.test.")})),
    Case("AlIaS.InTeRoP.TeSt.", "A", "NOERROR", frozenset(CHAIN | WWW_A)),
    Case("NoSuChNaMe.InTeRoP.TeSt.", "A", "NXDOMAIN", frozenset()),
    Case(
        "BiG.InTeRoP.TeSt.",
        "TXT",
        "NOERROR",
        frozenset(("TXT", f'"{text}"') for text in TXT_STRINGS),
        tcp=True,
    ),
]


@pytest.fixture(scope="module")
def nsd_interop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    with running_nsd({ORIGIN: ZONE}, tmp_path_factory.mktemp("nsd-interop")) as server:
        yield server


@pytest.fixture(scope="module")
def interop_sidecar(module_sidecar: StartSidecar, nsd_interop: NsdServer) -> Sidecar:
    return module_sidecar("--upstream", nsd_interop.address)


# --- the command-line clients: one parser for the presentation format they all print ----------


def record(rtype: str, rdata: str) -> tuple[str, str]:
    """(type, rdata) as compared: names in rdata lower-cased (the reply may carry the
    question's case there, through compression), TXT kept as it is."""
    rdata = " ".join(rdata.split())
    return (rtype, rdata if rtype == "TXT" else rdata.lower())


@dataclass
class Printed:
    status: str | None
    question: str | None
    answer: set[tuple[str, str]]


_STATUS = re.compile(r"->>HEADER<<- opcode: \w+[,;] (?:status|rcode): (\w+)")


def parse_printed(output: str) -> Printed:
    """dig, kdig and drill print a header line, then `;; X SECTION:` blocks of records."""
    status = question = None
    answer: set[tuple[str, str]] = set()
    section = None
    for line in output.splitlines():
        if m := _STATUS.search(line):
            status = m.group(1)
        elif line.startswith(";; ") and line.endswith(" SECTION:"):
            section = line[3 : -len(" SECTION:")]
        elif not line.strip():
            section = None
        elif section == "QUESTION":
            question = line.lstrip(";").split()[0]
        elif section == "ANSWER" and not line.startswith(";"):
            _name, _ttl, _class, rtype, rdata = line.split(None, 4)
            answer.add(record(rtype, rdata))
    return Printed(status, question, answer)


def dig_argv(sc: Sidecar, case: Case) -> list[str]:
    return [
        "dig", f"@{sc.addr}", "-p", str(sc.port), case.name, case.rtype, "+tries=1", "+time=3",
        *(["+tcp"] if case.tcp else []),
    ]  # fmt: skip


def kdig_argv(sc: Sidecar, case: Case) -> list[str]:
    return [
        "kdig", f"@{sc.addr}", "-p", str(sc.port), case.name, case.rtype, "+retry=0",
        "+timeout=3", *(["+tcp"] if case.tcp else []),
    ]  # fmt: skip


def drill_argv(sc: Sidecar, case: Case) -> list[str]:
    return [
        "drill", *(["-t"] if case.tcp else []), "-p", str(sc.port), f"@{sc.addr}", case.name,
        case.rtype,
    ]  # fmt: skip


CLIENTS = {"dig": dig_argv, "kdig": kdig_argv, "drill": drill_argv}
CASE_SENSITIVE = {"dig": True, "kdig": False, "drill": True}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rtype}-{c.name}")
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_command_line_clients_parse_what_they_asked_for(
    interop_sidecar: Sidecar, client: str, case: Case
) -> None:
    argv = CLIENTS[client](interop_sidecar, case)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    printed = parse_printed(proc.stdout)
    assert printed.status == case.status, proc.stdout + proc.stderr
    expected = case.name if CASE_SENSITIVE[client] else case.name.lower()
    assert printed.question == expected, proc.stdout
    assert printed.answer == case.answer, proc.stdout


# --- dnspython --------------------------------------------------------------------------------


def _normalised(reply: dns.message.Message) -> set[tuple[str, str]]:
    return {
        record(dns.rdatatype.to_text(rrset.rdtype), rdata.to_text())
        for rrset in reply.answer
        for rdata in rrset
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rtype}-{c.name}")
def test_dnspython_gets_the_answers_with_the_case_of_its_question(
    interop_sidecar: Sidecar, case: Case
) -> None:
    query = dns.message.make_query(case.name, case.rtype, use_edns=0)
    ask = dns.query.tcp if case.tcp else dns.query.udp
    reply = ask(query, interop_sidecar.addr, port=interop_sidecar.port, timeout=5)
    assert dns.rcode.to_text(reply.rcode()) == case.status
    assert [q.name.to_text() for q in reply.question] == [case.name]
    assert _normalised(reply) == case.answer


def test_a_txt_set_too_big_for_udp_comes_truncated_then_whole_over_tcp(
    interop_sidecar: Sidecar,
) -> None:
    """What every client above relies on when it is not told to use TCP."""
    query = dns.message.make_query("BiG.InTeRoP.TeSt.", "TXT", use_edns=0, payload=1232)
    reply, used_tcp = dns.query.udp_with_fallback(
        query, interop_sidecar.addr, port=interop_sidecar.port, timeout=5
    )
    assert used_tcp
    assert len(reply.answer[0]) == len(TXT_STRINGS)


# --- glibc getaddrinfo, in its own namespaces -------------------------------------------------


def test_getaddrinfo_through_the_sidecar(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare --net --mount (and port 53 inside the namespace)")
    zone_file = tmp_path / "interop.zone"
    zone_file.write_text(ZONE)
    names = ["WwW.InTeRoP.TeSt", "AlIaS.InTeRoP.TeSt", "NoSuChNaMe.InTeRoP.TeSt"]
    lab = [sys.executable, "-m", "tests.fakes.getaddrinfo_lab", str(tmp_path), ORIGIN]
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "--", *lab, str(zone_file),
         *names],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
        env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + _read(tmp_path / "sidecar.log")
    seen = json.loads(proc.stdout)
    www = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
    assert seen["WwW.InTeRoP.TeSt"]["addresses"] == www
    assert seen["AlIaS.InTeRoP.TeSt"]["addresses"] == www
    assert seen["AlIaS.InTeRoP.TeSt"]["canonname"].lower() == "www.interop.test"  # end of chain
    assert seen["NoSuChNaMe.InTeRoP.TeSt"] == {"error": "EAI_NONAME"}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# --- Node's c-ares ----------------------------------------------------------------------------

NODE_SCRIPT = r"""
const { Resolver } = require("node:dns").promises;
const [server, ...names] = process.argv.slice(1);
const resolver = new Resolver({ timeout: 3000, tries: 1 });
resolver.setServers([server]);
const ask = {
  A: (n) => resolver.resolve4(n), AAAA: (n) => resolver.resolve6(n),
  SRV: (n) => resolver.resolveSrv(n), MX: (n) => resolver.resolveMx(n),
  TXT: (n) => resolver.resolveTxt(n), CNAME: (n) => resolver.resolveCname(n),
};
(async () => {
  const out = {};
  for (const pair of names) {
    const [name, type] = pair.split("/");
    try { out[pair] = { answer: await ask[type](name) }; }
    catch (e) { out[pair] = { error: e.code }; }
  }
  console.log(JSON.stringify(out));
})();
"""


def test_node_c_ares_resolver(interop_sidecar: Sidecar) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    questions = [
        "WwW.InTeRoP.TeSt/A",
        "wWw.iNtErOp.tEsT/AAAA",
        "_HtTp._TcP.InTeRoP.tEsT/SRV",
        "InTeRoP.TeSt/MX",
        "AlIaS.InTeRoP.TeSt/A",
        "AlIaS.InTeRoP.TeSt/CNAME",
        "NoSuChNaMe.InTeRoP.TeSt/A",
        "BiG.InTeRoP.TeSt/TXT",  # c-ares retries over TCP when the UDP reply is truncated
    ]
    server = f"{interop_sidecar.addr}:{interop_sidecar.port}"
    proc = subprocess.run(
        [node, "-e", NODE_SCRIPT, server, *questions],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert sorted(seen["WwW.InTeRoP.TeSt/A"]["answer"]) == ["192.0.2.1", "192.0.2.2"]
    assert seen["wWw.iNtErOp.tEsT/AAAA"] == {"answer": ["2001:db8::1"]}
    assert seen["_HtTp._TcP.InTeRoP.tEsT/SRV"] == {
        "answer": [{"name": "www.interop.test", "port": 8080, "priority": 10, "weight": 5}]
    }
    mx = {"exchange": "mail.interop.test", "priority": 10}
    assert seen["InTeRoP.TeSt/MX"] == {"answer": [mx]}
    assert sorted(seen["AlIaS.InTeRoP.TeSt/A"]["answer"]) == ["192.0.2.1", "192.0.2.2"]
    assert seen["AlIaS.InTeRoP.TeSt/CNAME"] == {"answer": ["hop.interop.test"]}
    assert seen["NoSuChNaMe.InTeRoP.TeSt/A"] == {"error": "ENOTFOUND"}
    assert sorted(chunk for [chunk] in seen["BiG.InTeRoP.TeSt/TXT"]["answer"]) == TXT_STRINGS
