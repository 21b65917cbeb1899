"""Page-engine selection and the value types both engines return.

Two engines implement the Engine API of docs/internals.md with identical semantics:

- ``"cython"``: ``replay.engines._engine.Engine`` (cext/_engine.pyx), the fast one, used by the driver;
- ``"reference"``: ``replay.engines.reference.Engine``, pure Python, the executable statement of the semantics.

``tests/test_engine_*.py`` run every engine test against both and compare them on random operations.
This module holds what both share (the ``RmpEntry`` / ``PageView`` tuples, the batch and delay argument
checks) so that they return equal values and reject bad arguments with the same exceptions. It imports
neither engine (both import it); ``replay.engines.make_engine`` chooses one by name.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa

from replay.core.errors import TraceError
from replay.model.snp import VMPLS

ENGINE_KINDS = ("cython", "reference")

#: RMP entries past each host's guest pages, for VMSA pages (agents' and vCPUs' VMSAs) and other
#: hypervisor-side pages. Mirrored in cext/_engine.pxd.
VMSA_SPARE = 1024

#: Engine page-state flag bits (``flags(host, gfns)``). Mirrored in cext/_engine.pxd.
PRIVATE = 1
DIRTY = 2
PRESENT = 4
SEND = 8  # still to send: the migration's own bitmap (QEMU's RAM bitmap), fed by sync_dirty()
MAPPED = 16  # an agent has touched the page through its own nested page table (mirror VM)

#: Column names and Arrow types of a trace batch (trace format v1, SPEC section 2), in schema order.
BATCH_COLUMNS = (
    ("t_ns", pa.uint64()),
    ("vcpu", pa.uint16()),
    ("gpa", pa.uint64()),
    ("len", pa.uint32()),
    ("op", pa.uint8()),
    ("value", pa.uint64()),
)

U64_MAX = (1 << 64) - 1


class RmpEntry(NamedTuple):
    """One RMP entry as seen through ``Engine.rmp_entry``; ``perms`` is the 4-tuple of VMPL masks."""

    assigned: bool
    asid: int
    gfn: int
    size_2m: bool
    immutable: bool
    validated: bool
    vmsa: bool
    perms: tuple[int, int, int, int]


class PageView(NamedTuple):
    """One guest page of one host's memory image, as seen through ``Engine.page``."""

    version: int
    private: bool
    dirty: bool
    present: bool


def check_batch(batch: pa.RecordBatch) -> None:
    """Raise TypeError unless ``batch`` is a RecordBatch with the trace schema, ValueError on nulls."""
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"expected a pyarrow.RecordBatch, got {type(batch).__name__}")
    schema = batch.schema
    if len(schema) != len(BATCH_COLUMNS) or any(
        schema.field(i).name != name or schema.field(i).type != typ
        for i, (name, typ) in enumerate(BATCH_COLUMNS)
    ):
        raise TypeError(f"record batch does not have the trace schema: {schema.to_string(show_schema_metadata=False)!r}")
    for i, (name, _) in enumerate(BATCH_COLUMNS):
        if batch.column(i).null_count:
            raise TraceError(f"record batch column {name!r} has nulls")


def as_delays(delays, vcpus: int):
    """Per-vCPU guest delays as a contiguous uint64 array of length ``vcpus`` (None stays None)."""
    if delays is None:
        return None
    arr = np.ascontiguousarray(delays, dtype=np.uint64)
    if arr.ndim != 1 or arr.shape[0] != vcpus:
        raise ValueError(f"delays must have one entry per vCPU ({vcpus}), got shape {arr.shape}")
    return arr


#: Hosts an engine can hold (machines a guest can live on in one run). Mirrored in cext/_engine.pxd.
MAX_HOSTS = 64


def check_engine_args(npages, vcpus, asid, os_vmpl, hosts, spa_base):
    """The Engine constructor's arguments, validated and normalized (both engines call this)."""
    npages, vcpus, asid, os_vmpl, hosts = int(npages), int(vcpus), int(asid), int(os_vmpl), int(hosts)
    if not 1 <= npages < 1 << 32:
        raise ValueError(f"npages must be in [1, 2**32), got {npages}")
    if not 1 <= vcpus <= 1 << 16:
        raise ValueError(f"vcpus must be in [1, 65536], got {vcpus}")
    if not 1 <= asid < 1 << 32:
        raise ValueError(f"asid must be in [1, 2**32), got {asid}")
    if not 0 <= os_vmpl < VMPLS:
        raise ValueError(f"os_vmpl must be in [0, {VMPLS}), got {os_vmpl}")
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts must be in [1, {MAX_HOSTS}], got {hosts}")
    if spa_base is None:
        spa_base = [1024 * (h + 1) for h in range(hosts)]
    spa_base = tuple(int(b) for b in spa_base)
    if len(spa_base) != hosts or any(not 0 <= b < 1 << 40 for b in spa_base):
        raise ValueError(f"spa_base must have {hosts} entries in [0, 2**40), got {spa_base}")
    return npages, vcpus, asid, os_vmpl, hosts, spa_base


def check_u32(name: str, x) -> int:
    """An instruction operand that must fit 32 bits (ASID, gfn)."""
    x = int(x)
    if not 0 <= x < 1 << 32:
        raise ValueError(f"{name} must be in [0, 2**32), got {x}")
    return x


def check_vmpl(name: str, x) -> int:
    x = int(x)
    if not 0 <= x < VMPLS:
        raise ValueError(f"{name} must be in [0, {VMPLS}), got {x}")
    return x


def as_ready(ready, npages: int):
    """Post-copy page-ready times: the caller's own uint64 array of length ``npages``, written in place by
    transfer(), so it is never copied: anything else is an error."""
    if not isinstance(ready, np.ndarray) or ready.dtype != np.uint64 or ready.ndim != 1 \
            or ready.shape[0] != npages or not ready.flags.c_contiguous or not ready.flags.writeable:
        raise ValueError(f"ready must be a writable contiguous numpy uint64 array of {npages} entries")
    return ready


def as_gfns(gfns):
    """A transfer's page list as a contiguous uint32 array."""
    arr = np.ascontiguousarray(gfns, dtype=np.uint32)
    if arr.ndim != 1:
        raise ValueError(f"gfns must be one-dimensional, got shape {arr.shape}")
    return arr


_TRANSFER_REQUIRED = ("bandwidth_bytes_per_s", "page_bytes", "header_bytes", "pack_private_ns", "pack_zero_ns",
                      "batch_pages", "vmgexit_ns", "charge_guest")
_TRANSFER_DEFAULTS = {
    "agents": 1, "src_cpus": None, "dst_cpus": None, "src_pool_cpus": 0, "dst_pool_cpus": 0,
    "unpack_private_ns": 0, "rmpupdate_ns": 0, "pvalidate_ns": 0, "rmpadjust_ns": 0, "first_touch_ns": 0,
    "host_page_ns": 0, "wp_fault_ns": 0, "charge_target_guest": False, "target_rmp": True, "skip_present": False,
    "demand_at_ns": None, "demand_mcpu": None, "quota_mcpu": 0, "fair": True, "src_shared": False, "dst_shared": False,
}
_TRANSFER_FLAGS = ("charge_guest", "charge_target_guest", "target_rmp", "skip_present", "fair", "src_shared", "dst_shared")
_TRANSFER_ARRAYS = ("demand_at_ns", "demand_mcpu", "src_cpus", "dst_cpus")


def _rational(name: str, value) -> tuple[int, int]:
    num, den = (int(x) for x in value)
    if not (1 <= num < 1 << 31 and 1 <= den < 1 << 31):
        raise ValueError(f"begin_transfer: {name} must be (num, den) with both in [1, 2**31), got {value!r}")
    return num, den


def check_transfer_params(v_ns, g_ns, params: dict, vcpus: int) -> dict:
    """begin_transfer()'s keyword arguments, validated, with defaults (both engines call this).

    CPU capacities are rationals ``(num, den)`` CPUs: ``src_cpus``/``dst_cpus`` for the agents on each side
    (default ``(agents, 1)``); ``*_pool_cpus`` > 0 when those agents share that many CPUs with the side's
    host migration thread.

    The guest's CPU demand (``replay.model.demand``): ``demand_at_ns`` (uint64, starting at 0, increasing) and
    ``demand_mcpu`` (int64 milli-CPUs, each at most ``quota_mcpu``) are its steps over trace time; default:
    every vCPU busy, quota one CPU per vCPU (the guest loses exactly the CPU taken from it). With
    ``src_shared``/``dst_shared`` that side's agents get a share of the guest's quota, recomputed at each
    demand step (``fair``: CFS's, else agents first) instead of ``src_cpus``/``dst_cpus``."""
    unknown = sorted(set(params) - set(_TRANSFER_REQUIRED) - set(_TRANSFER_DEFAULTS))
    if unknown:
        raise TypeError(f"begin_transfer: unknown argument(s) {', '.join(unknown)}")
    missing = [k for k in _TRANSFER_REQUIRED if k not in params]
    if missing:
        raise TypeError(f"begin_transfer: missing argument(s) {', '.join(missing)}")
    p = {**_TRANSFER_DEFAULTS, **params, "v_ns": v_ns, "g_ns": g_ns}
    for k in list(p):
        if k in _TRANSFER_FLAGS:
            p[k] = bool(p[k])
        elif k not in _TRANSFER_ARRAYS:
            x = p[k] = int(p[k])
            if not 0 <= x < 1 << 62:
                raise ValueError(f"begin_transfer: {k} must be in [0, 2**62), got {x}")
    for k in ("bandwidth_bytes_per_s", "agents", "batch_pages"):
        if p[k] < 1:
            raise ValueError(f"begin_transfer: {k} must be >= 1, got {p[k]}")
    for k in ("src_cpus", "dst_cpus"):
        p[k] = _rational(k, (p["agents"], 1) if p[k] is None else p[k])
    if p["quota_mcpu"] == 0:
        p["quota_mcpu"] = 1000 * vcpus
    if (p["demand_at_ns"] is None) != (p["demand_mcpu"] is None):
        raise ValueError("begin_transfer: demand_at_ns and demand_mcpu go together")
    if p["demand_at_ns"] is None:
        p["demand_at_ns"], p["demand_mcpu"] = np.zeros(1, np.uint64), np.array([min(1000 * vcpus, p["quota_mcpu"])], np.int64)
    at = p["demand_at_ns"] = np.ascontiguousarray(p["demand_at_ns"], dtype=np.uint64)
    mc = p["demand_mcpu"] = np.ascontiguousarray(p["demand_mcpu"], dtype=np.int64)
    if at.ndim != 1 or mc.shape != at.shape or not len(at) or int(at[0]) != 0 or (len(at) > 1 and not (at[1:] > at[:-1]).all()):
        raise ValueError("begin_transfer: demand_at_ns must start at 0 and increase, with one demand_mcpu per step")
    if int(mc.min()) < 0 or int(mc.max()) > p["quota_mcpu"]:
        raise ValueError(f"begin_transfer: demand_mcpu must be in [0, quota_mcpu={p['quota_mcpu']}]")
    if p["quota_mcpu"] > 1000 * (1 << 20):
        raise ValueError("begin_transfer: quota_mcpu must be at most 2^20 CPUs")
    return p


def check_transfer_limits(until_v, deadline_v) -> tuple[int, int]:
    """transfer()'s ``until_v`` (stop before a page once the clock reaches it) and ``deadline_v`` (no page
    may end after it); None: no limit."""
    out = []
    for name, x in (("until_v", until_v), ("deadline_v", deadline_v)):
        x = (1 << 63) - 1 if x is None else int(x)
        if not 0 <= x < 1 << 63:
            raise ValueError(f"transfer: {name} must be in [0, 2**63), got {x}")
        out.append(x)
    return out[0], out[1]


def check_transfer_add(active: bool, nbytes, agent_cpu_ns, target_cpu_ns) -> tuple[int, int, int]:
    if not active:
        raise RuntimeError("transfer_add() before begin_transfer()")
    vals = tuple(int(x) for x in (nbytes, agent_cpu_ns, target_cpu_ns))
    if not all(0 <= x < 1 << 62 for x in vals):
        raise ValueError("transfer_add: nbytes, agent_cpu_ns and target_cpu_ns must be in [0, 2**62)")
    return vals
