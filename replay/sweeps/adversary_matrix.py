"""The adversary matrix: every adversary kind against both strategies and the chosen modes.

``run_matrix`` runs one scenario (with no [[adversary]] of its own, or with one: its entries are then
replaced) once per kind x strategy x mode x phase, the action aimed by time into that phase (pre-copy
rounds, stop-and-copy, post-copy push, post-copy fault replies), and returns one Arrow table: kind,
strategy, mode, phase -> where and when the action acted, status, outcome, detected_by, pages_lost,
whether the guest's end plaintext differs from the no-migration one, and ``corrupted`` (completed with a
plaintext that differs, outside the documented undetected cases: what SNP promises never happens). ``write_matrix`` writes it
(``matrix.arrow``) and an HTML page (``report.html``) into a directory, atomically and deterministically.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from ..core.records import atomic_dir
from ..scenario.spec import ADVERSARY_KINDS, STRATEGIES, AdversarySpec, Scenario, with_adversary

# The shared-page case is undetected by design (shared pages are the host's), and so are the "what if the
# RMP failed" kinds (memory encryption has no integrity): their differing plaintext is the documented
# outcome, not corruption.
UNPROTECTED = ("tamper-shared", "rmp-bypass-copy", "stale-ciphertext", "raw-copy")
DEFAULT_MODES = ("precopy", "postcopy")
ACT_AFTER_NS = 3_000_000  # default_action: this long after the migration starts (its first packet, after setup)
# The phases of each mode an action can be aimed at, by time: (phase, the stream it acts on).
PHASES = {"precopy": (("round", "precopy"), ("stop-and-copy", "downtime")),
          "postcopy": (("push", "postcopy"), ("fault-reply", "fault")),
          "hybrid": (("round", "precopy"), ("push", "postcopy"))}

SCHEMA = pa.schema([
    ("kind", pa.string()), ("strategy", pa.string()), ("mode", pa.string()), ("phase", pa.string()),
    ("status", pa.string()), ("outcome", pa.string()), ("detected_by", pa.string()), ("at", pa.string()),
    ("acted_in", pa.string()), ("applied_ns", pa.uint64()), ("pages_lost", pa.uint64()),
    ("plaintext_end_differs", pa.bool_()), ("corrupted", pa.bool_()),
])


def default_action(kind: str, start_ns: int) -> AdversarySpec:
    """A one-off action of ``kind``: the handshake's and the target RMP's act at their only moment,
    the others ``ACT_AFTER_NS`` after the migration starts."""
    from ..migration.adversary import ATTESTATION, RMP_TARGET

    if kind in ATTESTATION + RMP_TARGET:
        return AdversarySpec(kind=kind)
    return AdversarySpec(kind=kind, at_ns=start_ns + ACT_AFTER_NS)


def _phase_scenario(s: Scenario, mode: str, phase: str) -> Scenario:
    """The scenario a phase is aimed at in: the fault replies of a post-copy without its background push
    (the replies are then the only pages on the link, so a time hits one)."""
    m = dataclasses.replace(s.migration, mode=mode)
    if phase == "fault-reply":
        m = dataclasses.replace(m, postcopy_background_push=False)
    return dataclasses.replace(s, migration=m)


def phase_times(result, phase: str) -> int | None:
    """A time inside ``phase`` of a run without adversary (its record): the middle of the pre-copy
    rounds (setup done to switchover), of the stop-and-copy transfer (pause to the VMSAs), of the
    post-copy push (resume to completion), or the median private fault's raise (its reply goes after).
    None if the run had no such phase (a hybrid that converged before its switch to post-copy)."""
    m = result.summary["metrics"]
    kinds = {e["kind"] for e in result.events.to_pylist()}
    postcopy = "postcopy_complete" in kinds
    if (phase in ("push", "fault-reply")) != postcopy or (phase == "round" and "round_start" not in kinds):
        return None
    start, sw = m["migration_start_ns"] + m["setup_ns"], m["switchover_ns"]
    if phase == "round":
        return (start + sw) // 2
    if phase == "stop-and-copy":
        vmsas = next(e["t_ns"] for e in result.events.to_pylist() if e["kind"] == "vmsas_sent")
        return (sw + vmsas) // 2
    if phase == "push":
        return (sw + m["downtime_ns"] + m["completion_ns"]) // 2
    raised = sorted(r["raised_ns"] for r in result.faults.to_pylist() if r["private"])
    return raised[len(raised) // 2] if raised else None


def run_matrix(scenario: Scenario, *, kinds: Sequence[str] = ADVERSARY_KINDS, modes: Sequence[str] = DEFAULT_MODES,
               strategies: Sequence[str] = STRATEGIES, engine: str = "cython", trace_path=None) -> pa.Table:
    """Every kind against every strategy, in every phase of each mode it can act in, aimed by time at the
    middle of that phase (times from a run of the same strategy and phase without adversary): pre-copy's
    rounds and stop-and-copy, post-copy's push and fault replies, hybrid's rounds and push. The
    handshake's kinds act at the handshake, once per mode; the target RMP's before a pre-copy resume
    (once per mode) and on the pages of a post-copy phase. A phase the mode's run never reaches (a
    hybrid that converged before its switch to post-copy has no push) has no row."""
    from ..migration import Migration, trace_for
    from ..migration.adversary import ATTESTATION, RMP_TARGET

    base = dataclasses.replace(scenario, adversary=())
    path = trace_path if trace_path is not None else trace_for(base)
    rows, reference, times = [], None, {}

    def run(s):
        nonlocal reference
        r = Migration(s, path, engine=engine, no_migration_digest=reference).run()
        reference = r.summary["digests"]["no_migration"]
        return r

    for kind in kinds:
        for strategy in strategies:
            for mode in modes:
                phases = PHASES[mode]
                if kind in ATTESTATION:
                    phases = (("handshake", "handshake"),)
                elif kind in RMP_TARGET and mode != "postcopy":
                    phases = (("resume", "resume"),) + tuple(p for p in phases if p[0] == "push")
                for phase, _ in phases:
                    s = _phase_scenario(base.with_strategy(strategy), mode, phase)
                    if phase in ("handshake", "resume"):
                        action = AdversarySpec(kind=kind)
                    else:
                        key = (strategy, mode, phase)
                        if key not in times:
                            times[key] = phase_times(run(s), phase)
                        if times[key] is None:
                            continue  # that mode's run never reaches the phase: nothing to aim at
                        action = AdversarySpec(kind=kind, at_ns=times[key])
                    r = run(with_adversary(s, [action]))
                    act, eff = r.summary["adversary"][0], r.summary["adversary_effects"]
                    differs = eff["plaintext_end_differs"]
                    rows.append({"kind": kind, "strategy": strategy, "mode": mode, "phase": phase, "status": r.status,
                                 "outcome": act["outcome"], "detected_by": act["detected_by"], "at": act["at"],
                                 "acted_in": act["phase"], "applied_ns": act["applied_ns"],
                                 "pages_lost": eff["pages_lost"], "plaintext_end_differs": differs,
                                 "corrupted": r.status == "completed" and differs and kind not in UNPROTECTED})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def render_section(table: pa.Table) -> str:
    """The matrix as an HTML section (the report's styles)."""
    from ..analysis.report import esc

    head = "".join(f"<th>{esc(n)}</th>" for n in SCHEMA.names)
    body = []
    for row in table.to_pylist():
        cls = "bad" if row["corrupted"] else ("ok" if row["outcome"] == "detected" else "")
        cells = "".join(f"<td>{esc(str(row[n]).lower() if isinstance(row[n], bool) else row[n])}</td>"
                        for n in SCHEMA.names)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    bad = sum(table.column("corrupted").to_pylist())
    return (f'<section id="adversary"><h2>Adversary matrix</h2><p>{table.num_rows} runs; '
            f'{bad} completed with a corrupted plaintext outside the shared-page case.</p>'
            f"<table><tr>{head}</tr>{''.join(body)}</table></section>")


def render_html(table: pa.Table, scenario_name: str) -> str:
    from ..analysis.report import CSS, esc

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>snp-replay: adversary matrix</title><style>{CSS}</style></head>
<body><h1>snp-replay: adversary matrix</h1><p class="sub">scenario {esc(scenario_name)}</p>
{render_section(table)}
</body></html>
"""


def markdown(table: pa.Table) -> str:
    """The matrix as a Markdown table (the threat model's)."""
    cols = ["kind", "strategy", "mode", "phase", "acted", "status", "outcome", "detected by", "data lost"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.to_pylist():
        acted = (f"{row['acted_in']} @ {row['applied_ns'] / 1e6:.3f} ms" if row["outcome"] != "not_reached" else "no")
        lost = []
        if row["pages_lost"]:
            lost.append(f"{row['pages_lost']} pages")
        if row["plaintext_end_differs"]:
            lost.append("plaintext differs")
        cells = [row["kind"], row["strategy"], row["mode"], row["phase"], acted, row["status"], row["outcome"],
                 row["detected_by"] or "-", ", ".join(lost) or "none"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_matrix(table: pa.Table, out_dir: str | Path, scenario_name: str) -> Path:
    """``matrix.arrow`` (Arrow IPC file) and ``report.html`` in ``out_dir``, replaced whole."""
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with atomic_dir(out_dir) as tmp:
        (tmp / "matrix.arrow").write_bytes(sink.getvalue())
        (tmp / "report.html").write_text(render_html(table, scenario_name), encoding="utf-8")
        (tmp / "matrix.md").write_text(markdown(table), encoding="utf-8")
    return Path(out_dir)
