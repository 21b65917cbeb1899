"""HTML reports of one or more runs: ``write_report(runs, out_html)`` (``replay report``, ``replay compare``).

The report is ONE self-contained file: plots are inline SVG drawn by matplotlib's Agg-based SVG backend
(text as paths, so no fonts are needed), the style sheet is inline, there is no script and nothing is
fetched, so it opens offline in any browser. It is deterministic -- the same runs give byte-identical
HTML -- because the SVG writer gets a fixed hash salt per figure and no date metadata, and nothing in the
page depends on the clock or the machine.

Sections (ids are stable; tests and users link to them): ``summary`` (the answer first: who wins on
downtime, guest slowdown, total time and bytes sent, and by how much (``replay.analysis.headline``); then status
and key numbers), ``plots``
(pages sent and dirty pages per round, cumulative bytes over time, agents over time, guest slowdown,
post-copy fault latency histogram when any run has one), ``metrics`` (every metric side by side, grouped
as in ``replay.analysis.diff``; those zero or absent in every run folded into one closed line, ``folded``), ``runs`` (each run's digests, invariants and effective parameters in a
collapsible ``<details>``).
"""

from __future__ import annotations

import html
import io
import re
from pathlib import Path
from typing import Any, Sequence

from .diff import GROUPS, diff_runs, flatten, fmt, metric_group, metric_rows
from .headline import all_blank, demand_text, folded_line, headline_lines
from ..core.records import write_atomic
from ..runs.record import Run

# Colour-blind-safe palette (Okabe-Ito), one colour per run in the order given.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0 1em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
tr.group th { background: #f4f4f4; text-transform: uppercase; font-size: .8em; letter-spacing: .05em; }
tr.differs td { background: #fff6e0; } tr.differs td:first-child { border-left: 3px solid #E69F00; }
.ok { color: #08752b; font-weight: 600; } .bad { color: #b00020; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #e4e4e4; border-radius: 6px; padding: .5em; background: #fff; }
figcaption { font-size: .85em; color: #555; margin-top: .3em; }
figure svg { width: 100%; height: auto; }
code, .digest { font-family: ui-monospace, monospace; font-size: .85em; }
details { margin: .5em 0 1em; } summary { cursor: pointer; font-weight: 600; }
ul.headline { font-size: 1.1em; line-height: 1.5; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: -.1em;
          margin-right: .35em; }
"""


def labels(runs: Sequence[Run]) -> list[str]:
    """A short distinct label per run: strategy/mode, with the directory name when those collide."""
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.path.name})" for n, r in zip(names, runs)]


# ------------------------------------------------------------------------------------------------ plots


def _legend(ax) -> None:
    """The runs' legend, if any run drew something (a run with no rounds draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)


def svg_of(fig, salt: str) -> str:
    """Render ``fig`` to an inline <svg> element, deterministically."""
    import matplotlib

    buf = io.StringIO()
    # A per-figure salt keeps generated ids (clip paths) distinct between the figures of one page and
    # stable between runs; metadata Date=None drops the timestamp matplotlib would otherwise embed.
    with matplotlib.rc_context({"svg.hashsalt": f"snp-replay-{salt}", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: we are inside HTML
    # Give glyph/clip ids a per-figure prefix so several inline SVGs never share an id in one document.
    return re.sub(r'(id="|xlink:href="#|url\(#)', lambda m: f"{m.group(1)}{salt}-", text)


def _figure(title: str, xlabel: str, ylabel: str, size=(6.4, 3.4)):
    # A bare Figure, not pyplot: no global figure registry, no GUI backend, nothing to close.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    ax = fig.subplots()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    return fig, ax


def _plot_pages(runs, names) -> str:
    fig, ax = _figure("Pages sent and dirty pages per round", "round", "pages")
    for i, (run, name) in enumerate(zip(runs, names)):
        r = run.rounds.sort("round")
        c = COLORS[i % len(COLORS)]
        # Earlier runs are drawn wider so identical curves stay visible underneath later ones.
        lw = 3.2 if i == 0 and len(runs) > 1 else 1.6
        ax.plot(r["round"].to_list(), r["pages_sent"].to_list(), "-o", color=c, ms=4, lw=lw, label=f"{name}: sent")
        ax.plot(r["round"].to_list(), r["dirty_pages"].to_list(), "--s", color=c, ms=3, alpha=0.7,
                label=f"{name}: dirty")
    ax.set_yscale("symlog", linthresh=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax)
    return svg_of(fig, "pages")


def _plot_bytes(runs, names) -> str:
    import polars as pl

    fig, ax = _figure("Bytes sent over time", "virtual time (ms)", "cumulative bytes sent (MiB)")
    for i, (run, name) in enumerate(zip(runs, names)):
        r = run.rounds.sort("round").with_columns(pl.col("bytes_sent").cum_sum().alias("cum"))
        # Start at the first round's start with zero bytes so each line begins on the time axis.
        xs = [r["start_ns"][0] / 1e6] + [v / 1e6 for v in r["end_ns"].to_list()] if r.height else []
        ys = [0.0] + [v / 2**20 for v in r["cum"].to_list()] if r.height else []
        lw = 3.2 if i == 0 and len(runs) > 1 else 1.6
        ax.plot(xs, ys, "-o", color=COLORS[i % len(COLORS)], ms=3, lw=lw, label=name)
    _legend(ax)
    return svg_of(fig, "bytes")


def _plot_agents(runs, names) -> str:
    fig, ax = _figure("Agents over time", "virtual time (ms)", "agents")
    for i, (run, name) in enumerate(zip(runs, names)):
        r = run.rounds.sort("round")
        if not r.height:
            continue
        xs = [v / 1e6 for v in r["start_ns"].to_list()] + [r["end_ns"][-1] / 1e6]
        ys = r["agents"].to_list()
        ax.step(xs, ys + ys[-1:], where="post", color=COLORS[i % len(COLORS)],
                lw=3.6 if i == 0 and len(runs) > 1 else 1.8, label=name)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    _legend(ax)
    return svg_of(fig, "agents")


def _plot_slowdown(runs, names) -> str:
    """Downtime against guest slowdown, one point per run: a lower downtime bought by taking the guest's
    CPU (shadow agents, throttling) shows up and to the left, not as a plain win."""
    fig, ax = _figure("Trade-off: downtime vs guest slowdown", "downtime (ms)", "guest slowdown (%)", size=(6.4, 3.4))
    for i, (run, name) in enumerate(zip(runs, names)):
        x = run.metrics.get("downtime_ns", 0) / 1e6
        y = run.metrics.get("guest_slowdown_ppm", 0) / 1e4
        ax.scatter([x], [y], color=COLORS[i % len(COLORS)], s=40, zorder=3)
        ax.annotate(f"{name}\n{x:.2f} ms, {y:.2f}%", (x, y), fontsize=7, textcoords="offset points", xytext=(6, 4))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, color="#e6e6e6")
    return svg_of(fig, "slowdown")


def _plot_latency(runs, names) -> str | None:
    hists = [(run.metrics.get("postcopy") or {}).get("latency_hist") or [] for run in runs]
    if not any(sum(b["count"] for b in h) for h in hists):
        return None
    buckets = sorted({(b["bucket_us_lo"], b["bucket_us_hi"]) for h in hists for b in h})
    fig, ax = _figure("Post-copy fault latency", "latency bucket (µs)", "faults")
    width = 0.8 / len(runs)
    for i, (h, name) in enumerate(zip(hists, names)):
        counts = {(b["bucket_us_lo"], b["bucket_us_hi"]): b["count"] for b in h}
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, [counts.get(k, 0) for k in buckets], width=width, color=COLORS[i % len(COLORS)], label=name)
    ax.set_xticks(range(len(buckets)), [f"{lo}–{hi}" for lo, hi in buckets], fontsize=8, rotation=30)
    ax.grid(False, axis="x")
    _legend(ax)
    return svg_of(fig, "latency")


# ------------------------------------------------------------------------------------------------- html


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'


def _summary_table(runs, names) -> str:
    keys = [("status", None), ("total_ns", "total"), ("downtime_ns", "downtime"),
            ("guest_slowdown_ppm", "guest slowdown (ppm)"), ("setup_ns", "setup"), ("rounds", "rounds"),
            ("bytes_sent", "bytes sent")]
    head = "".join(f'<th class="num">{esc(label or k)}</th>' for k, label in keys)
    rows = []
    for i, (run, name) in enumerate(zip(runs, names)):
        s = run.summary
        status_cls = "ok" if s["status"] == "completed" else "bad"
        reason = f" — {esc(s.get('status_reason'))}" if s.get("status_reason") else ""
        cells = [f'<td class="num"><span class="{status_cls}">{esc(s["status"])}</span>{reason}</td>']
        cells += [f'<td class="num">{esc(fmt(run.metrics.get(k, "")))}</td>' for k, _ in keys[1:]]
        kernel = s.get("kernel", {}) or {}
        cells.append(f"<td>{esc(kernel.get('verdict', ''))}</td>")
        cells.append(f"<td>{esc(demand_text(s))}</td>")
        rows.append(f"<tr><td>{swatch(i)}{esc(name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>run</th>{head}<th>kernel</th><th>guest CPU demand</th></tr>{''.join(rows)}</table>"


def _metrics_table(runs, names, all_metrics: bool = False) -> str:
    """Every metric side by side; those zero or absent in every run are folded into one closed
    ``<details>`` line saying how many (``all_metrics``: shown in place instead)."""
    flats = [flatten({k: v for k, v in r.metrics.items()}) for r in runs]
    # latency_hist is plotted, not tabulated (it is a list of buckets)
    flats = [{k: v for k, v in f.items() if ".latency_hist" not in k} for f in flats]
    two = len(runs) == 2
    rows_by_name = {row.name: row for row in metric_rows(*runs)} if two else {}
    order = list(rows_by_name) if two else sorted(
        set().union(*flats), key=lambda n: (GROUPS.index(metric_group(n)), n)
    )
    folded = [] if all_metrics else [n for n in order if all_blank([f.get(n) for f in flats])]
    head = "".join(f'<th class="num">{swatch(i)}{esc(n)}</th>' for i, n in enumerate(names))
    if two:
        head += '<th class="num">delta (B−A)</th><th class="num">change</th>'

    def table(names_: list[str]) -> str:
        out = [f"<table><tr><th>metric</th>{head}</tr>"]
        group = None
        for name in names_:
            g = metric_group(name)
            if g != group:
                group = g
                out.append(f'<tr class="group"><th colspan="{len(runs) + 1 + 2 * two}">{esc(g)}</th></tr>')
            values = [f.get(name) for f in flats]
            cls = ' class="differs"' if any(v != values[0] for v in values) else ""
            cells = "".join(f'<td class="num">{esc(fmt(v)) if v is not None else "—"}</td>' for v in values)
            if two:
                row = rows_by_name[name]
                delta = "" if row.delta is None else f"{row.delta:+,}" if row.delta else "0"
                cells += f'<td class="num">{esc(delta)}</td><td class="num">{esc(row.change)}</td>'
            out.append(f"<tr{cls}><td><code>{esc(name)}</code></td>{cells}</tr>")
        out.append("</table>")
        return "".join(out)

    shown = table([n for n in order if n not in set(folded)])
    if not folded:
        return shown
    line = folded_line(len(folded), "every run", "opening this line, or replay report --all-metrics,")
    return f'{shown}<details id="folded"><summary>{esc(line)}</summary>{table(folded)}</details>'


def _headline(runs, names) -> str:
    """The answer first: who wins on downtime, guest slowdown, total time and bytes, and by how much."""
    if len(runs) < 2:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in headline_lines([r.summary for r in runs], names))
    return f'<ul class="headline">{items}</ul>'


def _comparison(runs) -> str:
    """For exactly two runs: the diff verdict and the parameters that differ."""
    if len(runs) != 2:
        return ""
    result = diff_runs(runs[0], runs[1])
    cls = "ok" if result.reasons == [] else "bad"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in result.reasons)
    params = "".join(
        f"<tr><td><code>{esc(p.key)}</code></td><td>{esc(fmt(p.a))}</td><td>{esc(fmt(p.b))}</td></tr>"
        for p in result.params
    )
    params_html = (
        f"<table><tr><th>parameter</th><th>A</th><th>B</th></tr>{params}</table>"
        if params else "<p>Same scenario and strategy: every resolved parameter is equal.</p>"
    )
    return (
        f'<p>Comparison (A = first run, B = second): <span class="{cls}">{esc(result.verdict().removeprefix("diff: "))}</span></p>'
        f"<ul>{reasons}</ul><h3>Parameters that differ</h3>{params_html}"
    )


def _data_section(s: dict) -> str:
    """Data mode's security facts: the handshake's steps and verdicts, the token, the channel's counts."""
    data, sec = s.get("data"), (s.get("metrics") or {}).get("security")
    if not isinstance(data, dict) or not isinstance(sec, dict):
        return ""
    steps = "".join(
        f"<tr><td>{esc(st.get('actor', ''))}</td><td>{esc(st.get('action', ''))}</td><td>{esc(st.get('verdict', ''))}</td></tr>"
        for st in data.get("handshake") or [] if isinstance(st, dict))
    src, dst = sec.get("source") or {}, sec.get("target") or {}
    streams = "".join(f"<tr><td>{esc(k)}</td><td class=\"num\">{esc(fmt(v))}</td></tr>"
                      for k, v in sorted((src.get("sequences") or {}).items()))
    facts = [("handshake", sec.get("handshake_verdict", "")), ("validation token", sec.get("token", "")),
             ("stopped by", sec.get("detected_by", "") or "-"),
             ("page bytes before compression", fmt(src.get("payload_bytes", 0))),
             ("after compression (zstd level " + str(sec.get("zstd_level", 0)) + ")", fmt(src.get("compressed_bytes", 0))),
             ("sealed bytes on the wire", fmt(src.get("wire_bytes", 0))),
             ("shared pages sent unprotected", fmt(sec.get("shared_pages_unprotected", 0))),
             ("target's verdicts", ", ".join(f"{k}: {v}" for k, v in sorted((dst.get("outcomes") or {}).items())))]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts)
    return (f"<h4>Data mode: the attested, sealed channel</h4><table><tr><th>fact</th><th>value</th></tr>{rows}</table>"
            f"<table><tr><th>side</th><th>handshake step</th><th>verdict</th></tr>{steps}</table>"
            f"<table><tr><th>stream</th><th>packets (sequence numbers used)</th></tr>{streams}</table>")


def _adversary_table(s: dict) -> str:
    """The run's adversary actions and what came of each (data mode with [[adversary]] entries)."""
    acts = s.get("adversary") or []
    if not acts:
        return ""
    def acted(a: dict) -> str:  # records before the phase was recorded have none: nothing to show
        return f'{a.get("phase", "")} @ {a["applied_ns"]} ns' if a["outcome"] != "not_reached" and a.get("phase") else ""

    rows = "".join(
        f'<tr><td>{esc(a["kind"])}</td><td>{esc(a["at"])}</td><td>{esc(acted(a))}</td>'
        f'<td class="{"ok" if a["outcome"] == "detected" else ""}">'
        f'{esc(a["outcome"])}</td><td>{esc(a["detected_by"])}</td><td>{esc(a.get("effect", ""))}</td></tr>' for a in acts)
    eff = s.get("adversary_effects") or {}
    return (f'<table><tr><th>adversary action</th><th>at</th><th>acted</th><th>outcome</th><th>detected by</th>'
            f'<th>effect</th></tr>{rows}</table>'
            f'<p class="sub">pages lost {esc(eff.get("pages_lost", 0))} · end plaintext differs from no migration: '
            f'{esc(fmt(eff.get("plaintext_end_differs", False)))}</p>')


def _run_section(i: int, run: Run, name: str) -> str:
    s = run.summary
    digests = "".join(
        f'<tr><td>{esc(k)}</td><td class="digest">{esc(v) if v else "(not reached)"}</td></tr>'
        for k, v in s["digests"].items()
    )
    # An adversary's expected effects (shared-page tampering, a host's RMP #PF) are reported, not failures.
    explained = (s.get("adversary_effects") or {}).get("explains", [])
    inv = "".join(
        f'<tr><td>{esc(k)}</td><td class="{"ok" if v or k in explained else "bad"}">{esc(fmt(v))}'
        f'{" (the adversary&#x27;s, expected)" if k in explained and not v else ""}</td></tr>'
        for k, v in (s.get("invariants") or {}).items()
    )
    params = "".join(
        f"<tr><td><code>{esc(k)}</code></td><td>{esc(fmt(v))}</td></tr>" for k, v in flatten(s["scenario"]).items()
    )
    tool = s.get("tool") or {}
    return f"""
<h3>{swatch(i)}{esc(name)}</h3>{_data_section(s)}
<p class="sub"><code>{esc(run.path)}</code> · status <b>{esc(s["status"])}</b>{" — " + esc(s.get("status_reason")) if s.get("status_reason") else ""}
 · trace <span class="digest">{esc(str(s["trace"].get("digest", ""))[:16])}</span> ({esc(fmt(s["trace"].get("events", "")))} events)
 · {esc(tool.get("name", ""))} {esc(tool.get("version", ""))} ({esc(tool.get("engine", ""))} engine)</p>
<table><tr><th>digest</th><th>value</th></tr>{digests}</table>
<table><tr><th>invariant</th><th>holds</th></tr>{inv}</table>
{_adversary_table(s)}
<details><summary>Effective parameters ({len(flatten(s["scenario"]))})</summary>
<table><tr><th>parameter</th><th>value</th></tr>{params}</table></details>
"""


def render_html(runs: Sequence[Run], *, all_metrics: bool = False) -> str:
    """The report as a string (see the module docstring for its sections); ``all_metrics`` shows the
    metrics that are zero or absent in every run in place instead of folding them."""
    if not runs:
        raise ValueError("a report needs at least one run")
    runs = list(runs)
    names = labels(runs)
    figures = [
        ("Pages sent (solid) and dirty pages at each sync (dashed), per round.", _plot_pages(runs, names)),
        ("Cumulative bytes on the wire against virtual time (each point: end of a round).",
         _plot_bytes(runs, names)),
        ("Migration agents working in each round (mirror-VM vCPUs or shadow vCPUs).", _plot_agents(runs, names)),
        ("Downtime and guest slowdown side by side (both lower is better): the trade-off.",
         _plot_slowdown(runs, names)),
    ]
    latency = _plot_latency(runs, names)
    if latency:
        figures.append(("Post-copy remote fault latency histogram.", latency))
    figs = "".join(f"<figure>{svg}<figcaption>{esc(cap)}</figcaption></figure>" for cap, svg in figures)
    title = "snp-replay: " + " vs ".join(names)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="sub">Migration run report · {len(runs)} run(s) · scenario {esc(runs[0].summary["scenario"].get("name", ""))}</p>
<section id="summary"><h2>Summary</h2>{_headline(runs, names)}{_summary_table(runs, names)}{_comparison(runs)}</section>
<section id="plots"><h2>Plots</h2><div class="grid">{figs}</div></section>
<section id="metrics"><h2>Metrics</h2>{_metrics_table(runs, names, all_metrics)}</section>
<section id="runs"><h2>Runs</h2>{"".join(_run_section(i, r, n) for i, (r, n) in enumerate(zip(runs, names)))}</section>
</body></html>
"""


def write_report(runs: Sequence[Run], out_html: str | Path, *, all_metrics: bool = False) -> Path:
    """Write the self-contained HTML report of ``runs`` to ``out_html`` atomically; returns the path."""
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_html(runs, all_metrics=all_metrics).encode("utf-8"))
    return out
