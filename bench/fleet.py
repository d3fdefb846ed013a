"""A fleet of sidecars polling Cloud Map through one account-wide throttle:

    .venv/bin/python -m bench.fleet [--sidecars 50] [--seconds 120] [--services 1]

Everything on loopback: moto in server mode with namespace `local` and the service
`resource-server` (more with --services: `resource-server-1`, ...; 3 instances each), the
throttling shim in front of it (tests/fakes/throttle_shim.py: a bucket of 20 refilled at 10 a
second, AWS's 2,000 and 1,000 scaled down by 100) and a scripted upstream answering every name
of the zone. The sidecars start together, as after a fleet-wide deploy, each with
`--cloudmap local=local` and `--cloudmap-interval 10` (the default), and each is asked for its
services as soon as it answers, then every 30 s (so they stay asked for). The shim records
every data-plane request (retries included); at the end each sidecar's own count of its calls
is read from its /metrics. The report is the aggregate against the shim's budget over the run,
the busiest second against the mean (and against what as many requests thrown at random
seconds give), each sidecar's rate by API, and the fleet size per account the measured rate
implies. Written to bench/results/fleet.md (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query

from tests.fakes.moto_server import NO_PROXY_OPENER, admin_client, running_moto
from tests.fakes.nsd import free_port
from tests.fakes.scripted_upstream import Answer, ScriptedUpstream
from tests.fakes.throttle_shim import Call, ThrottleShim

REGION = "us-east-1"
CAPACITY, REFILL = 20, 10  # the shim's bucket: AWS's 2,000 / 1,000 per second, scaled by 1/100
AWS_REFILL = 1000.0
ASK_EVERY = 30.0
DNS_PORT = 5353
METRICS_PORT = 9153
SERVICE = "resource-server"
APIS = ("DiscoverInstances", "DiscoverInstancesRevision")
CALLS_METRIC = re.compile(
    r"^dns_sidecar_cloudmap_calls_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)$"
)


def service_name(s: int) -> str:
    return SERVICE if s == 0 else f"{SERVICE}-{s}"


def set_up_registry(url: str, services: int) -> None:
    admin: Any = admin_client(url, REGION)
    admin.create_private_dns_namespace(Name="local", Vpc="vpc-0123456789abcdef0")
    (namespace,) = admin.list_namespaces()["Namespaces"]
    for s in range(services):
        service = admin.create_service(Name=service_name(s), NamespaceId=namespace["Id"])["Service"]
        for i in range(1, 4):
            admin.register_instance(
                ServiceId=service["Id"],
                InstanceId=f"task-{i}",
                Attributes={"AWS_INSTANCE_IPV4": f"127.0.8.{i}"},
            )


def start_sidecars(
    count: int, upstream: str, shim: ThrottleShim, workdir: Path, interval: float
) -> list[Any]:
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ECS_"))},
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    fleet = []
    for n in range(count):
        # the shim tells the sidecars apart by their endpoint's path
        env = {**base, "AWS_ENDPOINT_URL_SERVICEDISCOVERY": shim.url_for(caller(n))}
        host = sidecar_host(n)  # an address of its own: no two sidecars race for a port
        log = (workdir / f"sidecar-{n}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--listen", f"{host}:{DNS_PORT}",
             "--metrics-listen", f"{host}:{METRICS_PORT}",
             "--upstream", upstream, "--zone", f"local={upstream}",
             "--health-check", "local=tcp:9", "--endpoint-probe-interval", "10",
             "--passive-health", "off", "--cloudmap", "local=local",
             "--cloudmap-interval", str(interval),
             "--log-format", "text", "--drain-seconds", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip
        log.close()
        fleet.append((proc, host))
    return fleet


def caller(n: int) -> str:
    return f"sidecar-{n}"


class CpuSampler:
    """The machine's busy share of all its CPUs, second by second (from /proc/stat)."""

    def __init__(self) -> None:
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def _run(self) -> None:
        busy, total = self._times()
        start = time.monotonic()
        while not self._stop.wait(start + len(self.busy) + 1 - time.monotonic()):
            now_busy, now_total = self._times()
            self.busy.append((now_busy - busy) / max(1, now_total - total))
            busy, total = now_busy, now_total

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def sidecar_host(n: int) -> str:
    return f"127.0.{9 + n // 250}.{n % 250 + 1}"


def ask(host: str, services: int) -> bool:
    try:
        for s in range(services):
            query = dns.message.make_query(f"{service_name(s)}.local.", "A")
            dns.query.udp(query, host, port=DNS_PORT, timeout=0.5)
    except (OSError, dns.exception.Timeout):
        return False
    return True


def sidecar_calls(host: str) -> Counter[tuple[str, str]]:
    """The sidecar's own count of its Cloud Map calls, (api, outcome) -> calls, from /metrics
    (botocore's retries are not calls: a call the retry saved counts ok, once)."""
    url = f"http://{host}:{METRICS_PORT}/metrics"
    with NO_PROXY_OPENER.open(url, timeout=5.0) as response:
        text = response.read().decode()
    calls: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        match = CALLS_METRIC.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            calls[labels["api"], labels["outcome"]] += int(float(match["value"]))
    return calls


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(
    sidecars: int,
    seconds: float,
    services: int,
    interval: float,
    capacity: float = CAPACITY,
    refill: float = REFILL,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        workdir = Path(tmp)
        moto_port = free_port("127.0.0.1")
        with (
            running_moto("127.0.0.1", moto_port, workdir / "moto.log") as moto_url,
            ThrottleShim(moto_url, capacity=capacity, rate=refill) as shim,
            ScriptedUpstream(default=Answer(tuple(f"A 127.0.8.{i}" for i in (1, 2, 3)))) as up,
        ):
            set_up_registry(moto_url, services)
            cpu = CpuSampler().__enter__()
            start = time.monotonic()
            fleet = start_sidecars(sidecars, f"{up.host}:{up.port}", shim, workdir, interval)
            asked_at: dict[int, float] = {}  # when each sidecar was last asked
            first_asked: dict[int, float] = {}
            try:
                while time.monotonic() - start < seconds:
                    for n, (proc, host) in enumerate(fleet):
                        if proc.poll() is not None:
                            log = (workdir / f"sidecar-{n}.log").read_text()[-2000:]
                            raise RuntimeError(f"sidecar {n} exited: {proc.returncode}\n{log}")
                        due = asked_at.get(n)
                        if (due is None or time.monotonic() - due >= ASK_EVERY) and ask(
                            host, services
                        ):
                            asked_at[n] = time.monotonic()
                            first_asked.setdefault(n, asked_at[n])
                    time.sleep(0.2)
                ready = sorted(t - start for t in first_asked.values())
                scraped_at = time.monotonic()
                own = [sidecar_calls(host) for _, host in fleet]
                rss = [rss_mib(proc.pid) for proc, _ in fleet]
                shim_at_scrape = sum(1 for c in shim.calls if c.at < scraped_at)
            finally:
                cpu.__exit__()
                for proc, _ in fleet:
                    proc.terminate()
                for proc, _ in fleet:
                    proc.wait(timeout=20)
            calls = [c for c in shim.calls if c.at - start < seconds]
    result = summarise(calls, start, sidecars, seconds, services, ready, capacity, refill)
    result.update(summarise_own(own, seconds, services, shim_at_scrape), interval=interval)
    result["rss_mib"] = (sum(rss) / len(rss), max(rss), sum(rss)) if rss else None
    result["cpu_busy"] = cpu.busy[: int(seconds)]
    asked = {caller(n): t for n, t in first_asked.items()}
    result["raw"] = {
        "calls": [(c.at - start, c.api, c.outcome, c.caller) for c in calls],
        "first_asked": {name: t - start for name, t in asked.items()},
    }
    result.update(first_lookups(calls, start, asked, interval))
    return result


def first_lookups(
    calls: Sequence[Call], start: float, first_asked: Mapping[str, float], interval: float
) -> dict[str, Any]:
    """Each sidecar's first call (its first lookup of a service: the sidecar puts it at a
    random moment within one interval of the first ask): how long after the ask it reached
    the shim, how long before the sidecar's next call, how many first calls and other calls
    each of the first 20 seconds held, and the rate in the first interval after the asks
    against the rate after it."""
    by_caller: dict[str, list[float]] = {}
    for call in calls:
        by_caller.setdefault(call.caller, []).append(call.at)
    firsts = {name: times[0] for name, times in by_caller.items()}
    delays = sorted(t - first_asked[name] for name, t in firsts.items() if name in first_asked)
    gaps = sorted(times[1] - times[0] for times in by_caller.values() if len(times) > 1)
    later = sorted(b - a for times in by_caller.values() for a, b in pairwise(times[1:]))
    first_counts = Counter(int(t - start) for t in firsts.values())
    all_counts = Counter(int(c.at - start) for c in calls)
    window = (
        (min(first_asked.values()) - start, max(first_asked.values()) - start + interval)
        if first_asked
        else (0.0, 0.0)
    )
    end = max((c.at - start for c in calls), default=0.0)
    inside = sum(1 for c in calls if window[0] <= c.at - start < window[1])
    after = sum(1 for c in calls if c.at - start >= window[1])
    return {
        "first_delays": delays,
        "first_next_gaps": gaps,
        "later_gaps": later,
        "first_20_split": [(first_counts.get(s, 0), all_counts.get(s, 0)) for s in range(20)],
        "start_window": window,
        "rate_in_window": inside / (window[1] - window[0]) if window[1] > window[0] else 0.0,
        "rate_after_window": after / (end - window[1]) if end > window[1] else 0.0,
    }


def summarise_own(
    own: Sequence[Mapping[tuple[str, str], int]],
    seconds: float,
    services: int,
    shim_requests: int,
) -> dict[str, Any]:
    """What the sidecars say they called: per sidecar and service, a minute, by API (mean,
    least, most), and the requests the shim saw beyond them (botocore's retries)."""
    minutes = seconds / 60
    per_api = {}
    for api in APIS:
        rates = sorted(
            sum(n for (a, _), n in calls.items() if a == api) / minutes / services for calls in own
        )
        per_api[api] = (sum(rates) / len(rates), rates[0], rates[-1])
    outcomes: Counter[tuple[str, str]] = Counter()
    for calls in own:
        outcomes.update(calls)
    total = sum(outcomes.values())
    return {
        "own_per_minute_by_api": per_api,
        "own_outcomes": {f"{a} {o}": n for (a, o), n in sorted(outcomes.items())},
        "own_calls": total,
        "silent_sidecars": sum(1 for calls in own if not calls),
        "shim_requests_at_scrape": shim_requests,
        "retries": shim_requests - total,
    }


def random_seconds_reference(
    calls: int, seconds: int, trials: int = 1000, seed: int = 18
) -> dict[str, float]:
    """The busiest second over the mean when `calls` requests fall at independent uniform
    moments of `seconds` seconds (a fleet out of step, no lockstep): median, 95th
    percentile, and the share of runs whose busiest second is over 3x the mean."""
    if calls == 0 or seconds == 0:
        return {"median": 0.0, "p95": 0.0, "over_3x": 0.0}
    rng = random.Random(seed)
    mean = calls / seconds
    ratios = []
    for _ in range(trials):
        bins = [0] * seconds
        for _ in range(calls):
            bins[rng.randrange(seconds)] += 1
        ratios.append(max(bins) / mean)
    ratios.sort()
    return {
        "median": ratios[trials // 2],
        "p95": ratios[int(trials * 0.95)],
        "over_3x": sum(1 for r in ratios if r > 3.0) / trials,
    }


def summarise(
    calls: Sequence[Call],
    start: float,
    sidecars: int,
    seconds: float,
    services: int,
    ready: Sequence[float],
    capacity: float = CAPACITY,
    refill: float = REFILL,
) -> dict[str, Any]:
    per_second = Counter(int(c.at - start) for c in calls)
    counts = [per_second.get(s, 0) for s in range(int(seconds))]
    mean = sum(counts) / len(counts)
    later = counts[10:]
    later_mean = sum(later) / len(later) if later else 0.0
    by_api_total = Counter(c.api for c in calls)
    budget = capacity + refill * seconds
    by_api = Counter((c.api, c.outcome) for c in calls)
    pollers = sidecars * services
    rate = len(calls) / seconds / pollers  # requests per second per sidecar and service
    return {
        "sidecars": sidecars,
        "services": services,
        "seconds": seconds,
        "calls": len(calls),
        "budget": budget,
        "capacity": capacity,
        "refill": refill,
        "by_api": {f"{api} {outcome}": n for (api, outcome), n in sorted(by_api.items())},
        "throttled": sum(1 for c in calls if c.outcome == "throttled"),
        "mean_per_second": mean,
        "max_second": max(counts),
        "max_over_mean": max(counts) / mean if mean else 0.0,
        "mean_per_second_after_10s": later_mean,
        "max_second_after_10s": max(later) if later else 0,
        "max_over_mean_after_10s": max(later) / later_mean if later_mean else 0.0,
        "random_reference": random_seconds_reference(len(calls), len(counts)),
        "shim_per_sidecar_per_minute_by_api": {
            api: by_api_total.get(api, 0) / sidecars / services / (seconds / 60) for api in APIS
        },
        "first_20_seconds": counts[:20],
        "per_second": counts,
        "histogram": dict(sorted(Counter(counts).items())),
        "per_poller_per_minute": rate * 60,
        "fleet_pollers_at_aws_refill": AWS_REFILL / rate if rate else 0.0,
        "ready_first_last": (ready[0], ready[-1]) if ready else None,
        "ready": len(ready),
    }


def report(result: dict[str, Any], argv: Sequence[str]) -> str:
    r = result
    within = r["calls"] <= r["budget"]
    ok = within and r["max_over_mean"] <= 3.0
    api_rows = "\n".join(f"| {key} | {n} |" for key, n in r["by_api"].items())
    own_rows = "\n".join(f"| {key} | {n} |" for key, n in r["own_outcomes"].items())
    rate_rows = "\n".join(
        f"| {api} | {r['shim_per_sidecar_per_minute_by_api'][api]:.2f} | {mean:.2f} | "
        f"{low:.2f} | {high:.2f} |"
        for api, (mean, low, high) in r["own_per_minute_by_api"].items()
    )
    first, last = r["ready_first_last"] or (float("nan"), float("nan"))
    ref = r["random_reference"]
    mean_rss, max_rss, total_rss = r["rss_mib"] or (0.0, 0.0, 0.0)
    delays = r["first_delays"] or [float("nan")]
    late = sum(1 for d in r["first_delays"] if d > r["interval"])
    split = ", ".join(f"{f}/{n}" for f, n in r["first_20_split"])
    cpu = ", ".join(f"{b:.0%}" for b in r["cpu_busy"][:20])
    cpu_mean = sum(r["cpu_busy"]) / len(r["cpu_busy"]) if r["cpu_busy"] else float("nan")
    gaps = r["first_next_gaps"] or [float("nan")]
    short = sum(1 for g in r["first_next_gaps"] if g < r["interval"] * 0.8)
    w0, w1 = r["start_window"]
    later = r["later_gaps"] or [float("nan")]
    return f"""# Fleet: {r["sidecars"]} sidecars polling Cloud Map through one throttle

`{" ".join(["python -m bench.fleet", *argv])}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, \
{os.cpu_count()} cores, Python {platform.python_version()}.

{r["sidecars"]} sidecar processes started together ({r["ready"]} of them answered, \
{first:.1f}-{last:.1f} s
after the launch, as the {os.cpu_count()} cores got to them), {r["services"]} service(s) each \
(`{SERVICE}.local`),
a {r["interval"]:g} s interval, against moto behind the throttling shim: a bucket of \
{r["capacity"]:g} refilled at
{r["refill"]:g} a second (AWS's 2,000 and 1,000 a second per account and Region, scaled by \
1/{AWS_REFILL / r["refill"]:g}),
shared by DiscoverInstances and DiscoverInstancesRevision. Every HTTP request is counted,
botocore's retries included. Measured over {r["seconds"]:.0f} s from the launch. Each
sidecar's resident memory at the end: {mean_rss:.1f} MiB on average, {max_rss:.1f} at most,
{total_rss:,.0f} MiB for the fleet (boto3 loaded).

| measure | value |
|---|---|
| requests, all sidecars | {r["calls"]} |
| the shim's budget over the run ({r["capacity"]:g} + {r["refill"]:g} x {r["seconds"]:.0f} s) | \
{r["budget"]:.0f} |
| within the budget | {"yes" if within else "no"} ({r["calls"] / r["budget"]:.0%} of it) |
| throttled requests | {r["throttled"]} |
| mean requests per second | {r["mean_per_second"]:.2f} |
| busiest second | {r["max_second"]} ({r["max_over_mean"]:.2f}x the mean) |
| mean requests per second after the first 10 s | {r["mean_per_second_after_10s"]:.2f} |
| busiest second after the first 10 s | {r["max_second_after_10s"]} \
({r["max_over_mean_after_10s"]:.2f}x their mean) |
| the same number of requests at random seconds: busiest second, median / 95th percentile \
| {ref["median"]:.2f}x / {ref["p95"]:.2f}x the mean (over 3x in {ref["over_3x"]:.1%} of runs) |
| requests per sidecar per service per minute | {r["per_poller_per_minute"]:.2f} |
| acceptance (within budget, no second over 3x the mean) | {"met" if ok else "NOT met"} |

Requests at the shim by API and outcome:

| API, outcome | requests |
|---|---|
{api_rows}

Calls per sidecar and service per minute, by API: at the shim (requests / sidecars /
minutes), and as each sidecar counted its own calls (`dns_sidecar_cloudmap_calls_total`, read
from its /metrics at the end: mean, least and most of the {r["sidecars"]} sidecars; \
{r["silent_sidecars"]}
sidecar(s) made no call):

| API | at the shim | own count, mean | least | most |
|---|---|---|---|---|
{rate_rows}

The sidecars' own counts by API and outcome (a call botocore retried is one call here):

| API, outcome | calls |
|---|---|
{own_rows}

The shim saw {r["shim_requests_at_scrape"]} requests up to the moment the counts were read, the
sidecars counted {r["own_calls"]} calls: {r["retries"]} request(s) beyond them, botocore's
retries of throttled calls (the sidecar's client allows one).

Requests in each of the first 20 seconds: {r["first_20_seconds"]}. Seconds by their number
of requests (requests: seconds): {r["histogram"]}. Every second: {r["per_second"]}.

**The start.** Each sidecar's first request (its first lookup, which it puts at a random
moment within one interval of the first ask) reached the shim {delays[0]:.1f} s to \
{delays[-1]:.1f} s
after that ask (median {delays[len(delays) // 2]:.1f} s; {late} later than one interval). First
requests / all requests in each of the first 20 seconds: {split}. The machine's CPUs \
({os.cpu_count()}) were
busy in those seconds: {cpu} (over the whole run: {cpu_mean:.0%}).

A sidecar's next request came {gaps[0]:.1f} s to {gaps[-1]:.1f} s after its first (median \
{gaps[len(gaps) // 2]:.1f} s);
{short} of {len(r["first_next_gaps"])} came sooner than 0.8 intervals (the shortest a round's \
jittered wait
allows). From the first ask to one interval after the last ({w0:.1f}-{w1:.1f} s) the fleet
made {r["rate_in_window"]:.2f} requests a second, after it {r["rate_after_window"]:.2f}.
From its second request on, a sidecar's requests came {later[0]:.1f} s to {later[-1]:.1f} s \
apart (median
{later[len(later) // 2]:.1f} s, {len(r["later_gaps"])} gaps; a round's wait is 0.8-1.2 \
intervals).

**Fleet size per account.** At the measured {r["per_poller_per_minute"]:.2f} requests a minute
per sidecar and service, AWS's refill of 1,000 a second carries
{r["fleet_pollers_at_aws_refill"]:,.0f} sidecar x service pollers, if both APIs count against
the one bucket and nothing else in the account calls it: for example
{r["fleet_pollers_at_aws_refill"] / 5:,.0f} tasks resolving 5 Cloud Map services each. Beyond
that the sidecars are throttled, back off (the wait doubles, up to 5 minutes) and answer from
DNS meanwhile.
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--services", type=int, default=1)
    parser.add_argument("--interval", type=float, default=10.0, help="--cloudmap-interval")
    parser.add_argument("--capacity", type=float, default=CAPACITY, help="the shim's bucket")
    parser.add_argument("--refill", type=float, default=REFILL, help="tokens a second")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet.md"))
    parser.add_argument(
        "--raw",
        type=Path,
        help="also write every request (seconds from the launch, API, "
        "outcome, caller) and each sidecar's first ask, as JSON",
    )
    args = parser.parse_args(argv)
    result = run(
        args.sidecars, args.seconds, args.services, args.interval, args.capacity, args.refill
    )
    text = report(result, sys.argv[1:] if argv is None else list(argv))
    args.out.write_text(text)
    if args.raw is not None:
        args.raw.write_text(json.dumps(result["raw"]))
    print(text)


if __name__ == "__main__":
    main()
