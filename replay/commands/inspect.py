"""``replay inspect FILE``: a trace's metadata, op counts, write rate and working set over time."""

from __future__ import annotations

import argparse
import sys

from ..core.records import canonical_json
from ..core.units import format_bytes, format_ns, parse_duration_ns


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="trace file (.arrow)")
    parser.add_argument("--json", action="store_true", help="print canonical JSON instead of text")
    parser.add_argument("--allow-memory", action="store_true",
                        help="inspect even if the estimated memory exceeds what the machine has available")
    parser.add_argument("--interval", default=None, help="interval for the rate and working-set curves, e.g. 50ms (default: span/20, rounded)")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(s: dict) -> str:
    m = s["meta"]
    src = m["source"]
    shared = sum(last - first + 1 for first, last in m["shared_ranges"])
    out = [
        f"trace       {s['path']}",
        f"digest      {m['digest']}",
        f"guest       {format_bytes(m['guest_bytes'])} ({s['guest_pages']} pages, {shared} shared at start), {m['vcpus']} vcpus",
        "source      " + ", ".join(f"{k}={v}" for k, v in sorted(src.items())),
        f"events      {s['events']}",
        f"span        {format_ns(s['span_ns'])} ({s['t_first_ns']}..{s['t_last_ns']} ns)",
        f"written     {s['pages_written']} distinct pages ({format_bytes(s['pages_written'] * 4096)}), {s['bytes_written']} bytes",
        f"write rate  {s['writes_per_s']} writes/s",
        "activity    " + (f"vCPUs busy {s['busy_ppm'] / 10_000:.1f}% of the time up to the last event "
                          f"({s['idle_intervals']} idle intervals recorded)" if s["idle_intervals"] is not None
                          else "no idle intervals recorded: read as every vCPU busy up to the last event"),
        "",
    ]
    out += _table(["op", "events"], [[k, str(v)] for k, v in s["ops"].items()])
    out.append("")
    out.append(f"per interval of {format_ns(s['interval_ns'])} (pages = distinct pages written: the writable working set)")
    out += _table(
        ["start", "writes", "writes/s", "pages"],
        [[format_ns(iv["start_ns"] - s["t_first_ns"]), str(iv["writes"]), str(iv["writes_per_s"]), str(iv["pages_written"])] for iv in s["intervals"]],
    )
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..api import inspect

    interval = None if args.interval is None else parse_duration_ns(args.interval, "--interval")
    summary = inspect(args.file, interval_ns=interval, allow_memory=args.allow_memory)
    if args.json:
        sys.stdout.write(canonical_json(summary).decode())
    else:
        sys.stdout.write(render(summary))
    return 0
