"""The results as bench/results/latest.md (tables, ratios to dnsmasq) and PNG charts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Results

SERVERS = ("sidecar", "sidecar-shaped", "dnsmasq", "unbound")
BASELINE = "dnsmasq"
PERCENTILE_KEYS = ("p50", "p90", "p99", "p99.9")
COLORS = {
    "sidecar": "#1f77b4",
    "sidecar-shaped": "#6baed6",
    "dnsmasq": "#d62728",
    "unbound": "#2ca02c",
}
MIB = 1024.0


def median(values: Sequence[float] | None) -> float:
    vals = [v for v in values or () if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def spread(values: Sequence[float] | None) -> tuple[float, float]:
    vals = [v for v in values or () if not math.isnan(v)]
    return (min(vals), max(vals)) if vals else (math.nan, math.nan)


def fill_rates(results: Results) -> tuple[int, dict[str, list[float]]]:
    """The all-miss QPS of the biggest one-at-a-time fill: (new names, per-server rounds)."""
    keys = {int(k) for v in results.fill_qps.values() for k in v}
    if not keys:
        return 0, {}
    n = max(keys)
    return n, {k: v[str(n)] for k, v in results.fill_qps.items() if str(n) in v}


def columns(results: Results) -> list[str]:
    seen = set(results.startup_s)
    extra = sorted(x for x in seen if x not in SERVERS)
    return [x for x in SERVERS if x in seen] + extra


def _fmt(value: float, kind: str) -> str:
    if math.isnan(value):
        return "-"
    if kind == "qps":
        return f"{value:,.0f}"
    if kind == "us":
        return f"{value * 1e6:,.0f}"
    if kind == "ms":
        return f"{value * 1e3:,.0f}"
    if kind == "mib":
        return f"{value / MIB:,.1f}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "ratio2":
        return f"{value:.2f}"
    return f"{value:,.2f}"


def _row(
    title: str,
    per_server: dict[str, float],
    cols: Sequence[str],
    kind: str,
    ratio: bool = True,
) -> str:
    base = per_server.get(BASELINE, math.nan)
    cells = []
    for col in cols:
        value = per_server.get(col, math.nan)
        cell = _fmt(value, kind)
        if ratio and not math.isnan(value) and col != BASELINE and base and not math.isnan(base):
            cell += f" ({value / base:.2f}x)"
        cells.append(cell)
    return f"| {title} | " + " | ".join(cells) + " |"


def summary_table(results: Results) -> list[str]:
    r = results
    cols = columns(r)
    rows = [
        "| measure (median of rounds; ratio to dnsmasq) | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]

    def med(table: dict[str, list[float]]) -> dict[str, float]:
        return {k: median(v) for k, v in table.items()}

    def med_nested(table: dict[str, dict[str, list[float]]], key: str) -> dict[str, float]:
        return {k: median(v.get(key)) for k, v in table.items()}

    rows.append(_row("cache-hit QPS, 1k names", med(r.hits_qps), cols, "qps"))
    rows.append(
        _row("server CPU busy in those runs", med(r.server_cpu.get("hits", {})), cols, "pct", False)
    )
    rows.append(_row("discovery-name QPS, 4 A each", med(r.discovery_qps), cols, "qps"))
    rows.append(
        _row(
            "server CPU busy in those runs",
            med(r.server_cpu.get("discovery", {})),
            cols,
            "pct",
            False,
        )
    )
    rows.append(_row("QPS with 5% misses", med(r.miss_qps), cols, "qps"))
    fill_n, fills = fill_rates(r)
    rows.append(_row(f"all-miss QPS ({fill_n:,} new names)", med(fills), cols, "qps"))
    cpu = {k: v[str(fill_n)] for k, v in r.fill_cpu.items() if str(fill_n) in v}
    rows.append(_row("CPU seconds per 1,000 misses (those fills)", med(cpu), cols, "ratio"))
    for key in ("p50", "p99"):
        alone = median(r.miss_latency_1.get("upstream", {}).get(key))
        title = (
            f"miss latency {key}, 1 in flight (us; the upstream asked alone: {_fmt(alone, 'us')})"
        )
        rows.append(_row(title, med_nested(r.miss_latency_1, key), cols, "us"))
    for key in ("p50", "p99", "p99.9"):
        rows.append(
            _row(f"latency {key}, 1 in flight (us)", med_nested(r.latency_1, key), cols, "us")
        )
    for key in ("p50", "p99", "p99.9"):
        rows.append(
            _row(f"latency {key} at 50% load (us)", med_nested(r.latency_half, key), cols, "us")
        )
    rows.append(
        _row(
            "upstream queries per client query, burst of identical misses",
            med(r.burst_ratio),
            cols,
            "ratio",
            ratio=False,
        )
    )
    rows.append(_row("start-up to first answer (ms)", med(r.startup_s), cols, "ms"))
    rows.append(_row("idle RSS (MiB)", med(r.idle_rss_kib), cols, "mib"))
    growth_keys = sorted({int(k) for v in r.growth_rss_kib.values() for k in v})
    for n in growth_keys:
        rows.append(
            _row(f"RSS with {n:,} names (MiB)", med_nested(r.growth_rss_kib, str(n)), cols, "mib")
        )
    for n in growth_keys:
        rows.append(
            _row(f"cache-hit QPS, {n:,} names", med_nested(r.growth_qps, str(n)), cols, "qps")
        )
    return rows


def round_ratios(table: dict[str, list[float]], top: str, bottom: str) -> list[float]:
    """top / bottom in each round (both measured in the same round, next to each other)."""
    return [
        a / b if b else math.nan
        for a, b in zip(table.get(top, []), table.get(bottom, []), strict=False)
    ]


def targets(results: Results) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met?) for the performance issue's acceptance targets (#20, and the
    shaped/plain target before it). QPS ratios are medians of the per-round ratios (each round
    measures the servers side by side); latency and memory are medians of rounds."""
    r = results
    out: list[tuple[str, str, bool | None]] = []

    def qps_ratio(
        title: str,
        table: dict[str, list[float]],
        goal: float,
        top: str = "sidecar",
        bottom: str = BASELINE,
    ) -> None:
        per_round = round_ratios(table, top, bottom)
        ratio = median(per_round)
        rounds = ", ".join(f"{x:.2f}" for x in per_round)
        out.append(
            (
                f"{title} >= {goal}",
                f"{ratio:.2f} (rounds: {rounds})",
                None if math.isnan(ratio) else ratio >= goal,
            )
        )

    def at_most(title: str, ours: float, theirs: float, goal: float, unit: str) -> None:
        ratio = ours / theirs if theirs else math.nan
        shown = f"{ratio:.2f}x ({_fmt(ours, unit)} vs {_fmt(theirs, unit)})"
        out.append((f"{title} <= {goal}x", shown, None if math.isnan(ratio) else ratio <= goal))

    _, fills = fill_rates(r)
    qps_ratio("all-miss QPS / dnsmasq", fills, 0.6)
    qps_ratio("QPS with 5% misses / dnsmasq", r.miss_qps, 1.0)
    qps_ratio("cache-hit QPS / dnsmasq", r.hits_qps, 1.1)
    qps_ratio(
        "shaped / plain sidecar QPS (discovery names)",
        r.discovery_qps,
        0.9,
        "sidecar-shaped",
        "sidecar",
    )
    for key, goal, table in (("p50", 1.1, r.latency_1), ("p99", 1.2, r.latency_half)):
        where = "1 in flight" if table is r.latency_1 else "50% load"
        ours = median(table.get("sidecar", {}).get(key))
        theirs = median(table.get(BASELINE, {}).get(key))
        at_most(f"latency {key} at {where} / dnsmasq", ours, theirs, goal, "us")
    biggest = max((int(k) for v in r.growth_qps.values() for k in v), default=0)
    if biggest:
        per_round = round_ratios(
            {k: v.get(str(biggest), []) for k, v in r.growth_qps.items()}, "sidecar", BASELINE
        )
        ratio = median(per_round)
        out.append(
            (
                f"cache-hit QPS over {biggest:,} names / dnsmasq >= 0.8",
                f"{ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in per_round)})",
                None if math.isnan(ratio) else ratio >= 0.8,
            )
        )
        rss = median(r.growth_rss_kib.get("sidecar", {}).get(str(biggest))) / MIB
        out.append(
            (
                f"RSS with {biggest:,} names <= 70 MiB",
                f"{rss:.1f} MiB",
                None if math.isnan(rss) else rss <= 70,
            )
        )
    start = median(r.startup_s.get("sidecar")) * 1000
    out.append(
        (
            "start-up to first answer <= 150 ms",
            f"{start:.0f} ms",
            None if math.isnan(start) else start <= 150,
        )
    )
    rss = median(r.idle_rss_kib.get("sidecar")) / MIB
    out.append(
        (
            "sidecar idle RSS <= 30 MB",
            f"{rss:.1f} MiB ({rss * 1.048576:.1f} MB)",
            None if math.isnan(rss) else rss * 1.048576 <= 30,
        )
    )
    return out


def headline(results: Results) -> list[str]:
    return [
        f"{'MET ' if met else 'MISSED' if met is False else '?'} {t}: {m}"
        for t, m, met in targets(results)
    ]


def rounds_table(results: Results) -> list[str]:
    r = results
    cols = [c for c in columns(r) if c in r.hits_qps]
    n = max((len(v) for v in r.hits_qps.values()), default=0)
    side_dm = round_ratios(r.hits_qps, "sidecar", "dnsmasq")
    shaped_plain = round_ratios(r.discovery_qps, "sidecar-shaped", "sidecar")

    def at(values: Sequence[float], i: int, kind: str) -> str:
        return _fmt(values[i], kind) if i < len(values) else "-"

    rows = [
        "| round | "
        + " | ".join(f"{c} hits" for c in cols)
        + " | sidecar / dnsmasq | shaped / plain | CPU used by other processes"
        + " | CPU taken by the hypervisor |",
        "|---|" + "---|" * (len(cols) + 4),
    ]
    for i in range(n):
        cells = [at(r.hits_qps[c], i, "qps") for c in cols]
        cells += [at(side_dm, i, "ratio2"), at(shaped_plain, i, "ratio2")]
        other = r.other_cpu_share[i] if i < len(r.other_cpu_share) else math.nan
        cells.append("-" if math.isnan(other) else f"{other:.0%}")
        stolen = r.stolen_cpu_share[i] if i < len(r.stolen_cpu_share) else math.nan
        cells.append("-" if math.isnan(stolen) else f"{stolen:.0%}")
        rows.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return rows


def markdown(results: Results, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    s = meta["settings"]
    lines = [
        "# Benchmark: dns-sidecar next to dnsmasq and Unbound",
        "",
        f"Run {meta['date']} with `make bench` (`python -m bench.run`) in "
        f"{meta['elapsed_s'] / 60:.1f} min"
        + (
            f", of which {meta['waited_s'] / 60:.1f} min waiting for a quiet machine"
            if meta.get("waited_s", 0) >= 1
            else ""
        )
        + (" (QUICK smoke run)" if s["quick"] else "")
        + ".",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; CPUs busy before the "
        f"run {meta['busy_before']:.0%}, after {meta['busy_after']:.0%} (load average before: "
        f"{meta['loadavg_before']})",
        f"- Servers: {m['sidecar']} on "
        + (m["python"] if m["python"].startswith("CPython") else f"Python {m['python']}")
        + f" + uvloop {m['uvloop']}; "
        f"{m['dnsmasq']}; Unbound {m['unbound'].replace('Version ', '')}; upstream {m['nsd']}; "
        f"load from dnsperf {m['dnsperf']}",
        f"- Method: {s['rounds']} round(s), servers started afresh each round and measured in a "
        "rotated order; medians of rounds. Every measure but the fills' all-miss rate runs each "
        "server once in order and once in reverse order (A B C C B A): QPS the mean of the two "
        "runs, latencies the percentiles of both halves pooled; ratios in the "
        "targets are medians of per-round ratios. Server pinned to CPU "
        f"{s['server_cpu']}, dnsperf, NSD and the benchmark to CPU {s['load_cpu']}. "
        "Throughput runs: "
        f"{s['hit_seconds']:g} s, dnsperf -c {s['clients']} -q {s['outstanding']}, UDP, no "
        f"EDNS; {s['hit_names']:,} cached names (one A each), {s['services']} discovery names "
        f"(4 A each). Latency: {s['latency_seconds']:g} s runs. Burst: {s['burst_queries']} "
        f"identical misses x {s['bursts']} names per round, upstream delayed "
        f"{s['proxy_delay'] * 1000:g} ms, counted at a relay in front of NSD. See "
        "bench/README.md for every measure.",
        "",
        "## Targets (performance issue)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in targets(results):
        lines.append(
            f"| {target} | {measured} | {'yes' if met else 'no' if met is False else '-'} |"
        )
    lines += ["", "## All measures", "", *summary_table(results), ""]
    lines += [
        "Ratios are server / dnsmasq: above 1 is better for QPS, below 1 is better for latency, "
        "time and memory. The shaped sidecar (`--health-check local=tcp:PORT`, endpoints up) is "
        "measured only where it differs: discovery names, start-up and idle RSS; the "
        "multi-process sidecar (if any) on throughput, coalescing, start-up and RSS. dnsmasq "
        "allocates its whole cache (`--cache-size`, sized for the growth measure) at start, so "
        "its RSS is the same idle and full.",
        "",
        "## Cache-hit QPS by round",
        "",
        *rounds_table(results),
        "",
    ]
    for label in columns(results):
        if not label.startswith("sidecar-w"):
            continue
        one, many = median(results.hits_qps.get("sidecar")), median(results.hits_qps.get(label))
        lines += [
            "## Multi-core",
            "",
            f"`dns-sidecar --workers {label.removeprefix('sidecar-w')}` (SO_REUSEPORT, a cache "
            f"per worker), allowed on both CPUs while dnsperf keeps CPU 0: {many:,.0f} cache-hit "
            f"QPS, {many / one:.2f}x one sidecar process pinned to CPU 1 ({one:,.0f}); "
            f"{median(results.miss_qps.get(label)):,.0f} QPS with 5% misses; idle RSS of all "
            f"its processes {median(results.idle_rss_kib.get(label)) / MIB:.1f} MiB; "
            f"{median(results.burst_ratio.get(label)):.3f} upstream queries per client query in "
            "a burst (identical misses coalesce only within a worker). On this 2-core machine "
            "the workers share a core with the load generator, so this is a floor, not the "
            "scaling on a task with spare vCPUs.",
            "",
        ]
    own = median(results.burst_sidecar_own.get("sidecar"))
    if not math.isnan(own):
        answered = ", ".join(f"{k} {median(v):.0%}" for k, v in results.burst_answered.items() if v)
        lines += [
            f"Bursts: the sidecar's own count of upstream queries "
            f"(`dns_sidecar_upstream_request_duration_seconds_count`) gives {own:.3f} upstream "
            f"queries per client query, against "
            f"{median(results.burst_ratio.get('sidecar')):.3f} counted at the relay. "
            f"Burst queries answered: {answered}.",
            "",
        ]
    if results.shaped_answers:
        lines += [
            f"Shaped answers counted by the shaped sidecar during its discovery runs "
            f"(`dns_sidecar_answers_shaped_total`), per round: "
            f"{', '.join(f'{v:,.0f}' for v in results.shaped_answers)}.",
            "",
        ]
    if results.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in results.warnings), ""]
    lines += [
        "## Charts",
        "",
        "![QPS](qps.png)",
        "",
        "![Latency](latency.png)",
        "",
        "![Growth](growth.png)",
        "",
    ]
    return "\n".join(lines)


def charts(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results
    cols = columns(r)
    color: Callable[[str], str] = lambda c: COLORS.get(c, "#9467bd")  # noqa: E731

    # QPS bars, min-max of rounds as error bars.
    groups = [
        ("cache hits", r.hits_qps),
        ("discovery names", r.discovery_qps),
        ("5% misses", r.miss_qps),
        ("all misses", fill_rates(r)[1]),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(cols))
    for i, col in enumerate(cols):
        xs, ys, lo, hi = [], [], [], []
        for g, (_name, table) in enumerate(groups):
            if col in table:
                med = median(table[col])
                mn, mx = spread(table[col])
                xs.append(g + (i - (len(cols) - 1) / 2) * width)
                ys.append(med)
                lo.append(med - mn)
                hi.append(mx - med)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=col, color=color(col), capsize=2)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("queries per second (median, min-max)")
    ax.set_title("Throughput, server on one core, dnsperf on the other")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "qps.png", dpi=110)
    plt.close(fig)

    # Latency percentiles.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    panels: list[tuple[str, dict[str, dict[str, list[float]]]]] = [
        ("1 query in flight", r.latency_1),
        ("50% of each server's max", r.latency_half),
    ]
    for ax, (title, lat_table) in zip(axes, panels, strict=True):
        servers = [c for c in cols if c in lat_table]
        width = 0.8 / max(1, len(servers))
        for i, col in enumerate(servers):
            ys = [median(lat_table[col].get(k)) * 1e6 for k in PERCENTILE_KEYS]
            xs = [k + (i - (len(servers) - 1) / 2) * width for k in range(len(PERCENTILE_KEYS))]
            ax.bar(xs, ys, width, label=col, color=color(col))
        ax.set_xticks(range(len(PERCENTILE_KEYS)), PERCENTILE_KEYS)
        ax.set_yscale("log")
        ax.set_title(f"cache-hit latency, {title}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("microseconds (log)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    # Cost growth.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for col in cols:
        if col not in r.growth_rss_kib:
            continue
        ns = sorted(int(k) for k in r.growth_rss_kib[col])
        ax1.plot(
            ns,
            [median(r.growth_rss_kib[col][str(n)]) / MIB for n in ns],
            "o-",
            label=col,
            color=color(col),
        )
        ax2.plot(
            ns, [median(r.growth_qps[col][str(n)]) for n in ns], "o-", label=col, color=color(col)
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("distinct cached names")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title("memory")
    ax2.set_ylabel("cache-hit QPS")
    ax2.set_title("throughput over all cached names")
    ax2.set_ylim(bottom=0)
    ax1.set_ylim(bottom=0)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=110)
    plt.close(fig)


def write(results: Results, meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(markdown(results, meta))
    charts(results, out)
