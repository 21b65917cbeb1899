#!/usr/bin/env python3
"""Mirror VM vs shadow vCPUs across link bandwidths: downtime and guest slowdown, the trade-off.

Runs ``replay.compare`` (both strategies on one trace) at each bandwidth on a small guest, collects the
headline metrics into a polars DataFrame, writes it as ``tradeoff.csv`` and plots downtime and guest
slowdown against bandwidth into ``tradeoff.png``::

    python examples/bandwidth_tradeoff.py --out runs/tradeoff --gbits 1,2.5,10,25

The guest is 16 MiB with 2 always-busy vCPUs (``guest.cpu_demand = "busy"``: every agent's CPU taken from
the guest shows as slowdown) and a 100 ms hot/cold trace (a 1 MiB hot set takes 90% of the writes), so the
whole script takes seconds; scale ``guest.size`` and ``trace.events`` up for real answers. Every
number plotted is a run record's (``runs/tradeoff/<gbit>/<strategy>/summary.json``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import polars as pl

import replay

STRATEGY_STYLE = {"mirror-vm": ("#0072B2", "o"), "shadow-vcpu": ("#D55E00", "s")}  # Okabe-Ito, as the reports

BASE = replay.make_scenario(
    name="bandwidth-tradeoff", seed=11,
    guest={"size": "16MiB", "vcpus": 2, "os_vmpl": 2, "cpu_demand": "busy"},
    trace={"generator": "hotcold", "events": 100_000, "rate": 1_000_000, "fill": True,
           "options": {"hot_bytes": 1_048_576, "hot_probability_ppm": 900_000}},
    migration={"start_ns": "5ms", "latency_ns": 50_000, "downtime_limit_ns": "1ms", "max_rounds": 30,
               "agents_max": 4},
)


def compare_bandwidths(out: Path, gbits: Sequence[float]) -> pl.DataFrame:
    """One ``replay.compare`` per bandwidth (Gbit/s) into ``out/<gbit>/``; a row per run."""
    rows = []
    for g in gbits:
        bytes_per_s = round(g * 125_000_000)  # 1 Gbit/s = 125,000,000 bytes/s
        c = replay.compare(replay.override(BASE, f"migration.bandwidth_bytes_per_s={bytes_per_s}"), out / f"{g:g}")
        for r in c.runs:
            rows.append({"gbit_s": float(g), "strategy": r.strategy, "status": r.status.value,
                         "downtime_ns": r.metrics["downtime_ns"], "guest_slowdown_ppm": r.metrics["guest_slowdown_ppm"],
                         "total_ns": r.metrics["total_ns"], "bytes_sent": r.metrics["bytes_sent"], "run": str(r.path)})
    return pl.DataFrame(rows).sort("strategy", "gbit_s")


def plot(df: pl.DataFrame, png: Path | None = None):
    """Downtime (ms) and guest slowdown (%) against bandwidth, a line per strategy; saved to ``png``."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    fig = Figure(figsize=(9, 3.6), dpi=100)
    down, slow = fig.subplots(1, 2)
    for strategy, part in df.group_by("strategy", maintain_order=True):
        name = strategy[0]
        color, marker = STRATEGY_STYLE.get(name, ("#000000", "^"))
        x = part["gbit_s"].to_list()
        down.plot(x, (part["downtime_ns"] / 1e6).to_list(), marker=marker, color=color, label=name)
        slow.plot(x, (part["guest_slowdown_ppm"] / 1e4).to_list(), marker=marker, color=color, label=name)
    ticks = sorted(set(df["gbit_s"].to_list()))
    for ax, what in ((down, "downtime (ms)"), (slow, "guest slowdown (%)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("link bandwidth (Gbit/s)")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
        ax.grid(True, color="#e6e6e6")
        ax.legend(frameon=False, fontsize=8)
    down.set_title("Downtime: lower is better", fontsize=10)
    slow.set_title("Guest slowdown: the price of the agents", fontsize=10)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, format="png", metadata={"Software": None})
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/tradeoff"), help="directory for the runs, CSV and PNG")
    p.add_argument("--gbits", default="1,2.5,10,25", help="bandwidths in Gbit/s, comma-separated")
    args = p.parse_args(argv)
    gbits = [float(x) for x in args.gbits.split(",")]
    df = compare_bandwidths(args.out, gbits)
    df.write_csv(args.out / "tradeoff.csv")
    plot(df, args.out / "tradeoff.png")
    print(df.select("gbit_s", "strategy", "status", "downtime_ns", "guest_slowdown_ppm"))
    print(f"wrote {args.out / 'tradeoff.png'} and {args.out / 'tradeoff.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
