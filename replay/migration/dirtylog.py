"""The dirty log: QEMU's bitmap syncs (ram_init_bitmaps at setup, migration_bitmap_sync in each round
and at the switchover), each costing host CPU. Setup, pre-copy and stop-and-copy all sync, so the syncs
live below the three of them."""

from __future__ import annotations

from ..scenario.strategies import HOST, SOURCE
from .context import Run


def sync_cost(run: Run) -> int:
    c = run.s.costs
    return c.dirty_sync_ns + c.dirty_sync_ns_per_gib * run.meta.guest_bytes // (1 << 30)


def sync(run: Run, *, paused: bool = False) -> int:
    """Dirty-log get-and-clear into the send bitmap, costing host CPU; returns the pages the log held."""
    dirty = run.eng.sync_dirty(SOURCE)
    cost = sync_cost(run)
    run.cpu.charge(HOST, cost)
    run.log("dirty_sync", f"dirty_pages={dirty}")
    if paused:
        run.guest.pause(cost)
    else:
        run.guest.elapse(cost)
    return dirty


def initial_sync(run: Run) -> int:
    """Setup's initial sync (QEMU's ram_init_bitmaps, dirty-sync-count 1): logging starts clean and the send
    bitmap holds every page. Returns its time."""
    t = run.guest.v
    run.eng.set_dirty_logging(SOURCE, True)
    run.eng.mark_send_all(SOURCE)
    run.log("dirty_sync", f"initial bitmap sync (setup): dirty_pages={run.npages}")
    run.guest.elapse(sync_cost(run))
    run.cpu.charge(HOST, sync_cost(run))
    return t
