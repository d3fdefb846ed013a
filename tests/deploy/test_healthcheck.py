"""`dns-sidecar healthcheck`: the container health check of the task definitions.

It must pass while the upstream is unreachable or silent (ECS would otherwise kill healthy
caches when the VPC resolver has trouble), fail with one line when nothing answers, and never
take more than its 2 s. Every address is on loopback; the "upstream" is an address where
nothing listens, or a socket that never answers.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from dnslib import CLASS, QTYPE, DNSRecord

from sidecar import healthcheck
from sidecar.addresses import HostPort
from sidecar.errors import ConfigError
from tests.deploy.helpers import (
    SIDECAR,
    TASK_DEF,
    UNREACHABLE,
    container,
    container_argv,
    describe,
    environment,
    health_check_argv,
    load_json,
    process_env,
    run_health_check,
    running,
)
from tests.fakes.nsd import free_port, loopback_host

BLOCK = 16  # 127.0.16.x: the loopback addresses of these tests


# --- no sockets ---------------------------------------------------------------------------------


def test_the_query_is_id_server_ch_txt() -> None:
    record = DNSRecord.parse(healthcheck.query(0x1234))
    assert record.header.id == 0x1234
    assert str(record.q.qname) == "id.server."
    assert (record.q.qtype, record.q.qclass) == (QTYPE.TXT, CLASS.CH)
    assert record.header.qr == 0


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (None, HostPort("127.0.0.1", 53)),
        ("127.0.0.5:5353", HostPort("127.0.0.5", 5353)),
        ("0.0.0.0:53,[::1]:53", HostPort("127.0.0.1", 53)),
        ("[::]:5353", HostPort("::1", 5353)),
    ],
)
def test_address_from_the_sidecar_environment(listen: str | None, expected: HostPort) -> None:
    env = {} if listen is None else {"DNS_SIDECAR_LISTEN": listen}
    assert healthcheck.listen_address(env) == expected


def test_environment_beats_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text('listen = ["127.0.0.7:5300"]\n')
    assert healthcheck.listen_address({"DNS_SIDECAR_CONFIG": str(path)}) == HostPort(
        "127.0.0.7", 5300
    )
    env = {"DNS_SIDECAR_CONFIG": str(path), "DNS_SIDECAR_LISTEN": "127.0.0.8:5301"}
    assert healthcheck.listen_address(env) == HostPort("127.0.0.8", 5301)


def test_a_bad_environment_is_unhealthy_not_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError):
        healthcheck.listen_address({"DNS_SIDECAR_LISTN": "127.0.0.1:53"})
    assert healthcheck.main([], {"DNS_SIDECAR_LISTN": "127.0.0.1:53"}) == 1
    assert healthcheck.main(["--timeout", "0"], {}) == 1
    assert healthcheck.main(["--no-such-flag"], {}) == 1  # Docker reserves exit code 2
    err = capsys.readouterr().err
    assert "unhealthy: config error: DNS_SIDECAR_LISTN" in err


# --- fake servers on loopback -------------------------------------------------------------------

Replies = Callable[[bytes], list[bytes]]


@contextmanager
def udp_server(replies: Replies) -> Iterator[HostPort]:
    """A UDP socket on a fresh loopback address answering each datagram with replies(query)."""
    host = loopback_host(BLOCK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            for reply in replies(data):
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield HostPort(host, sock.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        sock.close()


def reply_to(query: bytes, *, rcode: int = 0, qid: int | None = None) -> bytes:
    record = DNSRecord.parse(query)
    reply = record.reply()
    reply.header.rcode = rcode
    if qid is not None:
        reply.header.id = qid
    return bytes(reply.pack())


@pytest.mark.integration
def test_nothing_listening_fails_at_once() -> None:
    address = HostPort(loopback_host(BLOCK), free_port())
    started = time.monotonic()
    healthy, line = healthcheck.check(address)
    assert not healthy
    assert line == f"unhealthy: nothing listens on {address} (connection refused)"
    assert time.monotonic() - started < 1.0


@pytest.mark.integration
def test_silence_fails_within_the_timeout() -> None:
    with udp_server(lambda _q: []) as address:
        started = time.monotonic()
        healthy, line = healthcheck.check(address)  # the default: 2 s in all
        elapsed = time.monotonic() - started
    assert not healthy
    assert line == f"unhealthy: no answer from {address} within 2 s"
    assert 1.9 <= elapsed <= 2.5


@pytest.mark.integration
def test_refused_is_unhealthy() -> None:
    with udp_server(lambda q: [reply_to(q, rcode=5)]) as address:
        healthy, line = healthcheck.check(address, 1.0)
    assert not healthy
    assert line == f"unhealthy: {address} answered id.server CH TXT with REFUSED"


@pytest.mark.integration
def test_replies_with_another_id_are_ignored() -> None:
    def wrong_then_right(query: bytes) -> list[bytes]:
        (qid,) = struct.unpack_from("!H", query)
        return [reply_to(query, qid=qid ^ 0xFFFF), reply_to(query)]

    with udp_server(wrong_then_right) as address:
        healthy, line = healthcheck.check(address, 1.0)
    assert healthy, line

    def only_wrong(query: bytes) -> list[bytes]:
        (qid,) = struct.unpack_from("!H", query)
        return [reply_to(query, qid=qid ^ 0xFFFF)]

    with udp_server(only_wrong) as address:
        healthy, line = healthcheck.check(address, 0.5)
    assert not healthy
    assert line.endswith("(1 replies with another ID ignored)")


# --- the task definition's own sidecar and health check -----------------------------------------


def task_environment(listen: str, metrics: str, upstream: str) -> dict[str, str]:
    """The sidecar container's environment from ecs-task-def.json, with its addresses moved.

    Overridden, and only these: the listen address (a loopback test address and port instead of
    127.0.0.1:53, which the host may be using and which needs privileges), the metrics
    address (0.0.0.0:9153 would listen on every interface and collide with other runs), and
    every upstream, global and per zone (169.254.169.253 is the VPC resolver: tests never send
    to anything off loopback; an unreachable loopback address plays the VPC resolver being down).
    """
    env = environment(container(load_json(TASK_DEF), SIDECAR))
    assert {"DNS_SIDECAR_LISTEN", "DNS_SIDECAR_UPSTREAMS", "DNS_SIDECAR_ZONES"} <= set(env)
    zones = [part.split("=", 1)[0] for part in env["DNS_SIDECAR_ZONES"].split(";") if part]
    env["DNS_SIDECAR_LISTEN"] = listen
    env["DNS_SIDECAR_METRICS_LISTEN"] = metrics
    env["DNS_SIDECAR_UPSTREAMS"] = upstream
    env["DNS_SIDECAR_ZONES"] = ";".join(f"{zone}={upstream}" for zone in zones)
    return env


def wait_healthy(argv: list[str], env: dict[str, str], timeout: float, within: float) -> float:
    """Run the health check every 0.2 s as Docker would until it passes; seconds it took."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < within:
        last = run_health_check(argv, env, timeout)
        assert last.seconds < timeout, f"{describe(argv)} took {last.seconds:.2f} s"
        if last.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"{describe(argv)} did not pass within {within} s; last: {last}")


@pytest.mark.integration
@pytest.mark.parametrize("upstream_kind", ["unreachable", "silent"])
def test_sidecar_passes_its_health_check_within_the_start_period(
    tmp_path: Path, upstream_kind: str
) -> None:
    sidecar = container(load_json(TASK_DEF), SIDECAR)
    check = sidecar["healthCheck"]
    host = loopback_host(BLOCK)
    listen = f"{host}:{free_port(host)}"
    metrics = f"{host}:{free_port(host)}"
    # A silent upstream: a bound UDP socket that reads nothing and never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((loopback_host(BLOCK), 0))
        silent_address = "{}:{}".format(*silent.getsockname())
        upstream = UNREACHABLE if upstream_kind == "unreachable" else silent_address
        env = process_env(task_environment(listen, metrics, upstream))
        argv = container_argv(sidecar)
        assert argv == ["dns-sidecar", "run"]
        with running(argv, env, tmp_path / "sidecar.log") as proc:
            seconds = wait_healthy(
                health_check_argv(sidecar), env, check["timeout"], check["startPeriod"]
            )
            assert proc.proc.poll() is None, proc.log()
            print(f"healthy after {seconds:.2f} s (startPeriod {check['startPeriod']} s)")
            # The upstream really is down: a name that needs it gets SERVFAIL...
            query = dns.message.make_query("www.example.com.", "A")
            addr, port = listen.rsplit(":", 1)
            if upstream_kind == "unreachable":
                answer = dns.query.udp(query, addr, port=int(port), timeout=6)
                assert answer.rcode() == dns.rcode.SERVFAIL
            # ... while the health check keeps passing, run after run.
            for _ in range(3):
                result = run_health_check(health_check_argv(sidecar), env, check["timeout"])
                assert result.returncode == 0, result
                assert result.output.startswith(f"ok: {listen} answered id.server CH TXT")
        assert proc.proc.returncode == 0, proc.log()  # SIGTERM: a clean exit


@pytest.mark.integration
def test_health_check_fails_when_nothing_listens() -> None:
    sidecar = container(load_json(TASK_DEF), SIDECAR)
    host = loopback_host(BLOCK)
    env = process_env(task_environment(f"{host}:{free_port(host)}", "127.0.0.1:9", UNREACHABLE))
    result = run_health_check(health_check_argv(sidecar), env, sidecar["healthCheck"]["timeout"])
    assert result.returncode == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("unhealthy: nothing listens on")
