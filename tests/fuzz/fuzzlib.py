"""The fuzzer: generators of bad and edge-case inputs, and the contract every `replay` command must keep.

A *case* is a command line plus the files it reads, built deterministically from (seed, family, index)
in a fresh directory. Families cover traces (byte flips, truncation, metadata, schema and row variants),
scenarios (TOML mutations, type and range violations, nesting), ``--set`` values, CSV/Parquet/dirty-log
imports, run directories (flipped bytes, retyped or tampered summaries, missing or odd files), output
paths that overlap inputs, and odd CLI arguments.

Each case runs ``replay.cli.main(argv)`` in a long-lived *worker* process (so that thousands of cases
cost one interpreter start, not thousands), and is checked against the contract:

- bad input: exit 2 and exactly one short line on stderr (no traceback);
- good input: exit 0 or 1 and a complete output;
- never an escaped exception, a signal or a hang (the parent kills a worker that exceeds the timeout
  and restarts it), never an input changed, never a partial output (on an error nothing new is left
  behind; on success no temporary file is left).

The parent (``run_campaign``) drives two workers, classifies each case into one outcome class and
returns the counts per class plus the failing cases. ``tools/fuzz`` runs longer campaigns and records
failures into ``tests/fuzz/corpus/``; ``tests/fuzz/test_fuzz.py`` runs one campaign per CI run and
replays the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CORPUS = HERE / "corpus"

ERROR_LINE_MAX = 400  # characters: an error names what and where, and quotes a short prefix at most
CASE_TIMEOUT_S = 20.0
WORKER_MEMORY_BYTES = 8 << 30  # address-space cap of a worker: an allocation beyond it fails, not the machine

# Outcome classes, in the order of precedence when a case shows several symptoms.
BAD_CLASSES = (
    "signal", "hang", "traceback", "input-changed", "partial-output", "wrong-success", "wrong-refusal",
    "bad-message", "internal-error", "incomplete-output",
)
GOOD_CLASSES = ("ok", "clean-error")
CLASSES = GOOD_CLASSES + BAD_CLASSES


# ------------------------------------------------------------------------------------------ fixtures

TRACE_GUEST = 256 * 1024  # 64 pages
TRACE_VCPUS = 2
TRACE_EVENTS = 2000

SCENARIO = """\
name = "fuzz"
description = "a tiny guest for the fuzzer"
seed = 1

[guest]
vcpus = 2
os_vmpl = 2

[trace]
file = "trace.arrow"

[migration]
strategy = "mirror-vm"
mode = "{mode}"
start_ns = "100us"
bandwidth_bytes_per_s = 1_250_000_000
latency_ns = 50_000
downtime_limit_ns = "5ms"
max_rounds = 5
agents_initial = 1
agents_max = 2
precopy_rounds = 1

[costs]
page_pack_ns = 2_000
batch_pages = 64

[kernel]
gmem_link = true
"""

CSV_TEXT = "t_ns,vcpu,gpa,len,op\n" + "".join(
    f"{i * 100},{i % 2},{(i * 4096 * 7) % (1 << 20)},8,{'write' if i % 3 else 'read'}\n" for i in range(60)
)
DIRTYLOG_TEXT = "interval,gfn,vcpu\n" + "".join(f"{i // 10},{(i * 13) % 200},{i % 2}\n" for i in range(50))


def _main(argv: list[str]) -> int:
    from replay.cli import main

    return main(argv)


def build_fixtures(base: Path) -> None:
    """The valid inputs every case starts from (built once per worker, by the code under test)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base.mkdir(parents=True, exist_ok=True)
    quiet = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        rc = _main(["gen", "hotcold", "--out", str(base / "trace.arrow"), "--guest-size", str(TRACE_GUEST),
                    "--vcpus", str(TRACE_VCPUS), "--events", str(TRACE_EVENTS), "--seed", "7", "--fill"])
        assert rc == 0, quiet.getvalue()
        for mode in ("precopy", "postcopy"):
            (base / f"{mode}.toml").write_text(SCENARIO.format(mode=mode))
        shutil.copy(base / "trace.arrow", base / "trace-copy.arrow")
        for mode in ("precopy", "postcopy"):
            for strategy in ("mirror-vm", "shadow-vcpu"):
                rc = _main(["run", str(base / f"{mode}.toml"), "--out", str(base / "runs" / f"{mode}-{strategy}"),
                            "--strategy", strategy, "--no-progress"])
                assert rc == 0, quiet.getvalue()
    (base / "accesses.csv").write_text(CSV_TEXT)
    (base / "dirtylog.csv").write_text(DIRTYLOG_TEXT)
    rows = [line.split(",") for line in CSV_TEXT.splitlines()[1:]]
    table = pa.table({
        "t_ns": pa.array([int(r[0]) for r in rows], pa.uint64()),
        "vcpu": pa.array([int(r[1]) for r in rows], pa.uint16()),
        "gpa": pa.array([int(r[2]) for r in rows], pa.uint64()),
        "len": pa.array([int(r[3]) for r in rows], pa.uint32()),
    })
    pq.write_table(table, base / "accesses.parquet")


# ------------------------------------------------------------------------------------------ cases

@dataclass
class Case:
    """One command line and what it may touch. ``expect``: 'bad' (must be refused), 'good' (must
    succeed) or 'any' (either, but by the contract). ``outputs``: paths the command may create or
    replace when it succeeds (relative to the case directory)."""

    family: str
    index: int
    argv: list[str]
    expect: str = "any"
    outputs: list[str] = field(default_factory=list)
    note: str = ""
    check: Callable[[Path], str | None] | None = None  # complete-output check on success

    def key(self) -> str:
        return f"{self.family}:{self.index}"


# Values that stress a typed key: wrong types, boundaries, huge, empty, long, nested.
def _toml_values(rng: random.Random) -> list[str]:
    deep = "[" * rng.choice([50, 500, 3000]) + "]" * 0
    return [
        "0", "-1", "1", "2", str(2**31), str(2**32), str(2**63 - 1), str(2**63), str(2**64), "-" + str(2**63),
        "9" * 40, '""', '"abc"', '"' + "x" * 5000 + '"', "true", "false", "1.5", "nan", "inf", "-inf", "[]",
        "[1, 2]", "{}", "{ a = 1 }", '"16GiB"', '"500ms"', '"forever"', '"1.5GiB"', '"10 s"', '"-5ms"',
        '"\\u0000"', '"\\u00e9t\\u00e9"', "[[1]]", deep, "[" * 20 + "1" + "]" * 20, "1979-05-27T07:32:00Z",
    ]


def _set_values(rng: random.Random) -> list[str]:
    return [
        "", " ", "0", "-1", "1", "3", "64", str(2**32), str(2**64), str(2**64 + 1), "-" + str(2**70), "9" * 50,
        "1.5", "nan", "inf", "true", "false", "[]", "{}", "[1,2]", "{a=1}", "abc", "x" * 3000, "16GiB",
        "1.5GiB", "0GiB", "4096", "500ms", "forever", "-5ms", "1e9", "0x10", "'single'", '"dq"', "[" * 400,
        "{" * 400, "hybrid", "postcopy", "precopy", "shadow-vcpu", "mirror-vm", "link_down", "\x00", "é",
        "1" + "0" * 20 + "ms",
    ]


def _scenario_keys() -> list[tuple[str, str]]:
    from replay.scenario import spec as sc

    keys = [("", k) for k in ("name", "description", "seed")]
    for section, cls in sc._SECTIONS.items():
        keys += [(section, f.name) for f in __import__("dataclasses").fields(cls)]
    keys += [("fault", f.name) for f in __import__("dataclasses").fields(sc.LinkFault)]
    return keys


def _is_run_dir_complete(p: Path) -> str | None:
    for name in ("summary.json", "rounds.arrow", "events.arrow"):
        if not (p / name).is_file():
            return f"{p} lacks {name}"
    try:
        json.loads((p / "summary.json").read_bytes())
    except ValueError:
        return f"{p}/summary.json is not JSON"
    return None


def _complete_run(out: str) -> Callable[[Path], str | None]:
    return lambda d: _is_run_dir_complete(d / out)


def _complete_compare(out: str) -> Callable[[Path], str | None]:
    def check(d: Path) -> str | None:
        for s in ("mirror-vm", "shadow-vcpu"):
            bad = _is_run_dir_complete(d / out / s)
            if bad:
                return bad
        html = d / out / "report.html"
        if not html.is_file() or not html.read_bytes().rstrip().endswith(b"</html>"):
            return f"{html} missing or incomplete"
        return None
    return check


def _complete_file(out: str, tail: bytes | None = None) -> Callable[[Path], str | None]:
    def check(d: Path) -> str | None:
        p = d / out
        if not p.is_file() or p.stat().st_size == 0:
            return f"{out} missing or empty"
        if tail is not None and not p.read_bytes().rstrip().endswith(tail):
            return f"{out} incomplete"
        return None
    return check


def _trace_ok(out: str) -> Callable[[Path], str | None]:
    def check(d: Path) -> str | None:
        p = d / out
        if not p.is_file():
            return f"{out} missing"
        if p.read_bytes()[:6] != b"ARROW1" or p.read_bytes()[-6:] != b"ARROW1":
            return f"{out} is not a complete Arrow file"
        return None
    return check


def _flip(data: bytearray, rng: random.Random, n: int) -> None:
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    how = rng.choice(["flip1", "flip1", "flipn", "truncate", "zero", "insert", "delete", "head", "tail"])
    if how == "flip1":
        _flip(b, rng, 1)
    elif how == "flipn":
        _flip(b, rng, rng.randint(2, 40))
    elif how == "truncate":
        del b[rng.randrange(len(b)):]
    elif how == "zero":
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 256)] = bytes(min(len(b) - i, 256))[: len(b[i:i + 256])]
    elif how == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif how == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 64)]
    elif how == "head":
        i = rng.randrange(min(len(b), 2048))
        b[i] ^= 1 << rng.randrange(8)
    else:  # the footer: schema, metadata, block offsets
        i = len(b) - 1 - rng.randrange(min(len(b), 4096))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), how


META_KEYS = ("format", "version", "page_size", "guest_bytes", "vcpus", "shared_ranges", "source", "events", "digest")


def _meta_digest(md: dict[str, str]) -> str:
    """The trace metadata hash (format v1's optional ``meta_digest``), computed independently."""
    h = hashlib.blake2b(digest_size=32)
    for key in META_KEYS:
        h.update(key.encode() + b"\0" + md[key].encode() + b"\0")
    return h.hexdigest()


def _trace_expectation(data: bytes, original: bytes) -> str:
    """Ground truth for a mutated trace, from a careful full decode: 'good' if rows and metadata are the
    original's, 'bad' if the rows differ or the file does not decode, and for a metadata-only change
    'bad' when the original carries ``meta_digest`` (written since issue 14), else 'any' (older traces
    have no hash over their metadata, so a change that still parses cannot be told)."""
    import pyarrow as pa

    def load(buf: bytes):
        r = pa.ipc.open_file(pa.BufferReader(buf))
        batches = []
        for i in range(r.num_record_batches):
            b = r.get_batch(i)
            b.validate(full=True)
            batches.append(b)
        return r.schema, pa.Table.from_batches(batches, schema=r.schema)

    if data == original:
        return "good"
    if data[:6] != b"ARROW1" or data[-6:] != b"ARROW1":
        return "bad"  # an IPC file starts and ends with the magic (pyarrow only looks at the end)
    try:
        s1, t1 = load(data)
    except Exception:  # noqa: BLE001 - any failure to decode means the mutation broke the file
        return "bad"
    s0, t0 = load(original)
    if not (s1.equals(s0, check_metadata=False) and t1.equals(t0)):
        return "bad"
    if s1.equals(s0, check_metadata=True):
        return "good"
    return "bad" if b"meta_digest" in (s0.metadata or {}) else "any"


# Trace metadata and schema variants: (description, change to metadata dict / table, expectation).
def _meta_variants() -> list[tuple[str, dict, str]]:
    huge = str(2**64)
    v: list[tuple[str, dict, str]] = []
    for key in ("format", "version", "page_size", "guest_bytes", "vcpus", "shared_ranges", "source", "events", "digest"):
        v.append((f"drop {key}", {key: None}, "bad"))
        for val in ("", "x", "-1", "0", huge, "1e3", " 4096", "nan", "[]", "{}", "null", '"s"', "9" * 400,
                    "\udcff", "[[0, 1]]", "[[1, 0]]", "[[0, 99999]]", "[[0, 1], [1, 2]]", "[" * 5000 + "]" * 5000,
                    '{"a": ' * 3000 + "1" + "}" * 3000, '{"kind": "x"}', "0" * 64, "A" * 64):
            v.append((f"{key}={val[:20]!r}", {key: val}, "any"))
    v.append(("extra key", {"extra": "1"}, "good"))
    v.append(("source with nested", {"source": json.dumps({"a": {"b": [1, 2, {"c": "d"}]}})}, "any"))
    return v


def _trace_with(base: Path, rng: random.Random, out: Path) -> tuple[str, str]:
    """Write a structurally valid Arrow file with a metadata, schema or row variant of the fixture trace."""
    import pyarrow as pa

    with pa.memory_map(str(base / "trace.arrow")) as src:
        r = pa.ipc.open_file(src)
        table = r.read_all()
    md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    kind = rng.choice(["meta", "meta", "meta", "schema", "rows", "rows", "empty"])
    expect = "bad"
    if kind == "meta":
        desc, change, expect = rng.choice(_meta_variants())
        for k, val in change.items():
            if val is None:
                md.pop(k, None)
            else:
                md[k] = val
        original = {k.decode(): v.decode() for k, v in (r.schema.metadata or {}).items()}
        covered_changed = any(md.get(k) != original.get(k) for k in META_KEYS)  # extra keys are not covered
        if "meta_digest" in original and covered_changed:
            if rng.random() < 0.5 and all(k in md for k in META_KEYS) and "meta_digest" in md:
                # A consistent forgery: the metadata hash matches, so the checks behind it are reached.
                try:
                    md["meta_digest"] = _meta_digest(md)
                except UnicodeEncodeError:
                    expect = "bad"
            else:
                expect = "bad"  # a stale metadata hash must be noticed
        raw = {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in md.items()}
        table = table.replace_schema_metadata(raw)
        if expect == "any" and md == original:
            expect = "good"
    elif kind == "schema":
        i = rng.randrange(table.num_columns)
        name = table.column_names[i]
        how = rng.choice(["cast", "rename", "drop", "extra", "nullable", "reorder", "nulls"])
        desc = f"schema {how} {name}"
        if how == "cast":
            typ = rng.choice([pa.int64(), pa.uint32(), pa.float64(), pa.string(), pa.uint8(), pa.int8()])
            same = typ == table.schema.field(i).type
            try:
                table = table.set_column(i, pa.field(name, typ), table.column(i).cast(typ, safe=False))
                if same:  # the column's own type, declared nullable, without nulls: a valid trace
                    expect = "good"
            except pa.ArrowInvalid:
                table = table.set_column(i, pa.field(name, typ), pa.nulls(table.num_rows, typ))
        elif how == "rename":
            table = table.rename_columns([c if j != i else c + "x" for j, c in enumerate(table.column_names)])
        elif how == "drop":
            table = table.remove_column(i)
        elif how == "extra":
            table = table.append_column("extra", pa.array([0] * table.num_rows, pa.uint8()))
        elif how == "nullable":
            # Columns declared nullable but holding no nulls (as ordinary pyarrow/pandas/polars code writes
            # them): a valid trace, whose digest (over the values) is unchanged.
            table = table.cast(pa.schema([f.with_nullable(True) for f in table.schema]).with_metadata(table.schema.metadata))
            expect = "good"
        elif how == "reorder":
            names = table.column_names[::-1]
            table = table.select(names)
        else:
            col = table.column(i).to_pylist()
            col[rng.randrange(len(col))] = None
            table = table.set_column(i, pa.field(name, table.schema.field(i).type, nullable=True),
                                     pa.array(col, table.schema.field(i).type))
        table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in md.items()})
    elif kind == "rows":
        cols = {n: table.column(n).to_pylist() for n in table.column_names}
        j = rng.randrange(table.num_rows)
        how = rng.choice(["t-back", "vcpu", "gpa", "gpa-overflow", "len0", "op", "len-huge", "value"])
        desc = f"row {j} {how}"
        if how == "t-back":
            j = max(j, 1)
            cols["t_ns"][j] = max(0, cols["t_ns"][j - 1] - 1) if cols["t_ns"][j - 1] else 0
            if cols["t_ns"][j] >= cols["t_ns"][j - 1]:
                cols["t_ns"][j - 1] += 1
                if j >= 2 and cols["t_ns"][j - 1] > cols["t_ns"][j]:
                    pass
        elif how == "vcpu":
            cols["vcpu"][j] = rng.choice([TRACE_VCPUS, 65535])
        elif how == "gpa":
            cols["gpa"][j] = rng.choice([TRACE_GUEST, TRACE_GUEST - 4, 2**63])
        elif how == "gpa-overflow":
            cols["gpa"][j] = 2**64 - 4
            cols["len"][j] = 8
        elif how == "len0":
            cols["len"][j] = 0
        elif how == "op":
            cols["op"][j] = rng.choice([4, 255])
        elif how == "len-huge":
            cols["len"][j] = 2**32 - 1
        else:
            cols["value"][j] ^= 1  # content change: the digest must notice
        table = pa.table({n: pa.array(c, table.schema.field(n).type) for n, c in cols.items()},
                         schema=table.schema)
    else:
        desc = "empty table, metadata unchanged"
        table = table.slice(0, 0)
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        if table.num_rows:
            for b in table.to_batches(max_chunksize=rng.choice([100, 700, 5000])):
                w.write_batch(b)
        else:
            w.write_table(table)
    return desc, expect


def _trace_argv(rng: random.Random, trace: str) -> tuple[list[str], list[str], Any]:
    cmd = rng.choice(["inspect", "inspect-json", "verify", "run", "run", "import-out-same"])
    if cmd == "inspect":
        return ["inspect", trace], [], None
    if cmd == "inspect-json":
        return ["inspect", "--json", trace], [], None
    if cmd == "verify":
        return ["verify", trace], [], None
    if cmd == "run":
        return ["run", "precopy.toml", "--trace", trace, "--out", "out", "--no-progress"], ["out"], _complete_run("out")
    return ["inspect", trace, "--interval", rng.choice(["1ns", "0", "1ms", "x", ""])], [], None


def case_trace_bytes(rng: random.Random, d: Path, index: int) -> Case:
    original = (d / "trace.arrow").read_bytes()
    data, how = _mutate_bytes(original, rng)
    (d / "trace.arrow").write_bytes(data)
    argv, outs, check = _trace_argv(rng, "trace.arrow")
    expect = _trace_expectation(data, original)
    if argv[0] == "inspect" and "--interval" in argv:
        expect = "any" if expect == "good" else expect
    return Case("trace-bytes", index, argv, expect, outs, how, check)


def case_trace_struct(rng: random.Random, d: Path, index: int) -> Case:
    desc, expect = _trace_with(d, rng, d / "variant.arrow")
    argv, outs, check = _trace_argv(rng, "variant.arrow")
    if argv[0] == "inspect" and "--interval" in argv:
        expect = "any" if expect == "good" else expect
    return Case("trace-struct", index, argv, expect, outs, desc, check)


def _toml_mutate(text: str, rng: random.Random) -> tuple[str, str, str]:
    lines = text.splitlines()
    how = rng.choice(["value", "value", "value", "drop", "dup", "typo", "bytes", "nest", "section", "fault"])
    expect = "any"
    if how == "value":
        idx = [i for i, l in enumerate(lines) if "=" in l]
        i = rng.choice(idx)
        key = lines[i].split("=")[0].strip()
        val = rng.choice(_toml_values(rng))
        lines[i] = f"{key} = {val}"
        return "\n".join(lines) + "\n", f"{key} = {val[:30]}", expect
    if how == "drop":
        del lines[rng.randrange(len(lines))]
    elif how == "dup":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif how == "typo":
        idx = [i for i, l in enumerate(lines) if "=" in l]
        i = rng.choice(idx)
        key, _, rest = lines[i].partition("=")
        key = key.strip()
        j = rng.randrange(len(key))
        key = key[:j] + rng.choice("abcxyz_") + key[j + 1:]
        lines[i] = f"{key} ={rest}"
    elif how == "bytes":
        b = bytearray("\n".join(lines).encode())
        _flip(b, rng, rng.randint(1, 3))
        return b.decode("utf-8", "replace") + "\n", how, expect
    elif how == "nest":
        depth = rng.choice([10, 200, 2000, 20000])
        lines.append("deep = " + "[" * depth + "]" * depth if rng.random() < 0.5 else
                     "[migration.a" + ".b" * depth + "]")
        expect = "bad"
    elif how == "section":
        lines.append(rng.choice(["[migratoin]", "[guest.extra]", "[costs]\nx = 1", "[[guest]]", "guest = 3",
                                 "[trace.options]\nhot_bytes = -1", "[trace.options]\nnested = { a = { b = 1 } }"]))
    else:
        at = rng.choice(["0", "1", "-1", '"1ms"', str(2**64), '"forever"', '"x"'])
        dur = rng.choice(["1", "0", "-1", "-2", '"forever"', '"1ms"', str(2**64), "true"])
        kind = rng.choice(['"link_down"', '"link_dwn"', "1"])
        lines.append(f"[[fault]]\nkind = {kind}\nat_ns = {at}\nduration_ns = {dur}")
    return "\n".join(lines) + "\n", how, expect


def case_scenario(rng: random.Random, d: Path, index: int) -> Case:
    base = rng.choice(["precopy", "postcopy"])
    text, desc, expect = _toml_mutate((d / f"{base}.toml").read_text(), rng)
    if rng.random() < 0.3:
        text, desc2, e2 = _toml_mutate(text, rng)
        desc += " + " + desc2
        expect = "bad" if "bad" in (expect, e2) else "any"
    (d / "s.toml").write_text(text, errors="surrogateescape")
    if rng.random() < 0.1:
        return Case("scenario", index, ["compare", "s.toml", "--out", "cmp", "--no-progress"], expect, ["cmp"], desc,
                    _complete_compare("cmp"))
    return Case("scenario", index, ["run", "s.toml", "--out", "out", "--no-progress"], expect, ["out"], desc,
                _complete_run("out"))


def case_set(rng: random.Random, d: Path, index: int) -> Case:
    keys = _scenario_keys()
    argv = ["run", rng.choice(["precopy.toml", "postcopy.toml"]), "--out", "out", "--no-progress"]
    notes = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        section, key = rng.choice(keys)
        path = f"{section}.{key}" if section else key
        r = rng.random()
        if r < 0.08:
            path += "." + rng.choice(["x", "y.z", "a" * 100])  # through a scalar key
        elif r < 0.14:
            path = path[:-1] + rng.choice("xyz_")  # typo
        elif r < 0.18:
            path = rng.choice(["", ".", "..", "migration.", ".mode", "migration..mode", "x" * 2000,
                               "trace.options." + ".".join(["a"] * 300), "fault.kind", "fault"])
        val = rng.choice(_set_values(rng))
        sep = "=" if rng.random() > 0.03 else rng.choice(["", ":", "=="])
        argv += ["--set", f"{path}{sep}{val}"]
        notes.append(f"{path[:30]}={val[:20]!r}")
    return Case("set", index, argv, "any", ["out"], "; ".join(notes), _complete_run("out"))


def _csv_mutate(text: str, rng: random.Random) -> tuple[str, str]:
    lines = text.splitlines()
    how = rng.choice(["cell", "cell", "cell", "header", "drop-col", "swap-rows", "empty", "only-header", "bytes",
                      "long-line", "quote", "blank-lines", "extra-col", "bom"])
    if how == "cell":
        i = rng.randrange(1, len(lines))
        cells = lines[i].split(",")
        j = rng.randrange(len(cells))
        cells[j] = rng.choice(["", "-1", str(2**64), str(2**64 - 1), "1.5", "nan", "abc", "0x10", "0xfffffffffffffffff",
                               "write", "w", "x" * 3000, '"1"', " 7 ", "1e3", "\x00", "65536", "4294967296"])
        lines[i] = ",".join(cells)
    elif how == "header":
        h = lines[0].split(",")
        j = rng.randrange(len(h))
        h[j] = rng.choice(["", "T_NS", "t_ns ", "gpa", "x" * 500, "t_ns", "\x00"])
        lines[0] = ",".join(h)
    elif how == "drop-col":
        j = rng.randrange(len(lines[0].split(",")))
        lines = [",".join(c for k, c in enumerate(l.split(",")) if k != j) for l in lines]
    elif how == "swap-rows":
        i = rng.randrange(1, len(lines) - 1)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    elif how == "empty":
        lines = []
    elif how == "only-header":
        lines = lines[:1]
    elif how == "bytes":
        b = bytearray("\n".join(lines).encode())
        _flip(b, rng, rng.randint(1, 5))
        return b.decode("latin-1"), how
    elif how == "long-line":
        lines.insert(rng.randrange(1, len(lines)), ",".join(["1"] * 5000))
    elif how == "quote":
        lines[rng.randrange(len(lines))] += '"'
    elif how == "blank-lines":
        lines.insert(rng.randrange(len(lines)), "")
    elif how == "extra-col":
        lines = [l + ",x" for l in lines]
    else:
        lines[0] = "\ufeff" + lines[0]
    return "\n".join(lines) + "\n", how


def case_import(rng: random.Random, d: Path, index: int) -> Case:
    fmt = rng.choice(["csv", "csv", "dirtylog", "parquet"])
    if fmt == "parquet":
        src = "accesses.parquet"
        if rng.random() < 0.7:
            data, desc = _mutate_bytes((d / src).read_bytes(), rng)
            (d / src).write_bytes(data)
        else:
            desc = "intact"
    else:
        src = "accesses.csv" if fmt == "csv" else "dirtylog.csv"
        text, desc = _csv_mutate((d / src).read_text(), rng)
        (d / src).write_bytes(text.encode("utf-8", "surrogateescape"))
    argv = ["import", fmt, src, "--out", "imp.arrow"]
    r = rng.random()
    if r < 0.3:
        argv += ["--columns", rng.choice(["t_ns=ts", "gpa=t_ns", "t_ns=", "=x", "x=y", "t_ns=t_ns,t_ns=gpa", ",", "a" * 3000,
                                          "gpa=gpa", "vcpu=op", "len=vcpu", "t_ns=interval"])]
    if rng.random() < 0.3:
        argv += ["--guest-size", rng.choice(["", "0", "1", "4KiB", "1MiB", "1GiB", str(2**64), "-1", "abc", "16EiB"])]
    if rng.random() < 0.3:
        argv += ["--vcpus", rng.choice(["0", "1", "2", "65536", "65537", "-1", "x", "", str(2**64)])]
    if rng.random() < 0.2:
        argv += ["--sort"]
    if fmt == "dirtylog" and rng.random() < 0.8:
        argv += ["--interval-ns", rng.choice(["100ms", "1ns", "0", "", "x", str(2**64), "1s"])]
    return Case("import", index, argv, "any", ["imp.arrow"], desc, _trace_ok("imp.arrow"))


def _summary_mutate(summary: dict, rng: random.Random) -> str:
    paths: list[tuple[list, Any]] = []

    def walk(obj: Any, path: list) -> None:
        paths.append((path, obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + [k])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, path + [i])

    walk(summary, [])
    path, _ = rng.choice(paths[1:])
    parent = summary
    for p in path[:-1]:
        parent = parent[p]
    how = rng.choice(["retype", "retype", "delete", "nan", "bump", "deep", "long"])
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif how == "nan":
        parent[path[-1]] = rng.choice([float("nan"), float("inf"), -1.5])
    elif how == "bump":
        v = parent[path[-1]]
        parent[path[-1]] = (v + 1) if isinstance(v, int) and not isinstance(v, bool) else (not v if isinstance(v, bool) else "changed")
    elif how == "deep":
        deep: Any = 1
        for _ in range(rng.choice([50, 5000])):
            deep = [deep]
        parent[path[-1]] = deep
    elif how == "long":
        parent[path[-1]] = "x" * 100_000
    else:
        # A different value, never the one already there (retyping `version: 1` to 1 changes nothing).
        old = parent[path[-1]]
        choices = [c for c in (None, "1", 1, -1, 2**64, 2**70, True, [], {}, "nan", [1, 2], {"a": 1}, 1e308)
                   if not (type(c) is type(old) and c == old)]
        parent[path[-1]] = rng.choice(choices)
    return f"{how} {'.'.join(map(str, path))[:60]}"


def case_rundir(rng: random.Random, d: Path, index: int) -> Case:
    runs = sorted(p.name for p in (d / "runs").iterdir())
    a, b = rng.sample(runs, 2) if rng.random() < 0.5 else (runs[0], runs[0])
    victim = d / "runs" / rng.choice([a, b])
    how = rng.choice(["table-bytes", "table-bytes", "summary", "summary", "summary-text", "missing", "odd-file"])
    if how == "table-bytes":
        files = sorted(p.name for p in victim.glob("*.arrow"))
        f = victim / rng.choice(files)
        data, desc = _mutate_bytes(f.read_bytes(), rng)
        f.write_bytes(data)
        desc = f"{f.name}: {desc}"
    elif how == "summary":
        s = json.loads((victim / "summary.json").read_bytes())
        desc = _summary_mutate(s, rng)
        try:
            text = json.dumps(s, sort_keys=True, indent=2)
        except (RecursionError, ValueError):
            text = "[" * 100_000
        (victim / "summary.json").write_text(text)
    elif how == "summary-text":
        raw = bytearray((victim / "summary.json").read_bytes())
        _flip(raw, rng, rng.randint(1, 3))
        (victim / "summary.json").write_bytes(bytes(raw))
        desc = "summary bytes"
    elif how == "missing":
        f = rng.choice(sorted(victim.iterdir()))
        f.unlink()
        desc = f"missing {f.name}"
    else:
        f = rng.choice(sorted(victim.iterdir()))
        f.unlink()
        kind = rng.choice(["dir", "fifo", "symlink-loop", "devnull"])
        if kind == "dir":
            f.mkdir()
        elif kind == "fifo":
            os.mkfifo(f)
        elif kind == "devnull":
            f.symlink_to("/dev/null")
        else:
            f.symlink_to(f.name)
        desc = f"{f.name} is a {kind}"
    cmd = rng.choice(["diff", "diff", "diff-json", "diff-strict", "report", "verify"])
    pa_, pb = f"runs/{a}", f"runs/{b}"
    if cmd == "report":
        argv, outs, check = ["report", pa_, pb, "--out", "r.html"], ["r.html"], _complete_file("r.html", b"</html>")
    elif cmd == "verify":
        argv, outs, check = ["verify", str(victim.relative_to(d))], [], None
    else:
        argv = ["diff", pa_, pb] + {"diff": [], "diff-json": ["--json"], "diff-strict": ["--strict"]}[cmd]
        outs, check = [], None
    return Case("rundir", index, argv, "bad", outs, f"{victim.name}: {desc}", check)


def case_overlap(rng: random.Random, d: Path, index: int) -> Case:
    """An output that is, contains or lies inside an input must be refused before anything is written."""
    choices = [
        (["run", "precopy.toml", "--out", "trace.arrow", "--no-progress"], "run --out the trace"),
        (["run", "precopy.toml", "--out", "precopy.toml", "--no-progress"], "run --out the scenario"),
        (["run", "precopy.toml", "--out", ".", "--no-progress"], "run --out the scenario's directory"),
        (["run", "precopy.toml", "--trace", "trace-copy.arrow", "--out", "trace-copy.arrow", "--no-progress"], "run --out --trace"),
        (["run", "precopy.toml", "--out", "trace.arrow/sub", "--no-progress"], "run --out inside the trace"),
        (["compare", "precopy.toml", "--out", ".", "--no-progress"], "compare --out ."),
        (["compare", "precopy.toml", "--out", "trace.arrow", "--no-progress"], "compare --out the trace"),
        (["import", "csv", "accesses.csv", "--out", "accesses.csv"], "import --out its input"),
        (["import", "parquet", "accesses.parquet", "--out", "accesses.parquet"], "import --out its input"),
        (["import", "csv", "accesses.csv", "--out", "./accesses.csv"], "import --out its input, other spelling"),
        (["report", "runs/precopy-mirror-vm", "--out", "runs/precopy-mirror-vm/summary.json"], "report --out summary"),
        (["report", "runs/precopy-mirror-vm", "--out", "runs/precopy-mirror-vm/rounds.arrow"], "report --out a table"),
        (["report", "runs/precopy-mirror-vm", "--out", "runs/precopy-mirror-vm"], "report --out the run dir"),
        (["report", "runs/precopy-mirror-vm", "--out", "runs"], "report --out a dir containing the run"),
        (["report", "runs/precopy-mirror-vm", "--out", "runs/precopy-mirror-vm/new.html"], "report --out inside a run"),
        (["gen", "uniform", "--out", "trace.arrow", "--guest-size", "1MiB", "--vcpus", "1", "--events", "10", "--seed", "1"],
         None),  # gen has no input: replacing a file is its job
        (["run", "precopy.toml", "--out", "runs/precopy-mirror-vm", "--no-progress"], None),
    ]
    argv, note = rng.choice(choices)
    argv = list(argv)
    if note is None:
        out = argv[argv.index("--out") + 1]
        return Case("overlap", index, argv, "good", [out], "replacing a non-input output",
                    _trace_ok(out) if argv[0] == "gen" else _complete_run(out))
    if rng.random() < 0.5 and "--out" in argv:  # the same target spelled as an absolute path or via a symlink
        i = argv.index("--out") + 1
        if rng.random() < 0.5:
            argv[i] = str(d / argv[i])
        else:
            (d / "link").symlink_to(d)
            argv[i] = "link/" + argv[i]
    return Case("overlap", index, argv, "bad", [], note)


def case_cli(rng: random.Random, d: Path, index: int) -> Case:
    os.mkfifo(d / "fifo")
    files = ["trace.arrow", "precopy.toml", "runs/precopy-mirror-vm", "accesses.csv", "fifo", "/dev/null", "/dev/zero",
             "", "-", "nonexistent", ".", "/", "x" * 5000, "runs", "\x00", "é.arrow", "/proc/self/mem"]
    cmds = {
        "gen": ["hotcold", "uniform", "stress", "ab", "phased", "psc", "nope", "--out", "--guest-size", "--vcpus",
                "--events", "--seed", "--fill", "--rate", "--len", "--hot-bytes", "--zipf", "--phases", "--compression",
                "--access-bytes", "--read-fraction", "--window", "--shared", "--burst-every"],
        "inspect": ["--json", "--interval"],
        "import": ["csv", "parquet", "dirtylog", "--out", "--columns", "--guest-size", "--vcpus", "--sort", "--interval-ns"],
        "run": ["--out", "--set", "--engine", "--trace", "--strategy", "--no-progress", "cython", "reference"],
        "compare": ["--out", "--set", "--trace", "--no-progress"],
        "diff": ["--strict", "--json", "--only-diff", "--max-regress", "downtime_ns=10", "x=1.5%", "=", "a=b"],
        "report": ["--out", "-o"],
        "verify": [],
        "record": ["--out", "--vcpus-from", "--no-reads", "--", "true", "--valgrind", "/bin/false", "--guest-size"],
    }
    cmd = rng.choice(list(cmds) + ["", "--version", "--help", "nope", "-x"])
    argv = [cmd] if cmd else []
    numbers = ["0", "1", "2", "-1", str(2**64), "1e3", "4GiB", "1TiB", "16EiB", "0.5", "100M", "abc", "",
               "65536", "65537", str(2**31), "4096", "64"]
    for _ in range(rng.randint(0, 8)):
        pool = cmds.get(cmd, []) + files + numbers
        argv.append(rng.choice(pool))
    gen_flags = {"--out": "g.arrow", "--guest-size": rng.choice(["1MiB", "256KiB", "1TiB", "16EiB", "0", "", "4097"]),
                 "--vcpus": rng.choice(["1", "2", "0", "65536", "65537", str(2**40)]),
                 "--events": rng.choice(["10", "0", "1000", str(10**15), "-5"]), "--seed": rng.choice(["1", "-1", "x"])}
    if cmd == "gen" and rng.random() < 0.7:
        argv = ["gen", rng.choice(["uniform", "hotcold", "stress", "ab", "phased", "psc"])]
        for k, v in gen_flags.items():
            if rng.random() < 0.95:
                argv += [k, v]
        if rng.random() < 0.3:
            argv += [rng.choice(cmds["gen"][7:]), rng.choice(numbers)]
    outs = ["g.arrow", "out", "imp.arrow", "r.html", "cmp"] + [a for a in argv if a and a not in files and not a.startswith("-")
                                                                and a not in numbers][:3]
    return Case("cli", index, argv, "any", outs, " ".join(a[:20] for a in argv)[:200])


# ------------------------------------------------------------------ the surfaces of issue 19
# Sweep files and options, --adversary, [[adversary]], [attestation], [kernel], --data, adversary-matrix
# and verify. Where the grammar makes a case certainly bad (a key overriding the kind, an empty list
# item), it is expected "bad", so that accepting it is a wrong success; a known-valid case is "good".

SWEEP_TEXT = """\
name = "fz"
scenario = "precopy.toml"
strategies = ["mirror-vm"]
[grid]
"migration.bandwidth_bytes_per_s" = [1_250_000_000]
"""


def _sweep_mutate(text: str, rng: random.Random) -> tuple[str, str, str]:
    how = rng.choice(["value", "value", "axis", "huge", "zip", "base", "toml", "dup-axis", "shorthand", "intact"])
    lines = text.splitlines()
    if how == "intact":
        return text, how, "good"
    if how == "value":
        i = rng.choice([i for i, l in enumerate(lines) if "=" in l])
        key = lines[i].split("=")[0].strip()
        val = rng.choice(_toml_values(rng) + ["[1]", '["x"]', "[true]", "[1.5]", '["mirror-vm", "nope"]', "[[]]"])
        lines[i] = f"{key} = {val}"
        return "\n".join(lines) + "\n", f"{key} = {val[:30]}", "any"
    if how == "axis":
        key = rng.choice(['"migration.max_rounds"', '"migration.mode"', '"guest.vcpus"', '"migration.maxrounds"',
                          '"nope.x"', '"migration"', '"seed"', '"trace.options.hot_bytes"', '"fault.0.at_ns"',
                          '"migration.data"', '"kernel.gmem_link"', '"attestation.min_tcb"', '""'])
        val = rng.choice(["[1, 2]", '["precopy", "postcopy"]', "[0]", "[true, false]", '["9.9.9.9"]', "[]",
                          "[" + ", ".join(["1"] * 3000) + "]", '["x"]'])
        lines.append(f"{key} = {val}")
        return "\n".join(lines) + "\n", f"axis {key}={val[:20]}", "any"
    if how == "huge":
        # a grid far past the limit: refused from the axes' lengths, without enumerating
        n = rng.choice([2, 10, 100, 1000])
        k = rng.choice([4, 6, 12])
        axes = "\n".join(f'"costs.c{j}" = [{", ".join(str(v) for v in range(n))}]' for j in range(k))
        expect = "bad" if n ** k > 10_000 else "any"
        return text + axes + "\n", f"grid {n}^{k}", expect
    if how == "zip":
        a = rng.choice(["[1, 2]", "[1]", "[]", "3"])
        b = rng.choice(["[10, 20]", "[10]", '["5ms", "50ms"]'])
        return text + f'[[zip]]\n"migration.max_rounds" = {a}\n"migration.precopy_rounds" = {b}\n', f"zip {a} {b}", "any"
    if how == "base":
        base = rng.choice(['"nope.toml"', '"trace.arrow"', '"."', '"fifo"', '""', "3", '"/dev/null"', '"runs"',
                           '"postcopy.toml"', '"' + "x" * 3000 + '"'])
        lines[1] = f"scenario = {base}"
        return "\n".join(lines) + "\n", f"scenario = {base[:30]}", "good" if base == '"postcopy.toml"' else "bad"
    if how == "toml":
        b = bytearray(text.encode())
        _flip(b, rng, rng.randint(1, 3))
        return b.decode("utf-8", "replace"), "bytes", "any"
    if how == "dup-axis":
        return text + 'seeds = [1]\n"seed" = [2]\n', "seed twice", "any"
    word = rng.choice(["strategies", "modes", "seeds"])
    val = rng.choice(['["mirror-vm", "shadow-vcpu"]', '["precopy"]', "[1, 2]", "[]", '"mirror-vm"', "[-1]",
                      f"[{2**64}]", '["nope"]'])
    lines.insert(2, f"{word} = {val}")
    return "\n".join(lines) + "\n", f"{word} = {val}", "any"


def _sweep_complete(out: str) -> Callable[[Path], str | None]:
    def check(d: Path) -> str | None:
        for name in ("results.parquet", "sweep.json"):
            if not (d / out / name).is_file():
                return f"{out}/{name} missing"
        return None
    return check


def case_sweep(rng: random.Random, d: Path, index: int) -> Case:
    """Sweep files and `replay sweep` options; a valid case runs one point on a one-worker local cluster."""
    text, desc, expect = _sweep_mutate(SWEEP_TEXT, rng)
    os.mkfifo(d / "fifo")
    (d / "sw.toml").write_text(text, errors="surrogateescape")
    out = "sw-out"
    argv = ["sweep", "sw.toml", "--out", out, "--no-progress"]
    r = rng.random()
    if r < 0.15:
        target = rng.choice(["existing", "sweepjson-other", "file", "trace", "dot", "scenario", "fixture-dir"])
        if target == "existing":
            (d / out).mkdir()
            (d / out / "results.parquet").write_bytes(b"someone's data")
        elif target == "sweepjson-other":
            (d / out).mkdir()
            (d / out / "sweep.json").write_text('{"format": "something-else"}')
        elif target == "file":
            (d / out).write_text("x")
        else:
            argv[3] = {"trace": "trace.arrow", "dot": ".", "scenario": "precopy.toml", "fixture-dir": "runs"}[target]
        return Case("sweep", index, argv, "bad", [], f"{desc}; --out {target}")
    if r < 0.45:
        opt = rng.choice(["--workers", "--scheduler", "--engine", "both"])
        if opt == "--workers":
            val = rng.choice(["0", "-1", "100000", str(2**64), "x", "", "1e3", "9" * 5000])
            argv += ["--workers", val]
            return Case("sweep", index, argv, "bad", [], f"{desc}; --workers {val[:20]}")
        if opt == "--scheduler":
            val = rng.choice(["", " ", "bogus", "host:8786", "tcp://", "tcp://h:abc", "udp://h:1", "tcp://h:0",
                              "tcp://h:99999", "tcp://h:1/x", "x" * 5000, "tcp://\x00:1", "inproc://x"])
            argv += ["--scheduler", val]
            return Case("sweep", index, argv, "bad", [], f"{desc}; --scheduler {val[:20]!r}")
        if opt == "--engine":
            argv += ["--engine", rng.choice(["reference", "nope", ""])]
            return Case("sweep", index, argv, "any" if argv[-1] == "reference" else "bad", [out], desc,
                        _sweep_complete(out))
        argv += ["--workers", "1", "--scheduler", "tcp://127.0.0.1:1"]
        return Case("sweep", index, argv, "bad", [], f"{desc}; --workers with --scheduler")
    argv += ["--workers", "1"]
    return Case("sweep", index, argv, expect, [out], desc, _sweep_complete(out))


def _adversary_spec(rng: random.Random) -> tuple[str, str]:
    """One --adversary value: valid, certainly bad by the grammar, or anything."""
    from replay.scenario.spec import ADVERSARY_KINDS, ADVERSARY_PACKET_KINDS

    kind = rng.choice(list(ADVERSARY_KINDS) + ["flp", "", "FLIP", "x" * 300])
    when = rng.choice(["", "@1ms", "@200us", "@0", "@0:1", "@1:0", "@forever", "@-1ms", "@1.5ms", "@1e3",
                       "@" + "9" * rng.choice([19, 21, 41, 5000]) + "ms", "@a:b", "@1:", "@:1", "@1ms@2ms", "@",
                       "@" + "1" * 25 + ":1"])
    opts = rng.choice(["", ",where=header", ",where=payload", ",host=target", ",host=\"source\"",
                       ",duration_ns=1ms", ",duration_ns=forever", ",duration_ns=0", ",where=middle", ",wher=header",
                       ",kind=drop", ",at_ns=1ms", ",stream=0,sequence=1", ",sequence=3", ",where=header,where=header",
                       ",,where=header", ",", ",where=", ",=x", ",where", ",duration_ns=" + "9" * 60])
    text = f"{kind}{when}{opts}"
    certainly_bad = (kind not in ADVERSARY_KINDS or when in ("@", "@1ms@2ms", "@a:b", "@1:", "@:1")
                     or opts in (",kind=drop", ",at_ns=1ms", ",stream=0,sequence=1", ",sequence=3",
                                 ",where=header,where=header", ",,where=header", ",", ",where=", ",=x", ",where",
                                 ",where=middle", ",wher=header", ",duration_ns=0")
                     or (":" in when and kind not in ADVERSARY_PACKET_KINDS)
                     or len(when) > 45)
    valid = (kind in ("flip", "drop", "replay", "truncate") and when in ("", "@1ms", "@200us", "@0")
             and opts in ("", ",where=header", ",where=payload"))
    return text, "bad" if certainly_bad else ("good" if valid else "any")


def case_adversary(rng: random.Random, d: Path, index: int) -> Case:
    """`replay run/compare --adversary SPEC` (one or two actions)."""
    spec, expect = _adversary_spec(rng)
    argv = ["run", rng.choice(["precopy.toml", "postcopy.toml"]), "--out", "out", "--no-progress", "--adversary", spec]
    notes = [spec[:60]]
    if rng.random() < 0.2:
        spec2, e2 = _adversary_spec(rng)
        argv += ["--adversary", spec2]
        notes.append(spec2[:60])
        expect = "bad" if "bad" in (expect, e2) else ("good" if expect == e2 == "good" else "any")
    if rng.random() < 0.1:
        argv[0], argv[3] = "compare", "cmp"
        return Case("adversary", index, argv, expect, ["cmp"], " ; ".join(notes), _complete_compare("cmp"))
    return Case("adversary", index, argv, expect, ["out"], " ; ".join(notes), _complete_run("out"))


def _section_case(rng: random.Random, d: Path, index: int, family: str, section: str, text: str) -> Case:
    base = rng.choice(["precopy", "postcopy"])
    scenario = (d / f"{base}.toml").read_text().replace("[kernel]\ngmem_link = true\n", "")
    (d / "s.toml").write_text(scenario + text, errors="surrogateescape")
    argv = ["run", "s.toml", "--out", "out", "--no-progress", "--strategy", rng.choice(["mirror-vm", "shadow-vcpu"])]
    if rng.random() < 0.3:
        argv.append("--data")
    return Case(family, index, argv, "any", ["out"], text.replace("\n", " ")[:120], _complete_run("out"))


def case_adversary_toml(rng: random.Random, d: Path, index: int) -> Case:
    """[[adversary]] entries with mutated keys and values."""
    entries = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choice(['"flip"', '"drop"', '"link-loss"', '"bad-tcb"', '"host-write-private"', '"flp"', "1", '""'])
        lines = [f"kind = {kind}"]
        for key in rng.sample(["at_ns", "stream", "sequence", "where", "host", "duration_ns", "wher", "extra"],
                              rng.randint(0, 3)):
            pool = _toml_values(rng) + ['"header"', '"target"', '"1ms"', "0", "3"]
            lines.append(f"{key} = {rng.choice(pool)}")
        entries.append("[[adversary]]\n" + "\n".join(lines) + "\n")
    text = "".join(entries)
    if rng.random() < 0.1:
        text = rng.choice(["adversary = 3\n", "adversary = []\n", "[adversary]\nkind = \"flip\"\n",
                           "adversary = [1, 2]\n"])
    return _section_case(rng, d, index, "adversary-toml", "adversary", text)


def case_attestation(rng: random.Random, d: Path, index: int) -> Case:
    """[attestation] with mutated TCB versions, measurements, policy bits and roots."""
    from replay.scenario.spec import AttestationSpec

    keys = [f.name for f in __import__("dataclasses").fields(AttestationSpec)] + ["min_tbc", "root"]
    tcbs = ['"9.0.23.72"', '"0.0.0.0"', '"255.255.255.255"', '"256.0.0.0"', '"9.0.23"', '"9.0.23.72.1"', '"a.b.c.d"',
            '"-1.0.0.0"', '"9..23.72"', '" 9.0.23.72"', '"' + "9" * 400 + '.0.0.0"', "9", '""']
    lines = ["[attestation]"]
    for key in rng.sample(keys, rng.randint(1, 4)):
        pool = tcbs if "tcb" in key else ['"svsm"', '"other"', '""', '"amd"', '"evil"', "true", "false", "1",
                                           '"' + "x" * 5000 + '"', "[]", "{}"]
        lines.append(f"{key} = {rng.choice(pool)}")
    return _section_case(rng, d, index, "attestation", "attestation", "\n".join(lines) + "\n")


def case_kernel(rng: random.Random, d: Path, index: int) -> Case:
    """[kernel]: profiles, capability switches, unknown keys."""
    from replay.scenario.spec import KERNEL_PROFILES, KernelCaps

    keys = [f.name for f in __import__("dataclasses").fields(KernelCaps)] + ["gmem_lnk", "planes"]
    lines = ["[kernel]"]
    for key in rng.sample(keys, rng.randint(1, 4)):
        if key == "profile":
            val = rng.choice([f'"{p}"' for p in KERNEL_PROFILES] + ['"linux-7.2"', '""', "1", '"custom"'])
        else:
            val = rng.choice(["true", "false", "true", "1", '"yes"', "[]"])
        lines.append(f"{key} = {val}")
    return _section_case(rng, d, index, "kernel", "kernel", "\n".join(lines) + "\n")


def case_data(rng: random.Random, d: Path, index: int) -> Case:
    """--data with data-mode keys set through --set (compression level, install path, threads)."""
    argv = [rng.choice(["run", "run", "compare"]), rng.choice(["precopy.toml", "postcopy.toml"]), "--out", "out",
            "--no-progress", "--data"]
    notes = []
    for _ in range(rng.randint(0, 2)):
        key = rng.choice(["migration.data_zstd_level", "migration.page_install", "migration.data", "costs.batch_pages",
                          "attestation.target_migratable", "attestation.target_root", "migration.fault_delivery"])
        val = rng.choice(["0", "1", "22", "23", "-1", "true", "false", '"install"', "copy", "nope", "64", str(2**64),
                          '""', "amd", "evil"])
        argv += ["--set", f"{key}={val}"]
        notes.append(f"{key}={val}")
    if argv[0] == "compare":
        return Case("data", index, argv, "any", ["out"], "; ".join(notes), _complete_compare("out"))
    return Case("data", index, argv, "any", ["out"], "; ".join(notes), _complete_run("out"))


def case_adversary_matrix(rng: random.Random, d: Path, index: int) -> Case:
    """`replay adversary-matrix` with mutated --kinds/--modes/--out; a valid case runs one or two kinds."""
    from replay.scenario.spec import ADVERSARY_KINDS

    ok_kinds = ",".join(rng.sample(["flip", "drop", "bad-tcb", "link-loss"], rng.choice([1, 2])))
    kinds = rng.choice([ok_kinds] * 3 + ["flip,,drop", ",flip", "flip,", "flip,flip", "", " , ", "flp", "x" * 3000,
                                         ",".join(ADVERSARY_KINDS[:2]) + ",nope"])
    modes = rng.choice(["precopy"] * 3 + ["postcopy", "precopy,postcopy", "precopy,,postcopy", "hybrid", "",
                                          "precopy,precopy", "pre-copy"])
    out = rng.choice(["mx"] * 6 + [".", "precopy.toml", "trace.arrow", "runs/precopy-mirror-vm", ""])
    argv = ["adversary-matrix", rng.choice(["precopy.toml", "postcopy.toml"]), "--out", out, "--kinds", kinds,
            "--modes", modes]
    good = kinds == ok_kinds and modes in ("precopy", "postcopy", "precopy,postcopy", "hybrid") and out == "mx"
    bad = (kinds != ok_kinds and kinds != ",".join(ADVERSARY_KINDS[:2]) + ",nope") or modes in (
        "precopy,,postcopy", "", "precopy,precopy", "pre-copy") or out != "mx"
    expect = "good" if good else ("bad" if bad else "any")
    return Case("adversary-matrix", index, argv, expect, ["mx"], f"{kinds[:40]} / {modes} / {out}",
                _complete_file("mx/report.html", b"</html>"))


def case_verify(rng: random.Random, d: Path, index: int) -> Case:
    """`replay verify` over several paths: intact and damaged traces and run directories, and paths that
    are neither (a scenario, a sweep-like directory, a FIFO, nothing)."""
    paths = []
    expect = "good"
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["trace", "run", "run", "damaged-trace", "damaged-run", "other"])
        if kind == "trace":
            paths.append("trace.arrow")
        elif kind == "run":
            paths.append("runs/" + rng.choice(sorted(p.name for p in (d / "runs").iterdir())))
        elif kind == "damaged-trace":
            name = f"t{len(paths)}.arrow"
            data, _ = _mutate_bytes((d / "trace.arrow").read_bytes(), rng)
            (d / name).write_bytes(data)
            paths.append(name)
            if _trace_expectation(data, (d / "trace.arrow").read_bytes()) == "bad":
                expect = "bad"
            elif expect == "good":
                expect = "any"
        elif kind == "damaged-run":
            src = d / "runs" / rng.choice(sorted(p.name for p in (d / "runs").iterdir()))
            dst = d / f"r{len(paths)}"
            shutil.copytree(src, dst)
            f = dst / rng.choice(sorted(p.name for p in dst.iterdir()))
            data, _ = _mutate_bytes(f.read_bytes(), rng)
            if data == f.read_bytes():
                data = data + b" "
            f.write_bytes(data)
            paths.append(dst.name)
            expect = "bad"
        else:
            other = rng.choice(["precopy.toml", "runs", ".", "nope", "", "fifo", "/dev/null", "accesses.csv",
                                "x" * 5000])
            if other == "fifo" and not (d / "fifo").exists():  # the same path may be named twice
                os.mkfifo(d / "fifo")
            paths.append(other)
            expect = "bad"
    return Case("verify", index, ["verify", *paths], expect, [], " ".join(p[:30] for p in paths))


# Shares of the issue-19 families (per mille of the original 1,000): with the campaign's default of
# 12,000 cases they get 2,000 of them (the original families keep their 10,000).
NEW_FAMILIES = {"sweep": 30, "adversary": 35, "adversary-toml": 25, "attestation": 25, "kernel": 20, "data": 20,
                "adversary-matrix": 10, "verify": 35}


FAMILIES: dict[str, tuple[Callable[[random.Random, Path, int], Case], int]] = {
    # family: (generator, share of a campaign in per mille)
    "trace-bytes": (case_trace_bytes, 200),
    "trace-struct": (case_trace_struct, 170),
    "scenario": (case_scenario, 170),
    "set": (case_set, 170),
    "import": (case_import, 110),
    "rundir": (case_rundir, 90),
    "overlap": (case_overlap, 20),
    "cli": (case_cli, 70),
    # issue 19's surfaces (NEW_FAMILIES gives their shares)
    "sweep": (case_sweep, NEW_FAMILIES["sweep"]),
    "adversary": (case_adversary, NEW_FAMILIES["adversary"]),
    "adversary-toml": (case_adversary_toml, NEW_FAMILIES["adversary-toml"]),
    "attestation": (case_attestation, NEW_FAMILIES["attestation"]),
    "kernel": (case_kernel, NEW_FAMILIES["kernel"]),
    "data": (case_data, NEW_FAMILIES["data"]),
    "adversary-matrix": (case_adversary_matrix, NEW_FAMILIES["adversary-matrix"]),
    "verify": (case_verify, NEW_FAMILIES["verify"]),
}


def plan(n: int) -> list[tuple[str, int]]:
    """``n`` cases split across the families by their shares, interleaved (so a short run covers all)."""
    total = sum(s for _, s in FAMILIES.values())
    counts = {f: max(1, n * s // total) for f, (_, s) in FAMILIES.items()}
    counts["trace-bytes"] += max(0, n - sum(counts.values()))
    return [(f, i) for i in range(max(counts.values())) for f in FAMILIES if i < counts[f]]


# ------------------------------------------------------------------------------------------ checking

def _snapshot(root: Path) -> dict[str, tuple[str, str]]:
    snap: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
                snap[rel] = ("file", h)
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", "")
            elif stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            else:
                snap[rel] = ("other", str(stat.S_IFMT(st.st_mode)))
    return snap


def _under(rel: str, outputs: list[str]) -> bool:
    return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs)


def _is_temp(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def run_case(family: str, index: int, seed: int, fixtures: Path, scratch: Path) -> dict:
    """Build and run one case in-process; classify it. Called in a worker."""
    rng = random.Random(f"{seed}:{family}:{index}")
    d = scratch / f"{family}-{index}"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(fixtures, d, symlinks=True)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        case = FAMILIES[family][0](rng, d, index)
        before = _snapshot(d)
        out_b, err_b = io.BytesIO(), io.BytesIO()
        out = io.TextIOWrapper(out_b, encoding="utf-8", errors="backslashreplace", write_through=True)
        err = io.TextIOWrapper(err_b, encoding="utf-8", errors="backslashreplace", write_through=True)
        saved = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO("")
        escaped = None
        try:
            rc = _main(list(case.argv))
        except SystemExit as exc:  # argparse --help/--version
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except BaseException as exc:  # noqa: BLE001 - an escaped exception is what we are looking for
            rc = None
            escaped = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-300:]
        finally:
            sys.stdout, sys.stderr, sys.stdin = saved
        stderr = err_b.getvalue().decode("utf-8", "replace")
        after = _snapshot(d)
        result = classify(case, rc, stderr, escaped, before, after, d)
        result.update(family=family, index=index, argv=case.argv, note=case.note, expect=case.expect)
        return result
    finally:
        os.chdir(cwd)
        shutil.rmtree(d, ignore_errors=True)


def classify(case: Case, rc, stderr: str, escaped, before: dict, after: dict, d: Path) -> dict:
    lines = [l for l in stderr.splitlines() if l.strip()]
    changed_inputs = sorted(k for k, v in before.items() if after.get(k) != v and not _under(k, case.outputs))
    new = sorted(k for k in after if k not in before)
    detail = ""
    if escaped is not None or "Traceback (most recent call last)" in stderr:
        cls, detail = "traceback", escaped or stderr[-300:]
    elif changed_inputs:
        cls, detail = "input-changed", ", ".join(changed_inputs[:5])
    elif rc == 2 and (new or any(after.get(k) != v for k, v in before.items())):
        cls, detail = "partial-output", ", ".join(new[:5]) or "an existing output changed"
    elif rc in (0, 1) and any(_is_temp(k) or not _under(k, case.outputs) for k in new):
        cls, detail = "partial-output", ", ".join(k for k in new if _is_temp(k) or not _under(k, case.outputs))[:300]
    elif rc in (0, 1) and case.expect == "bad":
        cls, detail = "wrong-success", stderr[-200:]
    elif rc == 2 and case.expect == "good":
        cls, detail = "wrong-refusal", stderr[-300:]
    elif rc == 2 and (len(lines) != 1 or len(lines[0]) > ERROR_LINE_MAX):
        cls = "bad-message"
        detail = f"{len(lines)} line(s), longest {max((len(l) for l in lines), default=0)} chars: {stderr[:200]}"
    elif rc == 2:
        cls, detail = "clean-error", lines[0][:300]
    elif rc in (0, 1):
        problem = case.check(d) if case.check and case.argv and case.argv[0] not in ("--help", "--version") else None
        cls, detail = ("incomplete-output", problem) if problem else ("ok", "")
    else:
        cls, detail = "internal-error", f"exit {rc}: {stderr[-300:]}"
    return {"class": cls, "rc": rc, "detail": detail}


# ------------------------------------------------------------------------------------------ workers

def worker_main(seed: int) -> None:
    """Serve cases read from stdin ("family index" per line), one JSON result per line on stdout."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    root = Path(tempfile.mkdtemp(prefix="snp-fuzz-"))
    os.environ["SNP_REPLAY_CACHE"] = str(root / "cache")
    fixtures, scratch = root / "fixtures", root / "scratch"
    scratch.mkdir()
    results = sys.stdout
    sys.stdout = sys.stderr  # nothing but results on the pipe
    build_fixtures(fixtures)
    results.write("ready\n")
    results.flush()
    try:
        for line in sys.stdin:
            family, index = line.split()
            try:
                res = run_case(family, int(index), seed, fixtures, scratch)
            except Exception as exc:  # noqa: BLE001 - the fuzzer's own setup failed: report, do not die
                res = {"class": "fuzzer-error", "family": family, "index": int(index),
                       "detail": "".join(traceback.format_exception(exc))[-600:]}
            results.write(json.dumps(res, default=repr) + "\n")
            results.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Worker:
    def __init__(self, seed: int, repo: Path, python: str):
        self.proc = subprocess.Popen(
            [python, "-c", "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import fuzzlib; fuzzlib.worker_main(int(sys.argv[3]))",
             str(repo), str(HERE), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(repo),
            start_new_session=True, env={**os.environ, "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"},
        )
        self.buf = b""
        self.case: tuple[str, int] | None = None
        self.started = 0.0
        self.ready = False

    def send(self, case: tuple[str, int]) -> None:
        self.case = case
        self.started = time.monotonic()
        self.proc.stdin.write(f"{case[0]} {case[1]}\n".encode())
        self.proc.stdin.flush()

    def kill(self) -> int | None:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def run_campaign(n: int, seed: int = 0, *, workers: int = 2, repo: Path = REPO, timeout: float = CASE_TIMEOUT_S,
                 cases: list[tuple[str, int]] | None = None, python: str = sys.executable,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``n`` planned cases (or ``cases``) against the code in ``repo``; counts and failures."""
    todo = list(cases if cases is not None else plan(n))
    total = len(todo)
    counts = {c: 0 for c in CLASSES}
    by_family: dict[str, dict[str, int]] = {}
    failures: list[dict] = []
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []

    def start() -> _Worker:
        w = _Worker(seed, repo, python)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        pool.append(w)
        return w

    def record(res: dict) -> None:
        cls = res["class"]
        counts[cls] = counts.get(cls, 0) + 1
        fam = by_family.setdefault(res["family"], {})
        fam[cls] = fam.get(cls, 0) + 1
        if cls not in GOOD_CLASSES:
            failures.append(res)
        if progress:
            progress(sum(counts.values()), total)

    def retire(w: _Worker, cls: str | None, detail: str) -> None:
        sel.unregister(w.proc.stdout)
        rc = w.kill()
        pool.remove(w)
        if w.case is not None and cls is not None:
            record({"class": cls, "family": w.case[0], "index": w.case[1], "detail": detail, "rc": rc, "seed": seed})
        elif w.case is not None:
            record({"class": "signal" if rc and rc < 0 else "traceback", "family": w.case[0], "index": w.case[1],
                    "detail": f"worker died with status {rc}", "rc": rc, "seed": seed})

    for _ in range(workers):
        start()
    try:
        while todo or any(w.case for w in pool):
            for w in pool:
                if w.ready and w.case is None and todo:
                    w.send(todo.pop(0))
            for key, _ in sel.select(timeout=0.5):
                w = key.data
                chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    retire(w, None, "")
                    if todo or any(x.case for x in pool) or len(pool) < workers:
                        start()
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    if line == b"ready":
                        w.ready = True
                        continue
                    res = json.loads(line)
                    res["seed"] = seed
                    w.case = None
                    record(res)
            now = time.monotonic()
            for w in list(pool):  # noqa: PERF101 - retire() and start() change the pool
                if w.case is not None and now - w.started > timeout:
                    retire(w, "hang", f"no result after {timeout:.0f} s")
                    start()
            while len(pool) < workers and todo:
                start()
    finally:
        for w in pool:
            with __import__("contextlib").suppress(Exception):
                w.proc.stdin.close()
            w.kill()
    counts = {c: v for c, v in counts.items() if v or c in CLASSES}
    return {"total": total, "counts": counts, "by_family": by_family, "failures": failures, "seed": seed}


def save_to_corpus(failures: list[dict], corpus: Path = CORPUS) -> int:
    """Record failing cases (seed, family, index) so every later run replays them."""
    corpus.mkdir(parents=True, exist_ok=True)
    path = corpus / "cases.jsonl"
    def key(r: dict) -> tuple:
        return (int(r["seed"]), r["family"], int(r["index"]))

    known = set()
    if path.exists():
        known = {key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}
    added = 0
    with open(path, "a") as f:
        for r in failures:
            if r.get("class") == "fuzzer-error" or key(r) in known:
                continue
            f.write(json.dumps({"seed": r["seed"], "family": r["family"], "index": r["index"],
                                "class": r["class"]}, sort_keys=True) + "\n")
            known.add(key(r))
            added += 1
    return added


def load_corpus(corpus: Path = CORPUS) -> dict[int, list[tuple[str, int]]]:
    """Corpus cases grouped by seed."""
    path = corpus / "cases.jsonl"
    out: dict[int, list[tuple[str, int]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(int(r["seed"]), []).append((r["family"], int(r["index"])))
    return out
