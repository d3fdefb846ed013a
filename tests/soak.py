"""The soak test (`make soak`, not in CI): minutes of mixed valid and hostile traffic at a few
thousand queries per second against a sidecar in front of NSD, everything on loopback.

    python -m tests.soak --seconds 600 --qps 3000

Traffic, per second: `qps` datagrams, `hostile` of them (a share) from the hostile streams of
tests/fakes/hostile_traffic.py (malformed queries, random bytes, mutations, misses for random
names), the rest valid queries for names NSD serves, each checked against the zone; plus a few
junk TCP streams and valid TCP queries. Every 5 s the sidecar's RSS is sampled.

Passes (exit 0) when at the end the process is alive, its peak RSS stayed under `--rss-limit`,
no valid query got a wrong answer, at most 1% of them went unanswered, the log holds no
traceback, and a last query over UDP and over TCP is answered correctly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.fakes.hostile_traffic import hostile_datagrams, junk_tcp_stream
from tests.fakes.nsd import free_port, loopback_host, running_nsd

ZONE = "\n".join(
    [
        "$ORIGIN local.",
        "$TTL 30",
        "@ 30 IN SOA ns.local. hostmaster.local. 1 3600 600 86400 5",
        "@ 30 IN NS ns.local.",
        "ns 30 IN A 127.0.0.1",
        "resource-server 5 IN A 10.0.0.1",
        "resource-server 5 IN A 10.0.0.2",
        "resource-server 5 IN AAAA 2001:db8::1",
        'resource-server 30 IN TXT "soak"',
        "alias 10 IN CNAME resource-server.local.",
        *(f"big 20 IN A 10.0.1.{i}" for i in range(1, 41)),
        *(f"host{i} 3 IN A 10.0.2.{i}" for i in range(1, 201)),
        "",
    ]
)

# (name, type) -> the answer's rdata texts ([] for NXDOMAIN)
EXPECTED: dict[tuple[str, str], list[str]] = {
    ("resource-server.local.", "A"): ["10.0.0.1", "10.0.0.2"],
    ("resource-server.local.", "AAAA"): ["2001:db8::1"],
    ("resource-server.local.", "TXT"): ['"soak"'],
    ("alias.local.", "A"): ["10.0.0.1", "10.0.0.2", "resource-server.local."],
    ("big.local.", "A"): [f"10.0.1.{i}" for i in range(1, 41)],
    ("missing.local.", "A"): [],
    **{(f"host{i}.local.", "A"): [f"10.0.2.{i}"] for i in range(1, 201)},
}


@dataclass
class Tally:
    sent: int = 0
    correct: int = 0
    wrong: int = 0
    hostile: int = 0
    tcp_ok: int = 0
    tcp_bad: int = 0
    junk_streams: int = 0
    rss: list[float] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def answer_texts(reply: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def check(reply: dns.message.Message, key: tuple[str, str]) -> bool:
    expected = sorted(EXPECTED[key])
    if not expected:
        return reply.rcode() == dns.rcode.NXDOMAIN
    if reply.flags & dns.flags.TC:  # truncated for a plain client: correct, asks over TCP
        return reply.rcode() == dns.rcode.NOERROR
    return reply.rcode() == dns.rcode.NOERROR and answer_texts(reply) == expected


def metrics_summary(url: str) -> str:
    """The dropped and response counters, one line."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
    except OSError as exc:
        return f"metrics unavailable: {exc}"
    wanted = ("dns_sidecar_dropped_total", "dns_sidecar_responses_total")
    lines = [
        line.replace("dns_sidecar_", "")
        for line in text.splitlines()
        if line.startswith(wanted) and not line.endswith(" 0.0")
    ]
    return "; ".join(lines)


def start_sidecar(
    host: str, port: int, metrics_port: int, upstream: str, log: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "--listen",
        f"{host}:{port}",
        "--upstream",
        upstream,  # never the host's resolver
        "--metrics-listen",
        f"{host}:{metrics_port}",
        "--log-format",
        "text",
        "--drain-seconds",
        "0",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNS_SIDECAR_")}
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=env)
    query = dns.message.make_query("id.server.", "TXT", "CH")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            dns.query.udp(query, host, port=port, timeout=0.3)
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the sidecar did not start:\n{log.read_text()}")


def run(seconds: float, qps: int, hostile_share: float, seed: int, tally: Tally) -> int:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    keys = list(EXPECTED)
    with running_nsd({"local.": ZONE}, work / "nsd") as nsd:
        host = loopback_host(1)
        port = free_port(host)
        log = work / "sidecar.log"
        metrics_port = free_port(host)
        proc = start_sidecar(host, port, metrics_port, nsd.address, log, ARGS.sidecar_arg)
        target = (host, port)
        hostile = hostile_datagrams(rng)
        sel = selectors.DefaultSelector()
        clients = []  # valid queries; their replies are checked
        attackers = []  # hostile datagrams, from other addresses; replies are not read
        for i in range(4):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.0.{40 + i}", 0))
            sock.setblocking(False)
            if i % 2:
                attackers.append(sock)
            else:
                sel.register(sock, selectors.EVENT_READ)
                clients.append(sock)
        # Each valid query is a template with a fresh ID spliced in: the client must not be
        # what limits the rate.
        templates = [
            (key, dns.message.make_query(key[0], key[1], use_edns=edns).to_wire())
            for key in keys
            for edns in (False, True)
        ]
        next_id = [0] * len(clients)
        judged: dict[tuple[tuple[str, str], bytes], bool] = {}
        outstanding: dict[tuple[int, int], tuple[tuple[str, str], float]] = {}
        lost = 0
        started = time.monotonic()
        next_rss = started
        next_tcp = started
        tick = 0.02
        per_tick = max(1, round(qps * tick))
        try:
            while time.monotonic() - started < seconds:
                now = time.monotonic()
                due = min(int((now - started) * qps) - tally.sent - tally.hostile, 4 * per_tick)
                for _ in range(due):
                    if rng.random() < hostile_share:
                        sock = rng.choice(attackers)
                        data = next(hostile)
                        tally.hostile += 1
                    else:
                        index = rng.randrange(len(clients))
                        sock = clients[index]
                        key, template = rng.choice(templates)
                        qid = next_id[index] = (next_id[index] + 1) & 0xFFFF
                        data = qid.to_bytes(2, "big") + template[2:]
                        outstanding[(index, qid)] = (key, now)
                        tally.sent += 1
                    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                        sock.sendto(data, target)
                for selected, _ in sel.select(timeout=0):
                    sock = selected.fileobj
                    assert isinstance(sock, socket.socket)
                    index = clients.index(sock)
                    while True:
                        try:
                            reply_data = sock.recv(65535)
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                        qid = int.from_bytes(reply_data[:2], "big")
                        pending = outstanding.pop((index, qid), None)
                        if pending is None:
                            continue
                        # The same bytes after the ID (same TTL second) were judged before:
                        # dnspython's parser must not be what limits the rate.
                        memo_key = (pending[0], reply_data[2:])
                        verdict = judged.get(memo_key)
                        if verdict is None:
                            try:
                                reply = dns.message.from_wire(reply_data)
                                verdict = check(reply, pending[0])
                            except Exception as exc:
                                reply, verdict = exc, False  # type: ignore[assignment]
                            if len(judged) > 20_000:
                                judged.clear()
                            judged[memo_key] = verdict
                            if not verdict and len(tally.wrong_examples) < 5:
                                tally.wrong_examples.append(f"{pending[0]}: {reply}")
                        if verdict:
                            tally.correct += 1
                        else:
                            tally.wrong += 1
                for qkey, (_key, sent_at) in list(outstanding.items()):
                    if now - sent_at > 3.0:
                        del outstanding[qkey]
                        lost += 1
                if now >= next_tcp:
                    next_tcp = now + 0.25
                    tcp_round(rng, target, keys, tally)
                if now >= next_rss:
                    next_rss = now + 5.0
                    tally.rss.append(rss_mb(proc.pid))
                    if proc.poll() is not None:
                        break
                sleep = tick - (time.monotonic() - now)
                if sleep > 0:
                    time.sleep(sleep)
            time.sleep(1.0)
            lost += len(outstanding)
            alive = proc.poll() is None
            final_ok = alive and final_check(host, port)
            counters = metrics_summary(f"http://{host}:{metrics_port}/metrics")
            tally.rss.append(rss_mb(proc.pid) if alive else 0.0)
        finally:
            for sock in clients + attackers:
                sock.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text(errors="replace")
    elapsed = time.monotonic() - started
    peak = max(tally.rss)
    print(
        f"soak: {elapsed:.0f}s, {tally.sent + tally.hostile} datagrams "
        f"({(tally.sent + tally.hostile) / elapsed:.0f}/s), {tally.hostile} hostile; valid "
        f"{tally.sent}: {tally.correct} correct, {tally.wrong} wrong, {lost} unanswered; "
        f"TCP {tally.tcp_ok} ok, {tally.tcp_bad} bad, {tally.junk_streams} junk streams; "
        f"RSS first {tally.rss[0]:.1f} MB, peak {peak:.1f} MB, last {tally.rss[-1]:.1f} MB; "
        f"alive {alive}, final answers {'ok' if final_ok else 'WRONG'}"
    )
    print(f"sidecar counters: {counters}")
    every = max(1, len(tally.rss) // 12)
    print("RSS every", 5 * every, "s:", " ".join(f"{mb:.0f}" for mb in tally.rss[::every]))
    for example in tally.wrong_examples:
        print("wrong:", example)
    problems = []
    if not alive or not final_ok:
        problems.append("the sidecar died or answered the last queries wrong")
    if peak >= ARGS.rss_limit:
        problems.append(f"peak RSS {peak:.1f} MB >= {ARGS.rss_limit} MB")
    if tally.wrong:
        problems.append(f"{tally.wrong} wrong answers")
    if lost > 0.01 * max(tally.sent, 1):
        problems.append(f"{lost} of {tally.sent} valid queries unanswered")
    if tally.tcp_bad:
        problems.append(f"{tally.tcp_bad} TCP queries failed")
    if "Traceback" in text:
        problems.append("a traceback in the log: " + text[text.index("Traceback") :][:2000])
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


def tcp_round(
    rng: random.Random, target: tuple[str, int], keys: list[tuple[str, str]], tally: Tally
) -> None:
    """One valid TCP query, checked, and one junk stream that hangs up at once."""
    key = rng.choice(keys)
    try:
        reply = dns.query.tcp(
            dns.message.make_query(key[0], key[1]), target[0], port=target[1], timeout=3
        )
        if check(reply, key):
            tally.tcp_ok += 1
        else:
            tally.tcp_bad += 1
    except Exception:
        tally.tcp_bad += 1
    with contextlib.suppress(OSError), socket.create_connection(target, timeout=1) as conn:
        conn.sendall(junk_tcp_stream(rng))
        tally.junk_streams += 1


def final_check(host: str, port: int) -> bool:
    key = ("resource-server.local.", "A")
    query = dns.message.make_query(*key)
    try:
        udp = dns.query.udp(query, host, port=port, timeout=3)
        tcp = dns.query.tcp(query, host, port=port, timeout=3)
    except Exception:
        return False
    return check(udp, key) and check(tcp, key)


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--qps", type=int, default=3000, help="datagrams per second, all kinds")
    parser.add_argument("--hostile", type=float, default=0.3, help="share of hostile datagrams")
    parser.add_argument("--rss-limit", type=float, default=150.0, help="MB")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        help="a flag passed on to the sidecar (repeat: --sidecar-arg=--cache-max-bytes=...)",
    )
    ARGS = parser.parse_args()
    return run(ARGS.seconds, ARGS.qps, ARGS.hostile, ARGS.seed, Tally())


ARGS: argparse.Namespace

if __name__ == "__main__":
    raise SystemExit(main())
