"""HTML report of a sweep directory (``replay report SWEEP_DIR --out FILE.html``).

It shows what a user decides by: for each swept axis (other than strategy and seed), downtime, total
migration time, bytes sent and guest slowdown against that axis, one line per strategy (and per mode
when modes are swept), at the median over the seeds and the other axes, with the min..max spread as a
shaded band; then a table of where each strategy wins: for every setting of the swept axes except
strategy and seed, which strategy has the lower median over seeds for each of those four metrics.
Against an axis of categories (modes, say) the medians are points with min..max error bars, not lines.

Only completed runs are plotted and compared (an aborted or failed migration has no meaningful downtime);
the header counts the others. The page is one self-contained, deterministic HTML file like the run
report (``replay.analysis.report``): inline SVG from matplotlib with fixed hash salts and no dates.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from ..analysis.diff import fmt
from ..core.errors import RunDirError
from ..core.records import write_atomic
from ..runs.record import MAX_SUMMARY, content_hash, read_record_file
from ..analysis.report import COLORS, CSS, esc, svg_of, swatch
from .sweep import FIXED_COLUMNS, SWEEP_FORMAT, SWEEP_JSON, TABLE
from ..core.validate import load_json

# (table column, label, scale to the plotted unit, unit). Lower is better for every one of them.
PLOTTED = (
    ("downtime_ns", "downtime", 1e-6, "ms"),
    ("total_ns", "total migration time", 1e-6, "ms"),
    ("bytes_sent", "bytes sent", 1 / 2**20, "MiB"),
    ("guest_slowdown_ppm", "guest slowdown", 1e-4, "%"),
)
LINESTYLES = ("-", "--", ":", "-.")
NOT_PLOTTED_AXES = ("strategy", "seed")  # strategy is the lines; seeds are the spread


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_JSON).is_file()


def load_sweep_dir(path: str | Path):
    """(sweep record, results DataFrame) of a sweep directory; RunDirError naming what is wrong."""
    import polars as pl

    path = Path(path)
    where = path / SWEEP_JSON
    record = load_json(read_record_file(where, MAX_SUMMARY), str(where))
    if not isinstance(record, dict) or record.get("format") != SWEEP_FORMAT:
        raise RunDirError(f"{where}: not a sweep record (format {SWEEP_FORMAT!r} expected)")
    table = path / TABLE
    try:
        data = read_record_file(table)
    except RunDirError as exc:
        raise RunDirError(f"{table}: cannot read the results table ({str(exc).removeprefix(f'{table}: ')})") from None
    tables = record.get("tables")
    if not isinstance(tables, dict) or tables.get(TABLE) != content_hash(data):
        raise RunDirError(f"{table}: content hash does not match {SWEEP_JSON} (tampered or truncated)")
    axes = record.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, dict) and isinstance(a.get("keys"), list) for a in axes):
        raise RunDirError(f"{where}: malformed sweep record (its axes)")
    try:
        df = pl.read_parquet(io.BytesIO(data))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise RunDirError(f"{path / TABLE}: cannot read the results table ({' '.join(str(exc).split())})") from None
    return record, df


def _axes(record: dict, df) -> list[str]:
    """Table columns of the swept axes to plot against, in sweep order."""
    cols = [FIXED_COLUMNS.get(k, k) for a in record["axes"] for k in a["keys"]]
    return [c for c in cols if c not in NOT_PLOTTED_AXES and c in df.columns]


def _lines(df, x: str) -> list[tuple[str, str | None]]:
    """(strategy, mode or None) for each line of a plot against ``x``."""
    modes = sorted(df["mode"].unique().to_list()) if x != "mode" and df["mode"].n_unique() > 1 else [None]
    return [(s, m) for s in sorted(df["strategy"].unique().to_list()) for m in modes]


def _plot_axis(df, x: str, salt: str) -> str:
    import polars as pl

    xs = sorted(df[x].unique().to_list())
    pos = {v: i for i, v in enumerate(xs)}
    strategies = sorted(df["strategy"].unique().to_list())
    modes = sorted(df["mode"].unique().to_list())
    numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in xs)
    lines = _lines(df, x)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.4), dpi=100)
    axs = fig.subplots(2, 2).ravel()
    for ax, (col, label, scale, unit) in zip(axs, PLOTTED):
        ax.set_title(f"{label} ({unit})", fontsize=10)
        ax.grid(True, color="#e6e6e6", linewidth=0.8)
        ax.set_axisbelow(True)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        for strategy, mode in lines:
            sel = df.filter(pl.col("strategy") == strategy)
            if mode is not None:
                sel = sel.filter(pl.col("mode") == mode)
            agg = (sel.group_by(x).agg(pl.col(col).min().alias("lo"), pl.col(col).median().alias("mid"),
                                       pl.col(col).max().alias("hi")).sort(x))
            if not agg.height:
                continue
            px = [pos[v] for v in agg[x].to_list()]
            color = COLORS[strategies.index(strategy) % len(COLORS)]
            style = LINESTYLES[modes.index(mode) % len(LINESTYLES)] if mode else "-"
            name = strategy if mode is None else f"{strategy}, {mode}"
            lo, mid, hi = ([v * scale for v in agg[c].to_list()] for c in ("lo", "mid", "hi"))
            if numeric:
                ax.plot(px, mid, style, marker="o", ms=4, color=color, label=name)
                ax.fill_between(px, lo, hi, color=color, alpha=0.15, linewidth=0)
            else:  # categories (modes, workloads): no line between them; min..max as error bars
                i, n = lines.index((strategy, mode)), len(lines)
                off = [p + (i - (n - 1) / 2) * 0.3 / max(1, n - 1) for p in px]
                ax.errorbar(off, mid, yerr=[[m - a for m, a in zip(mid, lo)], [b - m for m, b in zip(mid, hi)]],
                            fmt="o", ms=5, capsize=3, color=color, label=name)
        ax.set_xticks(range(len(xs)), [fmt(v) for v in xs], fontsize=8)
        if not numeric:
            ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylim(bottom=0)
    axs[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return svg_of(fig, salt)


def wins(df, settings: Sequence[str]):
    """One row per setting of ``settings``: for each plotted metric, the strategy with the lowest median
    over seeds, "tie" when they are equal, and the runner-up's excess over the winner in percent."""
    import polars as pl

    med = df.group_by([*settings, "strategy"]).agg(
        [pl.col(c).median().alias(c) for c, *_ in PLOTTED] + [pl.len().alias("runs")])
    rows = []
    keys = med.select(settings).unique().sort(settings).rows() if settings else [()]
    for setting in keys:
        sel = med
        for k, v in zip(settings, setting):
            sel = sel.filter(pl.col(k) == v)
        row: dict[str, Any] = dict(zip(settings, setting))
        for col, *_ in PLOTTED:
            ranked = sorted(zip(sel[col].to_list(), sel["strategy"].to_list()))
            if len(ranked) < 2:
                row[col] = (ranked[0][1], None) if ranked else ("—", None)
            elif ranked[0][0] == ranked[1][0]:
                row[col] = ("tie", None)
            else:
                best, second = ranked[0][0], ranked[1][0]
                row[col] = (ranked[0][1], None if best == 0 else round((second - best) * 100 / best))
        rows.append(row)
    return rows


def _wins_table(rows, settings: Sequence[str], strategies: Sequence[str]) -> str:
    head = "".join(f"<th>{esc(s)}</th>" for s in settings)
    head += "".join(f"<th>{esc(label)}</th>" for _, label, _, _ in PLOTTED)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{esc(fmt(row[s]))}</td>' for s in settings)
        for col, *_ in PLOTTED:
            who, margin = row[col]
            sw = swatch(strategies.index(who)) if who in strategies else ""
            extra = f" (others +{margin}%)" if margin else ""
            cells += f"<td>{sw}{esc(who)}{esc(extra)}</td>"
        body.append(f"<tr>{cells}</tr>")
    counts = []
    for col, label, *_ in PLOTTED:
        per = {s: sum(1 for r in rows if r[col][0] == s) for s in strategies}
        counts.append(f"<li>{esc(label)}: " + ", ".join(f"{swatch(i)}{esc(s)} wins {per[s]}" for i, s in enumerate(strategies))
                      + f" (of {len(rows)} settings)</li>")
    return f"<ul>{''.join(counts)}</ul><table><tr>{head}</tr>{''.join(body)}</table>"


def render_sweep_html(record: dict, df) -> str:
    import polars as pl

    total = df.height
    by_status = {s: n for s, n in df.group_by("status").len().sort("status").rows()}
    done = df.filter(pl.col("status") == "completed")
    axes = _axes(record, df)
    strategies = sorted(done["strategy"].unique().to_list()) if done.height else []
    figs = []
    for i, x in enumerate(axes):
        if done.height:
            figs.append(f"<figure>{_plot_axis(done, x, f'axis{i}')}<figcaption>Against <code>{esc(x)}</code>: "
                        "median over seeds and the other swept axes; the band spans their min..max.</figcaption></figure>")
    settings = axes
    win_rows = wins(done, settings) if done.height else []
    status = ", ".join(f"{n} {esc(s)}" for s, n in by_status.items())
    name = record.get("name", "")
    axes_list = "".join(
        f"<li><code>{esc(', '.join(a['keys']))}</code>: {esc('; '.join(', '.join(fmt(v) for v in vs) for vs in a['values']))}</li>"
        for a in record["axes"])
    errors = df.filter(pl.col("status") == "error").select("point", "error").rows()
    err_html = "".join(f"<tr><td class='num'>{p}</td><td>{esc(e)}</td></tr>" for p, e in errors)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>snp-replay sweep: {esc(name)}</title><style>{CSS}</style></head>
<body>
<h1>snp-replay sweep: {esc(name)}</h1>
<p class="sub">{esc(record.get("description", ""))} · {total} points: {status}</p>
<section id="axes"><h2>Axes</h2><ul>{axes_list}</ul></section>
<section id="plots"><h2>Plots</h2>{"".join(figs) or "<p>No completed runs, or no axis besides strategy and seed.</p>"}</section>
<section id="wins"><h2>Where each strategy wins</h2>
<p>For each setting, the strategy with the lowest median over seeds (lower is better for all four), and by how much the other is higher.</p>
{_wins_table(win_rows, settings, strategies) if win_rows else "<p>No completed runs.</p>"}</section>
<section id="errors"><h2>Errors</h2>{f"<table><tr><th>point</th><th>error</th></tr>{err_html}</table>" if errors else "<p>None.</p>"}</section>
</body></html>
"""


def write_sweep_report(sweep_dir: str | Path, out_html: str | Path) -> Path:
    record, df = load_sweep_dir(sweep_dir)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_sweep_html(record, df).encode("utf-8"))
    return out
