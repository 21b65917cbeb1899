"""The validation layer: the reusable rules every input passes before any engine, numpy or polars sees it.

- ``short(value)``: how a message quotes a bad value (a prefix of at most ``QUOTE_MAX`` characters), so
  an error line stays one short line whatever the user typed.
- ``check_depth`` / ``load_json``: nesting depth and JSON parsing without RecursionError.
- Scenario keys (``check_key``): a key's type comes from its dataclass default (bool, int, str, table),
  its range and unit from ``KEY_RULES`` (or, for an int key not listed there, from its name: ``*_ns`` is
  a duration, ``*_bytes`` a size; every int must fit the engine's unsigned 64-bit fields). A key the lead
  adds to ``replay/scenario/spec.py`` as a plain field with a default is therefore checked without an edit here.
- Resources (``check_memory``, ``check_disk``): what a run, an inspect or a generator needs, estimated from
  the guest size and vCPUs, against what the machine has; refused with one line naming both.
- Run records (``check_summary``): the shape, types and ranges of a run directory's ``summary.json``.

Every failure is a ``ReplayError`` subclass with a one-line message naming what and where.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from .errors import ReplayError, ResourceError, RunDirError, ScenarioError

QUOTE_MAX = 60  # characters of a bad value a message may quote
MAX_DEPTH = 32  # nesting of tables/arrays in a scenario, trace metadata or a run record
MAX_STRING = 4096  # characters of a scenario string (names, descriptions, paths)
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
ENGINE_MAX = (1 << 62) - 1  # the engine's transfer clock takes int64 operands below 2^62
PAGE_SIZE = 4096
MAX_GUEST_PAGES = 1 << 32  # the engines index pages with uint32 gfns
MAX_GUEST_BYTES = MAX_GUEST_PAGES * PAGE_SIZE - PAGE_SIZE  # 16 TiB - 4 KiB: the largest guest a trace describes
# The largest guest a run migrates: the SVSM's VMSA pages (the engines' VMSA_SPARE, 1,024) take the gfns just
# past the guest's, in the same 32-bit gfn space, so a run's guest leaves them room: 16 TiB - 4 MiB.
MAX_RUN_GUEST_PAGES = MAX_GUEST_PAGES - 1024
MAX_RUN_GUEST_BYTES = MAX_RUN_GUEST_PAGES * PAGE_SIZE
MAX_VCPUS = 1 << 16  # the trace's vcpu column is uint16
RUN_TRACE_END_MAX = I64_MAX  # the last t_ns of a trace a run replays: the run's clock needs room after it
MAX_ROUNDS = 100_000  # pre-copy rounds: far beyond any convergence (QEMU's guestperf uses 30)


def short(value: Any, limit: int = QUOTE_MAX) -> str:
    """``repr(value)`` cut to ``limit`` characters (with an ellipsis and the full length when cut)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested containers; ints beyond str() limits
        return f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def clip(text: str, limit: int = 200) -> str:
    """Message text (not a quoted value) cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of dicts/lists in ``obj``, iteratively (stops counting past ``limit`` + 1)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children)
    return deepest


def load_json(data: bytes | str, where: str, error: type[ReplayError] = RunDirError, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON without letting a deep document reach the recursive decoder's limit, or NaN in."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    # Brackets nest at most as deep as they occur; a cheap bound before the recursive parser runs.
    opened = 0
    worst = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            opened += 1
            worst = max(worst, opened)
            if worst > max_depth:
                raise error(f"{where}: nested deeper than {max_depth} levels")
        elif ch in "]}":
            opened -= 1

    def no_constant(name: str):
        raise ValueError(f"{name} is not a number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"{where}: malformed JSON ({clip(str(exc), 120)})") from None


# ------------------------------------------------------------------------------------------ scenario keys

# Durations and sizes: one step may cost at most ~36 minutes or 2 TiB, so that a run's sums (pages x
# cost) stay inside the records' unsigned 64-bit columns for any guest the engines hold.
COST_MAX = 1 << 41

# (section, key) -> (lowest, highest, unit). Sections: "" (top level), guest, trace, migration, costs,
# kernel, fault. Keys not listed take the rule of their name (see ``_default_rule``).
KEY_RULES: dict[tuple[str, str], tuple[int, int, str]] = {
    ("", "seed"): (0, U64_MAX, ""),
    ("guest", "guest_bytes"): (0, MAX_RUN_GUEST_BYTES, "bytes"),  # 0: the trace's
    ("guest", "vcpus"): (0, MAX_VCPUS, "vCPUs"),  # 0: the trace's
    ("guest", "os_vmpl"): (0, 3, "VMPL"),
    ("guest", "apic_id_first"): (0, (1 << 32) - 1, ""),
    ("guest", "apic_id_last"): (-1, (1 << 32) - 1, ""),  # -1: derived from vcpus
    ("guest", "asid"): (1, (1 << 32) - 1, ""),
    ("trace", "events"): (0, I64_MAX, "events"),
    ("trace", "rate"): (1, I64_MAX, "accesses per second"),
    ("trace", "seed"): (-1, U64_MAX, ""),  # -1: the scenario's
    ("migration", "bandwidth_bytes_per_s"): (1, ENGINE_MAX, "bytes per second"),
    ("migration", "latency_ns"): (0, COST_MAX, "ns"),
    ("migration", "latency_jitter_ns"): (0, COST_MAX, "ns"),
    ("migration", "max_rounds"): (1, MAX_ROUNDS, "rounds"),
    ("migration", "precopy_rounds"): (0, MAX_ROUNDS, "rounds"),
    ("migration", "agents_initial"): (1, 1 << 16, "agents"),
    ("migration", "agents_max"): (1, 1 << 16, "agents"),
    ("migration", "shadow_apic_id_base"): (0, (1 << 32) - 1, ""),
    ("migration", "shadow_apic_ids"): (0, 1 << 16, "APIC IDs"),
    ("migration", "prepage_pages"): (0, MAX_GUEST_PAGES, "pages"),
    ("costs", "batch_pages"): (1, MAX_GUEST_PAGES, "pages"),
    ("fault", "duration_ns"): (-1, ENGINE_MAX, "ns"),  # -1: forever
    ("adversary", "at_ns"): (-1, ENGINE_MAX, "ns"),  # -1: not given
    ("adversary", "stream"): (-1, (1 << 16) - 1, ""),
    ("adversary", "sequence"): (-1, ENGINE_MAX, ""),
    ("adversary", "duration_ns"): (-1, ENGINE_MAX, "ns"),  # -1: forever
}


def _default_rule(section: str, key: str) -> tuple[int, int, str]:
    hi = COST_MAX if section == "costs" else ENGINE_MAX
    if key.endswith(("_ns", "_ns_per_gib")):
        return 0, hi, "ns"
    if key.endswith(("_bytes", "_bytes_per_s")):
        return 0, hi, "bytes"
    return 0, hi, ""


def key_rule(section: str, key: str) -> tuple[int, int, str]:
    """The (lowest, highest, unit) of an integer scenario key."""
    return KEY_RULES.get((section, key)) or _default_rule(section, key)


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, str):
        return "str"
    if isinstance(default, Mapping):
        return "table"
    return "any"


def check_key(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    """``value`` for scenario key ``section.key`` (type of ``default``), checked; ScenarioError if not."""
    kind = _kind(default)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}: expected true or false, got {short(value)}")
        return value
    if kind == "int":
        lo, hi, unit = key_rule(section, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: expected an integer{' (' + unit + ')' if unit else ''}, got {short(value)}")
        if not lo <= value <= hi:
            u = f" {unit}" if unit else ""
            bound = f">= {lo}" if value < lo else f"<= {hi}"
            raise ScenarioError(f"{where}: must be {bound}{u}, got {short(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ScenarioError(f"{where}: expected a string, got {short(value)}")
        if len(value) > MAX_STRING:
            raise ScenarioError(f"{where}: string of {len(value)} characters (at most {MAX_STRING})")
        if "\x00" in value:
            raise ScenarioError(f"{where}: string contains a NUL character")
        return value
    if kind == "table":
        if not isinstance(value, Mapping):
            raise ScenarioError(f"{where}: expected a table, got {short(value)}")
        if depth(value) > 4:
            raise ScenarioError(f"{where}: nested deeper than 4 levels")
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ScenarioError(f"{where}.{k}: {short(v)} is not a finite number")
        return dict(value)
    return value


ROUND_WORK_BUDGET = 1 << 35  # rounds x guest pages: each round scans the dirty log of every page (~2 ns)
ROUNDS_FREE = 1_000  # any guest may have this many rounds (the default is 30)


def max_rounds_for(npages: int) -> int:
    """The most pre-copy rounds a run of a guest of ``npages`` pages may ask for."""
    return min(MAX_ROUNDS, max(ROUNDS_FREE, ROUND_WORK_BUDGET // max(1, npages)))


def check_round_budget(migration: Any, npages: int) -> None:
    """Bound a run's work before it starts: a hybrid run does all its ``precopy_rounds`` (they do not stop
    when nothing is dirty) and a non-converging pre-copy all its ``max_rounds``, each scanning every page.
    The driver can call this with the trace's page count; ``replay run``/``compare`` do."""
    for key in ("max_rounds", "precopy_rounds"):
        rounds = getattr(migration, key, 0)
        limit = max_rounds_for(npages)
        if rounds > limit:
            raise ScenarioError(f"migration.{key} {rounds} is too many for a guest of {npages} pages: at most {limit} "
                                f"(rounds x pages <= 2^35, so that a run ends in bounded time)")


# ------------------------------------------------------------------------------------------ resources

# Bytes of state per guest page while a run is in progress, measured as peak RSS on a 1 TiB guest whose
# trace writes every page (the worst case, which this check must cover):
#   pre-copy: the engine's 2 hosts x (4 B version + 1 B flags), RMP entries only where they differ
#   from launch's (the reference engine is freed first): 10.5 B/page;
#   post-copy adds the per-page ready times of the pages in flight: 20.0 B/page.
# A version no write reached is never stored (docs/internals.md), so a trace touching few pages needs far
# less (1 TiB guest, 64 GiB touched: 2.8 B/page pre-copy, 10.8 post-copy); the estimate stays the worst case.
RUN_BYTES_PER_PAGE = 24
INSPECT_BYTES_PER_PAGE = 2  # two page bitmaps (bool)
BATCH_OVERHEAD = 256 << 20  # one decoded batch (1M rows x 31 B), its decompression, polars/arrow pools
TRACE_ROW_BYTES = 31  # uncompressed row: 8 + 2 + 8 + 4 + 1 + 8


def run_memory_bytes(guest_bytes: int, vcpus: int) -> int:
    pages = guest_bytes // PAGE_SIZE
    return pages * RUN_BYTES_PER_PAGE + vcpus * 64 + BATCH_OVERHEAD


def inspect_memory_bytes(guest_bytes: int, intervals: int = 0) -> int:
    return (guest_bytes // PAGE_SIZE) * INSPECT_BYTES_PER_PAGE + intervals * 16 + BATCH_OVERHEAD


def available_memory_bytes() -> int:
    """Memory this process may still allocate: MemAvailable, capped by an address-space limit."""
    avail = machine_available_bytes()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, soft)
    return avail


def machine_available_bytes() -> int:
    """The machine's available memory (MemAvailable), whatever this process's limits."""
    avail = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 1 << 62
    return avail


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def check_memory(need: int, what: str, allow: bool = False, processes: int = 1) -> None:
    """Refuse (ResourceError) when ``need`` bytes exceed what the machine has, unless ``allow``.
    ``processes``: that many processes each need ``need`` at the same time (compare's workers): together
    against the machine's available memory, each against the address-space limit (a per-process one)."""
    if allow:
        return
    have = available_memory_bytes()
    if processes > 1:
        total, machine = need * processes, machine_available_bytes()
        if total > machine:
            raise ResourceError(f"{what} needs about {_gib(total)} of memory ({processes} processes of "
                                f"{_gib(need)}) but this machine has {_gib(machine)} available "
                                f"(--allow-memory to try anyway)")
    if need > have:
        raise ResourceError(f"{what} needs about {_gib(need)} of memory but this machine has {_gib(have)} available "
                            f"(--allow-memory to try anyway)")


def check_disk(need: int, directory: str | os.PathLike, what: str) -> None:
    """Refuse when ``need`` bytes of temporary/output space exceed the free space of ``directory``."""
    try:
        free = shutil.disk_usage(Path(directory) if str(directory) else Path(".")).free
    except OSError:
        return
    if need > free:
        raise ResourceError(f"{what} needs about {_gib(need)} of disk in {directory} but only {_gib(free)} is free")


# ------------------------------------------------------------------------------------------ run records

_T_INT, _T_STR, _T_BOOL, _T_DICT, _T_LIST = "int", "str", "bool", "dict", "list"

# Top-level keys of summary.json and their types; metrics/digests/invariants are checked below.
SUMMARY_KEYS = {
    "format": _T_STR, "version": _T_INT, "status": _T_STR, "status_reason": _T_STR, "strategy": _T_STR,
    "mode": _T_STR, "scenario": _T_DICT, "trace": _T_DICT, "metrics": _T_DICT, "digests": _T_DICT,
    "invariants": _T_DICT, "tool": _T_DICT, "first_faults": _T_LIST, "adversary": _T_LIST,
    "adversary_effects": _T_DICT,
}
REQUIRED = ("status", "strategy", "mode", "scenario", "trace", "metrics", "digests", "invariants")
TRACE_KEYS = {"digest": _T_STR, "events": _T_INT, "guest_bytes": _T_INT, "vcpus": _T_INT, "source": _T_DICT}
# Metric leaves with a type other than a non-negative int.
METRIC_TYPES = {"switchover_reason": _T_STR, "downtime_limit_exceeded": _T_BOOL, "switchover_rule": _T_STR,
                "action": _T_STR, "compress": _T_BOOL, "detected_by": _T_STR, "handshake_refused_by": _T_STR,
                "handshake_verdict": _T_STR, "token": _T_STR, "model": _T_STR}


def _type_ok(value: Any, t: str) -> bool:
    if t == _T_INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if t == _T_BOOL:
        return isinstance(value, bool)
    if t == _T_STR:
        return isinstance(value, str)
    if t == _T_DICT:
        return isinstance(value, dict)
    return isinstance(value, list)


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise RunDirError(f"{where}: {msg}")


def _check_metrics(obj: Any, where: str, path: str) -> None:
    """Metric leaves: integers in 0..2^64-1 (records hold no floats), or the few named strings/bools."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_metrics(v, where, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_metrics(v, where, f"{path}[{i}]")
    else:
        leaf = path.rsplit(".", 1)[-1]
        t = METRIC_TYPES.get(leaf, _T_INT)
        _need(_type_ok(obj, t), where, f"{path} is {short(obj)}, expected {'an integer' if t == _T_INT else 'a ' + t}")
        if t == _T_INT:
            _need(0 <= obj <= U64_MAX, where, f"{path} {short(obj)} is out of range 0..2^64-1")


def check_summary(summary: Any, where: str, *, strategies: Sequence[str], modes: Sequence[str],
                  statuses: Sequence[str]) -> dict:
    """A run record's summary, checked for the shape every reader relies on (RunDirError if not); the
    values its strategy, mode and status may take come from the writer's modules."""
    _need(isinstance(summary, dict), where, "not a JSON object")
    _need(depth(summary) <= MAX_DEPTH, where, f"nested deeper than {MAX_DEPTH} levels")
    for key in REQUIRED:
        _need(key in summary, where, f"missing key {key!r}")
    for key, t in SUMMARY_KEYS.items():
        if key in summary:
            _need(_type_ok(summary[key], t), where, f"{key} is {short(summary[key])}, expected a {t}")
    _need(summary["status"] in statuses, where, f"status {short(summary['status'])} is not one of {', '.join(statuses)}")
    _need(summary["strategy"] in strategies, where, f"strategy {short(summary['strategy'])} is not one of {', '.join(strategies)}")
    _need(summary["mode"] in modes, where, f"mode {short(summary['mode'])} is not one of {', '.join(modes)}")
    for key, t in TRACE_KEYS.items():
        _need(key in summary["trace"] and _type_ok(summary["trace"][key], t), where,
              f"trace.{key} is missing or not a {t}")
    for name, value in summary["digests"].items():
        # memory digests are 256-bit (blake2b); switchover digests 128-bit set hashes
        _need(isinstance(value, str) and (value == "" or (len(value) in (32, 64) and all(c in "0123456789abcdef" for c in value))),
              where, f"digests.{name} {short(value)} is not a hex digest")
    for name, value in summary["invariants"].items():
        _need(isinstance(value, bool), where, f"invariants.{name} {short(value)} is not true/false")
    _check_metrics(summary["metrics"], where, "metrics")
    hist = summary["metrics"].get("postcopy", {})
    _need(isinstance(hist, dict), where, "metrics.postcopy is not an object")
    for i, b in enumerate(hist.get("latency_hist", [])):
        _need(isinstance(b, dict) and all(isinstance(b.get(k), int) for k in ("bucket_us_lo", "bucket_us_hi", "count")),
              where, f"metrics.postcopy.latency_hist[{i}] is not a bucket (bucket_us_lo, bucket_us_hi, count)")
    for key in ("cpu_ns", "faults", "rmp"):
        _need(isinstance(summary["metrics"].get(key, {}), dict), where, f"metrics.{key} is not an object")
    for i, f in enumerate(summary.get("first_faults", [])):
        # [event index (-1: not a trace row, e.g. a host write), fault kind, gfn], as the engines report them
        _need(isinstance(f, list) and len(f) == 3 and _type_ok(f[0], _T_INT) and _type_ok(f[1], _T_STR)
              and _type_ok(f[2], _T_INT), where, f"first_faults[{i}] is not [event, kind, gfn]")
    for i, a in enumerate(summary.get("adversary", [])):
        _need(isinstance(a, dict) and all(isinstance(a.get(k), str) for k in ("kind", "at", "outcome", "detected_by")),
              where, f"adversary[{i}] is not an action (kind, at, outcome, detected_by)")
    return summary

