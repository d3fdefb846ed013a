"""From what the setups did to the figures, the markdown table and the timeline chart.

Definitions (the report repeats them in words):
- a request is one attempt of the application: a lookup if its list is stale, a connection to
  the first address, one HTTP exchange. Failed: refused, timed out, lookup failed, not 2xx.
- requests to the dead backend: attempts addressed to DEAD between its death and its return;
  the time until none goes there is from its death to the last such attempt ("until it came
  back" when attempts went on within a second of its return).
- slow share: attempts addressed to SLOW among all attempts from its slowdown to the end.
- latency: from the start of an attempt to the end of the answer, successful attempts only.
- upstream queries: NSD's own counter, per second of the measured window; name lookups are its
  NOERROR answers (the only name with data in the zone is the service's) over the server's
  whole life, against the allowance of one per TTL, with prefetching one per 90% of the TTL.
- herding: each second, the attempts to backends that should share the load (alive, fast and
  registered then) are divided fairly among them; a backend's ratio is what it got over what
  it would have got fairly, summed over the seconds it was one of them. The worst ratio is
  reported, with the share it amounts to.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.discovery.run import RunData, SetupData
from bench.discovery.scenario import BACKEND_ADDRS, CLIENT_ADDR, DEAD, RULE9, SLOW, Timeline

DEAD_STOP_LIMIT = 3.0  # seconds: acceptance, sidecar only
SLOW_SHARE_LIMIT = 0.10
HERD_LIMIT = 2.0
STALL_SECONDS = 0.5  # a request to a fast, live backend on loopback never takes this long


@dataclass
class Figures:
    requests: int
    failed: int
    stalled: int  # requests to a fast live backend that timed out or took > STALL_SECONDS
    dead_after: int
    dead_last: float | None  # seconds after the death of the last attempt to DEAD
    dead_until_back: bool
    # the sidecar's own answers (the watcher's samples): the last one naming DEAD first, in
    # seconds after its death; None without samples or when none did
    answers_dead_last: float | None
    slow_share: float
    p50_ms: float
    p99_ms: float
    upstream_qps: float
    name_queries: int
    name_allowance: int
    server_life: float
    lookups_per_s: float
    herd_ratio: float
    herd_backend: str
    herd_share: float
    herd_fair: float

    @property
    def failed_pct(self) -> float:
        return 100.0 * self.failed / self.requests if self.requests else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def counter_at(series: list[tuple[float, int, int]], t: float, column: int) -> float:
    """NSD's counter at time `t`, interpolated between the samples around it."""
    before = [s for s in series if s[0] <= t]
    after = [s for s in series if s[0] >= t]
    if not before:
        return float(series[0][column])
    if not after:
        return float(series[-1][column])
    a, b = before[-1], after[0]
    if b[0] == a[0]:
        return float(a[column])
    return a[column] + (b[column] - a[column]) * (t - a[0]) / (b[0] - a[0])


def effective(data: SetupData, timeline: Timeline) -> Timeline:
    """The timeline with each event at the moment it took effect in this setup (a few ms after
    its scheduled time), so that requests just before an event count as before it."""
    ev = data.events
    death = ev.get("death", timeline.death)
    return replace(
        timeline,
        death=death,
        slow=ev.get("slow", timeline.slow),
        deregister_after=ev.get("deregister", timeline.deregister) - death,
        back=ev.get("back", timeline.back),
    )


def answers_dead_last(data: SetupData, tl: Timeline) -> float | None:
    """Seconds from DEAD's death to the last sampled sidecar answer that named it first."""
    named = [t for t, a in data.answers if a == DEAD and tl.death <= t < tl.back]
    return max(named) - tl.death if named else None


def figures(data: SetupData, timeline: Timeline) -> Figures:
    tl = effective(data, timeline)
    window = [r for r in data.requests if 0.0 <= r[0] < tl.duration]
    failed = sum(1 for r in window if not r[2])
    to_dead = [r[0] for r in window if r[1] == DEAD and tl.death <= r[0] < tl.back]
    last = max(to_dead, default=None)
    after_slow = [r for r in window if r[0] >= tl.slow]
    slow_share = sum(1 for r in after_slow if r[1] == SLOW) / len(after_slow) if after_slow else 0
    ok_latency = [r[3] * 1000 for r in window if r[2]]

    up = data.upstream
    queries = counter_at(up, tl.duration, 1) - counter_at(up, 0.0, 1) if up else math.nan
    names = up[-1][2] if up else 0
    life = (up[-1][0] if up else tl.duration) - data.server_started
    allowance = 1 + math.floor(life / (0.9 * tl.ttl))
    lookups = [x for x in data.lookups if 0.0 <= x[0] < tl.duration]

    herd_ratio, herd_backend, herd_share, herd_fair = herding(window, tl)
    stalled = sum(
        1
        for r in window
        if r[1] != "-"
        and tl.alive(r[1], r[0])
        and not tl.is_slow(r[1], r[0])
        and (r[4] == "timeout" or (r[2] and r[3] > STALL_SECONDS))
    )
    return Figures(
        requests=len(window),
        failed=failed,
        stalled=stalled,
        dead_after=len(to_dead),
        dead_last=None if last is None else last - tl.death,
        dead_until_back=last is not None and last >= tl.back - 1.0,
        answers_dead_last=answers_dead_last(data, tl),
        slow_share=slow_share,
        p50_ms=percentile(ok_latency, 0.50),
        p99_ms=percentile(ok_latency, 0.99),
        upstream_qps=queries / tl.duration,
        name_queries=names,
        name_allowance=allowance,
        server_life=life,
        lookups_per_s=len(lookups) / tl.duration,
        herd_ratio=herd_ratio,
        herd_backend=herd_backend,
        herd_share=herd_share,
        herd_fair=herd_fair,
    )


def herding(
    window: list[tuple[float, str, bool, float, str]], tl: Timeline
) -> tuple[float, str, float, float]:
    """(worst ratio to the fair share, its backend, its share, the fair share) as defined in the
    module docstring."""
    per_second: dict[int, Counter[str]] = defaultdict(Counter)
    for t, address, *_ in window:
        per_second[int(t)][address] += 1
    got: Counter[str] = Counter()
    fair: defaultdict[str, float] = defaultdict(float)
    total: Counter[str] = Counter()
    for second, counts in per_second.items():
        sharing = [a for a in BACKEND_ADDRS if tl.should_share(a, second + 0.5)]
        shared = sum(counts[a] for a in sharing)
        for a in sharing:
            got[a] += counts[a]
            fair[a] += shared / len(sharing)
            total[a] += shared
    ratios = {a: got[a] / fair[a] for a in fair if fair[a] > 0}
    if not ratios:
        return math.nan, "-", math.nan, math.nan
    worst = max(ratios, key=lambda a: ratios[a])
    return ratios[worst], worst, got[worst] / total[worst], fair[worst] / total[worst]


# --- markdown ---------------------------------------------------------------------------------


def short(address: str) -> str:
    return "." + address.rsplit(".", 1)[1]


def fmt_dead_stop(f: Figures, tl: Timeline) -> str:
    if f.dead_last is None:
        return "none went"
    if f.dead_until_back:
        return f"never (until it came back at {tl.back:g} s)"
    return f"{f.dead_last:.1f} s"


def table(run: RunData, figs: dict[str, Figures]) -> list[str]:
    tl = run.timeline
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("failed requests", lambda f: f"{f.failed} ({f.failed_pct:.1f}%)"),
        (
            f"requests to the dead backend after its death (t={tl.death:g}..{tl.back:g} s)",
            lambda f: str(f.dead_after),
        ),
        ("time until no new request goes to it", lambda f: fmt_dead_stop(f, tl)),
        (
            f"share of requests to the slow backend while slow (t >= {tl.slow:g} s)",
            lambda f: f"{100 * f.slow_share:.1f}%",
        ),
        (
            "request latency p50 / p99 (successful requests)",
            lambda f: f"{f.p50_ms:.1f} / {f.p99_ms:.1f} ms",
        ),
        ("upstream DNS queries per second (NSD's counter)", lambda f: f"{f.upstream_qps:.2f}"),
        (
            f"upstream lookups of the name (allowance: one per {tl.ttl} s TTL, prefetch included)",
            lambda f: f"{f.name_queries} in {f.server_life:.0f} s (allowance {f.name_allowance})",
        ),
        ("application lookups per second (getaddrinfo calls)", lambda f: f"{f.lookups_per_s:.1f}"),
        (
            "herding: busiest healthy backend, share of the load vs fair share",
            lambda f: (
                f"{short(f.herd_backend)} {100 * f.herd_share:.0f}% vs "
                f"{100 * f.herd_fair:.0f}% ({f.herd_ratio:.1f}x)"
            ),
        ),
    ]
    keys = [s.key for s in run.setups]
    out = ["| | " + " | ".join(f"**{k}**" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    out += [f"| {name} | " + " | ".join(fmt(figs[k]) for k in keys) + " |" for name, fmt in rows]
    return out


def phases(run: RunData) -> list[str]:
    """Failures and where the successful requests went, per phase of the timeline."""
    tl = run.timeline
    bounds = sorted({0.0, tl.death, tl.slow, tl.deregister, tl.back, tl.duration})
    spans = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    out = [
        "| setup | " + " | ".join(f"{a:g}-{b:g} s" for a, b in spans) + " |",
        "|---|" + "---|" * len(spans),
    ]
    for s in run.setups:
        cells = []
        for a, b in spans:
            part = [r for r in s.requests if a <= r[0] < b]
            if not part:
                cells.append("-")
                continue
            bad = sum(1 for r in part if not r[2])
            ok = Counter(r[1] for r in part if r[2])
            top = ", ".join(
                f"{short(addr)} {100 * n / len(part):.0f}%" for addr, n in ok.most_common(2)
            )
            cells.append(f"{100 * bad / len(part):.0f}% failed; {top or 'none ok'}")
        out.append(f"| {s.key} | " + " | ".join(cells) + " |")
    return out


def acceptance(run: RunData, figs: dict[str, Figures]) -> list[str]:
    f = figs.get("sidecar")
    if f is None:
        return ["(the `sidecar` setup was not run)"]
    tl = run.timeline
    checks = [
        (
            f"no request reaches the dead backend later than {DEAD_STOP_LIMIT:g} s after its death",
            f.dead_last is None or (f.dead_last <= DEAD_STOP_LIMIT and not f.dead_until_back),
            fmt_dead_stop(f, tl)
            + (
                ""
                if f.answers_dead_last is None
                else f" (in the sidecar's own answers, sampled once a second, it came first until "
                f"{f.answers_dead_last:.1f} s after its death)"
            ),
        ),
        (
            f"the slow backend gets under {100 * SLOW_SHARE_LIMIT:.0f}% of requests while slow",
            f.slow_share < SLOW_SHARE_LIMIT,
            f"{100 * f.slow_share:.1f}%",
        ),
        (
            f"no healthy backend gets more than {HERD_LIMIT:g}x its fair share",
            f.herd_ratio <= HERD_LIMIT,
            f"{f.herd_ratio:.2f}x ({short(f.herd_backend)})",
        ),
        (
            "upstream queries at most one per name per TTL (+ prefetch)",
            f.name_queries <= f.name_allowance,
            f"{f.name_queries} lookups of the name in {f.server_life:.0f} s, "
            f"allowance {f.name_allowance}",
        ),
    ]
    return [
        f"- [{'x' if ok else ' '}] {what}: **{'pass' if ok else 'FAIL'}**, {got}"
        for what, ok, got in checks
    ]


# --- the chart --------------------------------------------------------------------------------


def event_labels(tl: Timeline) -> list[tuple[float, str]]:
    return [
        (tl.death, f"{short(DEAD)} dies"),
        (tl.slow, f"{short(SLOW)} slow"),
        (tl.deregister, f"{short(DEAD)} deregistered"),
        (tl.back, f"{short(DEAD)} back"),
    ]


def chart(run: RunData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = run.timeline
    seconds = list(range(int(tl.duration)))  # whole one-second buckets only

    def steps(counts: Counter[int]) -> tuple[list[int], list[int]]:
        """x and y for a steps-post line: the last bucket drawn to its end too."""
        ys = [counts[x] for x in seconds]
        return [*seconds, len(seconds)], [*ys, ys[-1] if ys else 0]

    colours = {
        DEAD: "#d62728",
        SLOW: "#ff7f0e",
    }
    others = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2"]
    n = len(run.setups)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n + 0.6), sharex=True, squeeze=False)
    ymax = 1.2 * run.options.rate  # room for the event labels above the lines
    for ax, s in zip(axes[:, 0], run.setups, strict=True):
        per: dict[str, Counter[int]] = defaultdict(Counter)
        errors: Counter[int] = Counter()
        for t, address, ok, _lat, _err in s.requests:
            if 0 <= t < tl.duration:
                per[address][int(t)] += 1
                if not ok:
                    errors[int(t)] += 1
        k = 0
        for address in RULE9:
            if address in colours:
                colour = colours[address]
            else:
                colour, k = others[k % len(others)], k + 1
            role = " (dies)" if address == DEAD else " (slow)" if address == SLOW else ""
            ax.plot(
                *steps(per[address]),
                color=colour,
                lw=1.3,
                drawstyle="steps-post",
                label=f"{address}{role}",
            )
        ax.plot(
            *steps(errors),
            color="black",
            lw=2.2,
            ls="--",
            drawstyle="steps-post",
            label="failed requests",
        )
        if s.upstream:
            xs, ys = [], []
            for (t1, q1, _), (t2, q2, _) in itertools.pairwise(s.upstream):
                if 0 <= t1 < tl.duration and t2 > t1:
                    xs.append(t1)
                    ys.append((q2 - q1) / (t2 - t1))
            ax.plot(
                xs,
                ys,
                color="grey",
                lw=1.0,
                ls=":",
                drawstyle="steps-post",
                label="upstream DNS queries/s",
            )
        for t, label in event_labels(tl):
            ax.axvline(t, color="grey", lw=0.8, alpha=0.6)
            ax.text(
                t,
                0.97,
                f" {label}",
                transform=ax.get_xaxis_transform(),
                fontsize=7,
                va="top",
                color="dimgrey",
            )
        ax.set_ylim(0, ymax)
        ax.set_xlim(0, tl.duration)
        ax.set_ylabel("per second")
        ax.set_title(s.title, loc="left", fontsize=10)
        ax.grid(alpha=0.25)
    axes[-1, 0].set_xlabel("seconds")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        "Requests per second to each backend, and failures, as the application sees them",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the whole report -------------------------------------------------------------------------


def sidecar_lines(run: RunData) -> list[str]:
    """What each sidecar saw and did: health transitions of its probes, its own counters."""
    out = []
    for s in run.setups:
        if s.server != "sidecar":
            continue
        moves = [f"{short(a)} {h} at {t:.1f} s" for t, a, h in s.health if t >= 0]
        m = s.metrics

        def total(prefix: str, m: dict[str, float] = m) -> int:
            return int(sum(v for k, v in m.items() if k.startswith(prefix)))

        shaped = {
            k.split('action="')[1].split('"')[0]: int(v)
            for k, v in m.items()
            if k.startswith("dns_sidecar_answers_shaped_total")
        }
        out.append(
            f"- **{s.key}**: {answer_spread(s, run.timeline)}{probe_spread(s, run.timeline)} "
            "Probes saw "
            + ("; ".join(moves) if moves else "no health change")
            + f". Cache hits {total('dns_sidecar_cache_hits_total')}, misses "
            f"{total('dns_sidecar_cache_misses_total')}, prefetches "
            f"{total('dns_sidecar_cache_prefetch_total')}, upstream replies "
            f"{total('dns_sidecar_upstream_request_duration_seconds_count')}; shaped answers "
            + (", ".join(f"{k} {v}" for k, v in sorted(shaped.items())) or "none")
            + "."
        )
    return out


def answer_spread(data: SetupData, timeline: Timeline) -> str:
    """How evenly the sidecar's own answers (the watcher's sampled queries) put the backends
    that should share the load first: the sidecar's part of the herding figure."""
    tl = effective(data, timeline)
    sampled = [(t, a, True, 0.0, "-") for t, a in data.answers if 0.0 <= t < tl.duration]
    if not sampled:
        return ""
    ratio, backend, share, fair = herding(sampled, tl)
    dead = sum(1 for t, a, *_ in sampled if a == DEAD and tl.death + 3.0 <= t < tl.back)
    slow = sum(1 for t, a, *_ in sampled if a == SLOW and t >= tl.slow + 3.0)
    late = sum(1 for t, *_ in sampled if t >= tl.slow + 3.0)
    return (
        f"Its own answers ({len(sampled)} sampled, first address): busiest healthy backend "
        f"{short(backend)} {100 * share:.0f}% vs {100 * fair:.0f}% fair ({ratio:.2f}x); "
        f"the dead one first {dead} times from 3 s after its death; the slow one first in "
        f"{100 * slow / late if late else 0:.1f}% from 3 s after its slowdown. "
    )


def probe_spread(data: SetupData, timeline: Timeline) -> str:
    """How far apart the probe latencies of the backends that should share the load were: the
    sidecar shares first place among those within max(10 ms, 25%) of the best."""
    tl = effective(data, timeline)
    by_t: dict[float, dict[str, float]] = defaultdict(dict)
    for t, address, health, latency in data.endpoints:
        if latency is not None and health == "healthy" and tl.should_share(address, t):
            by_t[t][address] = latency
    samples = [v for v in by_t.values() if len(v) >= 2]
    if not samples:
        return ""
    outside = sum(
        1 for v in samples if max(v.values()) - min(v.values()) > max(10.0, 0.25 * min(v.values()))
    )
    medians = {
        a: statistics.median(v[a] for v in by_t.values() if a in v)
        for a in BACKEND_ADDRS
        if any(a in v for v in by_t.values())
    }
    return (
        "Smoothed probe latency of the fast backends (median): "
        + ", ".join(f"{short(a)} {m:.1f} ms" for a, m in medians.items())
        + f"; {outside} of {len(samples)} one-second samples had them further apart than the "
        "shaping slack, max(10 ms, 25%), beyond which the faster ones take first place."
    )


def warnings(run: RunData, figs: dict[str, Figures]) -> list[str]:
    stalled = {k: f.stalled for k, f in figs.items() if f.stalled}
    out = []
    if stalled:
        out.append(
            f"**Warning: requests to fast, live backends timed out or took over "
            f"{STALL_SECONDS:g} s** ("
            + ", ".join(f"{k}: {n}" for k, n in stalled.items())
            + f"). On loopback that means the machine was overloaded (load average "
            f"{run.load_before:.1f} before the run): the figures of this run are not to be trusted."
        )
    return out


def write(run: RunData, out_dir: Path) -> tuple[Path, dict[str, Figures]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = {s.key: figures(s, run.timeline) for s in run.setups}
    png = out_dir / "discovery.png"
    chart(run, png)
    tl, opt = run.timeline, run.options
    titles = [
        f"- **{s.key}**: {s.title}" + (f" (`{' '.join(s.server_args)}`)" if s.server_args else "")
        for s in run.setups
    ]
    cpu = [
        f"{s.key} " + ", ".join(f"{part} {sec:.0f} s" for part, sec in s.cpu.items())
        for s in run.setups
        if s.cpu
    ]
    md = [
        "# Discovery quality: what the application sees",
        "",
        f"Measured {run.started_at}, sidecar at {run.revision or 'unknown'}, with `{run.command}`: "
        f"{run.seconds:.0f} s, setups {'side by side' if run.concurrent else 'one after another'}"
        f" on 2 cores, load average {run.load_before:.1f} before the run. Written by "
        "`bench/discovery/report.py`; how it is measured: bench/discovery/README.md.",
        "",
        *(line for w in warnings(run, figs) for line in (w, "")),
        f"Six HTTP backends of `resource-server.local` share a /24 with the client task "
        f"({CLIENT_ADDR}); NSD serves their A records with a {tl.ttl} s TTL. glibc's order "
        f"for the client (RFC 6724 rule 9) is {', '.join(short(a) for a in RULE9)}: the first "
        "dies, the second slows down. Timeline: "
        + "; ".join(f"t={t:g} s {what}" for t, what in tl.events())
        + f"; the run ends at {tl.duration:g} s.",
        "",
        f"The application: {opt.clients} processes in the client task, {opt.rate:g} requests/s "
        "in all, each request a new connection to the first address getaddrinfo returned; a "
        f"process keeps its address list {opt.cache_seconds:g} s, and looks it up again at once "
        "after a failed connection.",
        "",
        *titles,
        "",
        "The client task sits in the backends' subnet, as tasks of an awsvpc service in one "
        "subnet do, and there glibc re-sorts every whole answer by rule 9. So the sidecar runs "
        "with `--max-answers local=1`: one address per answer leaves glibc nothing to re-sort. "
        "The herding row of the setups that hand out whole answers shows what re-sorting does.",
        "",
        *table(run, figs),
        "",
        "## Acceptance (sidecar with max-answers 1)",
        "",
        *acceptance(run, figs),
        "",
        "## Per phase: failed requests, and the two backends that answered most",
        "",
        *phases(run),
        "",
        "![timeline](discovery.png)",
        "",
        "## Inside the sidecars",
        "",
        *sidecar_lines(run),
        "",
        "CPU used during the run: " + "; ".join(cpu) + ".",
        "",
    ]
    (out_dir / "discovery.md").write_text("\n".join(md))
    return out_dir / "discovery.md", figs


def summary(figs: dict[str, Figures]) -> str:
    """A few lines for the terminal."""
    lines = []
    for key, f in figs.items():
        lines.append(
            f"{key:14} failed {f.failed_pct:5.1f}%  dead-stop "
            f"{'-' if f.dead_last is None else f'{f.dead_last:.1f}s'}"
            f"{'+' if f.dead_until_back else ''}  slow {100 * f.slow_share:4.1f}%  "
            f"p50/p99 {f.p50_ms:.1f}/{f.p99_ms:.1f} ms  upstream {f.upstream_qps:.2f} q/s  "
            f"herd {f.herd_ratio:.1f}x"
        )
    return "\n".join(lines)
