"""Post-copy's records by hand (issue 22, survivors of tools/mutate over replay/migration/postcopy.py,
link.py and clock.py): the immutable switchover, end and link records, ``switch_to_postcopy``'s
keyword-only ``hybrid``, the lazily committed page-ready array, and on test_postcopy's tiny run the
events post-copy logs (the validation token's page count and match, the switchover-to-complete time, the
moment the last page's bytes reached the target), the post-copy round's guest progress and the page
tallies of the faulted pages (private, written once: neither shared nor zero).

The tiny run (test_postcopy's module docstring and ``test_postcopy_by_hand``): paused at v = g = 3000,
resumed at v = 7100; the push ends at v = 11100 with the guest at g = 7000; the last fault reply landed at
v = 10300.
"""

from __future__ import annotations

import dataclasses
import inspect
import mmap

import numpy as np
import pytest

from replay.migration import run
from replay.migration.link import Link
from replay.migration.postcopy import PostcopyEnd, PostcopyStats, PostcopySwitch, lazy_ready, switch_to_postcopy
from test_postcopy import pc_scenario, pc_trace


@pytest.mark.parametrize("record, field", [
    (PostcopySwitch(1, 2, "d", 3, 4), "pause_ns"),
    (PostcopyEnd(True, 5, "d", PostcopyStats.empty(1)), "completion_ns"),
    (Link(5_000_000_000, 100, (), 0), "latency_ns"),
])
def test_switchover_end_and_link_records_are_immutable(record, field):
    # Phases share these records (the run record reads them after the phase): nobody may change one.
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, field, 0)


def test_hybrid_is_keyword_only():
    # switch_to_postcopy(run, True) would read as "hybrid" silently; the flag must be named.
    p = inspect.signature(switch_to_postcopy).parameters
    assert p["run"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert p["hybrid"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.skipif(not hasattr(mmap, "MAP_ANONYMOUS"), reason="Linux only")
def test_page_ready_times_are_an_uncommitted_mapping_of_zeros():
    # 3 pages: 24 bytes of a private anonymous mapping (never np.zeros' committed buffer), all 0, writable.
    a = lazy_ready(3)
    m = a.base.obj if isinstance(a.base, memoryview) else a.base
    assert isinstance(m, mmap.mmap) and len(m) == 3 * 8
    assert a.dtype == np.uint64 and a.tolist() == [0, 0, 0]
    a[2] = 7
    assert a.tolist() == [0, 0, 7]
    # No pages: an empty array (a mapping of 0 bytes is refused by mmap itself).
    e = lazy_ready(0)
    assert e.dtype == np.uint64 and e.size == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    trace = pc_trace(tmp_path_factory.mktemp("pc") / "pc.arrow")
    return run(pc_scenario(), strategy="mirror-vm", trace_path=trace)


def test_the_tiny_runs_postcopy_events(tiny):
    ev = {e["kind"]: (e["t_ns"], e["detail"]) for e in tiny.events.to_pylist()}
    # Plain post-copy: no pre-copy page, 2 pushed + 2 faulted = 4; the target's digest equals the source's.
    assert ev["validation_token"] == (11100, "pages=4 match=True")
    # Complete at 11100, paused at 3000: 8100.
    assert ev["postcopy_complete"] == (11100, "switchover_to_complete_ns=8100")
    # The push's last page (gfn 1) left the link at 11100 and lands a latency later, 11200; the last fault
    # reply landed at 10300, earlier: the later of the two.
    assert ev["postcopy_data_in"] == (11200, "the last page's bytes reached the target")


def test_the_tiny_runs_postcopy_round_and_page_tallies(tiny):
    (r,) = [r for r in tiny.rounds.to_pylist() if r["phase"] == "postcopy"]
    # The guest resumed at g = 3000 and stands at g = 7000 when the push ends: 4000 ns of progress.
    assert (r["start_ns"], r["end_ns"], r["guest_progress_ns"]) == (7100, 11100, 4000)
    m = tiny.summary["metrics"]
    # gfn 3 and gfn 2 came by fault: private, each written once before the switchover (version 1, not a
    # zero page); the push's gfn 0 and 1 likewise. No page is shared or zero.
    assert (m["private_pages_sent"], m["shared_pages_sent"], m["zero_pages"]) == (4, 0, 0)


def _overcommit_heuristic() -> bool:
    import resource
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            mode = f.read().strip()
    except OSError:
        return False
    return mode == "0" and resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY


@pytest.mark.skipif(not _overcommit_heuristic(), reason="needs Linux's heuristic overcommit and no address-space limit")
def test_page_ready_times_of_a_huge_guest_reserve_no_memory():
    # 2^37 pages (a 512 TiB guest): 1 TiB of ready times, more than any test machine's RAM and swap. Under the
    # heuristic overcommit a mapping that large is refused unless it asks for no reservation (MAP_NORESERVE);
    # reading its last entry makes one page resident, no more.
    a = lazy_ready(1 << 37)
    assert a.size == 1 << 37 and int(a[-1]) == 0
