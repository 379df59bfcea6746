"""Pictures for serving at scale: goodput and p99 TTFT against the offered rate (with the knee marked), and what
replicas and routing policies bought."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from labkit.results import Record
from labkit.viz.plots import new_figure


def load_curve(rec: Record) -> Figure | None:
    """Goodput and p99 TTFT against the offered rate, min–max bands over the repeats, the knee marked."""
    rows = sorted((v for v in rec.variants if v["name"].startswith("rate-")), key=lambda v: v["offered_rps"])
    if not rows:
        return None
    x = [v["offered_rps"] for v in rows]
    fig = new_figure((11, 3.8))
    a, b = fig.subplots(1, 2)
    a.plot(x, x, ls="--", color="#999", label="offered")
    if all("request_rps" in v for v in rows):
        a.plot(x, [v["request_rps"] for v in rows], "s:", color="#777", label="completed (any latency)")
    a.plot(x, [v["goodput_rps"] for v in rows], "o-", color="#4C72B0", label="goodput (within the SLO)")
    a.fill_between(x, [v["goodput_rps_min"] for v in rows], [v["goodput_rps_max"] for v in rows], alpha=0.2)
    b.plot(x, [v["ttft_ms_p99"] for v in rows], "o-", color="#C44E52", label="p99 TTFT")
    b.fill_between(x, [v["ttft_ms_p99_min"] for v in rows], [v["ttft_ms_p99_max"] for v in rows], alpha=0.2,
                   color="#C44E52")
    slo = rec.config.get("slo") or {}
    if slo.get("ttft_ms"):
        b.axhline(slo["ttft_ms"], ls=":", color="#555", label=f"SLO TTFT {slo['ttft_ms']:g} ms")
    k = rec.config.get("knee_rps")
    for ax in (a, b):
        if k is not None:
            ax.axvline(k, color="#2a7a2a", lw=1, label=f"knee {k:g} req/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{r:g}" for r in x])
        ax.minorticks_off()
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_ylabel("goodput (requests/s within the SLO)")
    b.set_ylabel("p99 time to first token (ms)")
    b.set_yscale("log")
    b.yaxis.set_major_formatter(ScalarFormatter())
    b.yaxis.set_minor_formatter(ScalarFormatter())
    a.set_title(f"{rows[0]['model']}: goodput against load", fontsize=10)
    b.set_title("p99 TTFT against load", fontsize=10)
    fig.tight_layout()
    return fig


def routing_bars(rec: Record) -> Figure | None:
    """Replicas (goodput, p99 TTFT) and routing policies (prefix-cache hit rate, median TTFT), side by side."""
    reps = [v for v in rec.variants if "replica" in v["name"] and "goodput_rps" in v]
    routes = [v for v in rec.variants if v["name"].startswith("route-")]
    if not reps and not routes:
        return None
    fig = new_figure((11, 3.4))
    a, b = fig.subplots(1, 2)
    for ax, rows, key, label in ((a, reps, "goodput_rps", "goodput (req/s) at the same offered load"),
                                 (b, routes, "prefix_hit_rate", "prompt tokens found in the prefix cache")):
        names = [v.get("policy", v["name"]) for v in rows]
        vals = [v[key] for v in rows]
        ax.barh(names, vals, color="#4C72B0")
        for i, val in enumerate(vals):
            ax.text(val, i, f" {val:.2f}" if key == "goodput_rps" else f" {100 * val:.0f} %", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    a.set_title("one replica, every core vs one replica a core", fontsize=10)
    b.set_title("routing chat traffic: round-robin vs cache-aware", fontsize=10)
    fig.tight_layout()
    return fig
