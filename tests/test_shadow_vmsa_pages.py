"""A shadow AP's VMSA page on a side's RMP, created and retired one at a time (issue 22's mutation survivors in
replay/migration/setup.py ``_vmsa_rmp``).

The rule (docs/internals.md, setup.py): VMSA pages live past the guest's pages (the SVSM's memory), the n-th
live one at gfn npages + n - 1. Creating one is RMPUPDATE to the guest's ASID, PVALIDATE at VMPL0 and
RMPADJUST from VMPL0 for VMPL1 with no permissions and the VMSA bit set; retiring the last one is RMPADJUST
with the VMSA bit clear (the page stays assigned and validated; VMPL1 still has no permissions). An RMP
operation that fails is the driver's own inconsistency: InvariantError naming the side and the codes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from replay.core.errors import InvariantError
from replay.engines import make_engine
from replay.engines.common import ENGINE_KINDS, RmpEntry
from replay.migration.setup import _vmsa_rmp

NPAGES = 4


def _run(kind):
    eng = make_engine(kind, npages=NPAGES, vcpus=1, asid=7, os_vmpl=0, hosts=2)
    eng.launch(0, [])
    return SimpleNamespace(eng=eng, s=SimpleNamespace(guest=SimpleNamespace(asid=7)), vmsa_live=[0, 0], npages=NPAGES)


def _entry(run, side, gfn):
    return run.eng.rmp_entry(side, run.eng.spa(side, 0) + gfn)


def _vmsa_page(gfn, vmsa):
    return RmpEntry(assigned=True, asid=7, gfn=gfn, size_2m=False, immutable=False, validated=True, vmsa=vmsa,
                    perms=(15, 0, 0, 0))


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_vmsa_pages_created_and_retired_past_the_guests_pages(engine):
    run = _run(engine)
    _vmsa_rmp(run, 1, 1)
    _vmsa_rmp(run, 1, 1)
    assert run.vmsa_live == [0, 2]
    assert [_entry(run, 1, g) for g in (4, 5)] == [_vmsa_page(4, True), _vmsa_page(5, True)]
    _vmsa_rmp(run, 1, -1)  # the last one (gfn 5) goes
    assert run.vmsa_live == [0, 1]
    assert [_entry(run, 1, g) for g in (4, 5)] == [_vmsa_page(4, True), _vmsa_page(5, False)]
    assert not _entry(run, 0, 4).assigned  # the other side untouched


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_a_failed_vmsa_rmp_operation_is_an_internal_error(engine):
    run = _run(engine)
    run.vmsa_live[0] = 1  # counted live, never created: retiring it hits an unassigned page
    with pytest.raises(InvariantError) as e:
        _vmsa_rmp(run, 0, -1)
    assert str(e.value).startswith("source: VMSA page RMP operation failed: [")
