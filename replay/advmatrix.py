"""The adversary matrix: every adversary kind against both strategies and the chosen modes.

``run_matrix`` runs one scenario (with no [[adversary]] of its own, or with one: its entries are then
replaced) once per kind x strategy x mode, with that kind's default action (``default_action``), and
returns one Arrow table: kind, strategy, mode -> status, outcome, detected_by, pages_lost, whether the
guest's end plaintext differs from the no-migration one, and ``corrupted`` (completed with a plaintext
that differs, outside the shared-page case: what SNP promises never happens). ``write_matrix`` writes it
(``matrix.arrow``) and an HTML page (``report.html``) into a directory, atomically and deterministically.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from .records import atomic_dir
from .scenario import (
    ADVERSARY_KINDS,
    STRATEGIES,
    AdversarySpec,
    Scenario,
    with_adversary,
)

# The shared-page case is undetected by design (shared pages are the host's): its differing plaintext is
# the documented outcome, not corruption.
UNPROTECTED = ("tamper-shared",)
DEFAULT_MODES = ("precopy", "postcopy")
ACT_AFTER_NS = 3_000_000  # default actions come this long after the migration starts (after the handshake)

SCHEMA = pa.schema([
    ("kind", pa.string()), ("strategy", pa.string()), ("mode", pa.string()), ("status", pa.string()),
    ("outcome", pa.string()), ("detected_by", pa.string()), ("at", pa.string()), ("applied_ns", pa.uint64()),
    ("pages_lost", pa.uint64()), ("plaintext_end_differs", pa.bool_()), ("corrupted", pa.bool_()),
])


def default_action(kind: str, start_ns: int) -> AdversarySpec:
    """The matrix's action of ``kind``: the handshake's and the target RMP's act at their only moment,
    the others ``ACT_AFTER_NS`` after the migration starts."""
    from .migration.adversary import ATTESTATION, RMP_TARGET

    if kind in ATTESTATION + RMP_TARGET:
        return AdversarySpec(kind=kind)
    return AdversarySpec(kind=kind, at_ns=start_ns + ACT_AFTER_NS)


def run_matrix(scenario: Scenario, *, kinds: Sequence[str] = ADVERSARY_KINDS, modes: Sequence[str] = DEFAULT_MODES,
               strategies: Sequence[str] = STRATEGIES, engine: str = "cython", trace_path=None) -> pa.Table:
    from .migration import Migration, trace_for

    base = dataclasses.replace(scenario, adversary=())
    path = trace_path if trace_path is not None else trace_for(base)
    rows, reference = [], None
    for kind in kinds:
        for strategy in strategies:
            for mode in modes:
                m = dataclasses.replace(base.migration, mode=mode, strategy=strategy)
                s = with_adversary(dataclasses.replace(base, migration=m), [default_action(kind, m.start_ns)])
                r = Migration(s, path, engine=engine, no_migration_digest=reference).run()
                reference = r.summary["digests"]["no_migration"]
                act, eff = r.summary["adversary"][0], r.summary["adversary_effects"]
                differs = eff["plaintext_end_differs"]
                rows.append({"kind": kind, "strategy": strategy, "mode": mode, "status": r.status,
                             "outcome": act["outcome"], "detected_by": act["detected_by"], "at": act["at"],
                             "applied_ns": act["applied_ns"], "pages_lost": eff["pages_lost"],
                             "plaintext_end_differs": differs,
                             "corrupted": r.status == "completed" and differs and kind not in UNPROTECTED})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def render_section(table: pa.Table) -> str:
    """The matrix as an HTML section (the report's styles)."""
    from .report import _e

    head = "".join(f"<th>{_e(n)}</th>" for n in SCHEMA.names)
    body = []
    for row in table.to_pylist():
        cls = "bad" if row["corrupted"] else ("ok" if row["outcome"] == "detected" else "")
        cells = "".join(f"<td>{_e(str(row[n]).lower() if isinstance(row[n], bool) else row[n])}</td>"
                        for n in SCHEMA.names)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    bad = sum(table.column("corrupted").to_pylist())
    return (f'<section id="adversary"><h2>Adversary matrix</h2><p>{table.num_rows} runs; '
            f'{bad} completed with a corrupted plaintext outside the shared-page case.</p>'
            f"<table><tr>{head}</tr>{''.join(body)}</table></section>")


def render_html(table: pa.Table, scenario_name: str) -> str:
    from .report import CSS, _e

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>snp-replay: adversary matrix</title><style>{CSS}</style></head>
<body><h1>snp-replay: adversary matrix</h1><p class="sub">scenario {_e(scenario_name)}</p>
{render_section(table)}
</body></html>
"""


def markdown(table: pa.Table) -> str:
    """The matrix as a Markdown table (the threat model's)."""
    cols = ["kind", "strategy", "mode", "status", "outcome", "detected_by", "pages_lost", "plaintext_end_differs"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.to_pylist():
        out.append("| " + " | ".join(str(row[c]).lower() if isinstance(row[c], bool) else str(row[c]) for c in cols) + " |")
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
