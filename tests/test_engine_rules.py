"""Hand-checked cases for every RMP rule, return code and access check of docs/internals.md (Engine API),
run against both engines."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from replay.engines import common as engine_mod
from replay.model import snp
from replay.engines.common import RmpEntry
from replay.engines import make_engine
from replay.model.snp import Access, Fault, Perm, Rc

FRESH = RmpEntry(False, 0, 0, False, False, False, False, (15, 0, 0, 0))


@pytest.fixture
def e(engine_kind):
    return make_engine(engine_kind, npages=1024, vcpus=2)


def assigned(e, gfn, *, asid=1, host=0, validate=True, rgfn=None):
    """Assign gfn's entry to (asid, rgfn or gfn), 4K, and optionally validate it."""
    spa = e.spa(host, gfn)
    rgfn = gfn if rgfn is None else rgfn
    assert e.rmpupdate(host, spa, assigned=True, asid=asid, gfn=rgfn) == Rc.SUCCESS
    if validate:
        assert e.pvalidate(host, spa, asid=asid, gfn=rgfn, vmpl=0, validate=True) == Rc.SUCCESS
    return spa


def rmp_counts(e):
    return e.counters()["rmp"]


def faults(e):
    return {k: v for k, v in e.counters()["faults"].items() if v}


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_defaults(engine_kind):
    e = make_engine(engine_kind, npages=100, vcpus=3)
    assert (e.npages, e.vcpus, e.asid, e.os_vmpl, e.hosts) == (100, 3, 1, 0, 2)
    assert tuple(e.spa_base) == (1024, 2048)
    assert e.spa(0, 0) == 1024 and e.spa(1, 99) == 2048 + 99
    assert e.rmp_size(0) == 1024 + 100 + engine_mod.VMSA_SPARE
    assert e.rmp_size(1) == 2048 + 100 + engine_mod.VMSA_SPARE
    assert e.rmp_entry(0, 0) == FRESH and e.rmp_entry(1, e.rmp_size(1) - 1) == FRESH
    assert e.page(0, 5) == (0, False, False, False)
    zero = {"rmpupdate": 0, "pvalidate": 0, "rmpadjust": 0, "psmash": 0, "psc": 0}
    assert e.counters() == {
        "rmp": zero,
        "rmp_by_host": [zero, zero],
        "faults": {f.key: 0 for f in snp.FAULT_KINDS},
        "first_faults": [],
    }
    assert e.last_stop == (Fault.NONE, 0, 0, 0)
    assert e.transfer_state() == dict(
        v_ns=0, g_ns=0, pages=0, zero_pages=0, private_pages=0, shared_pages=0, bytes=0,
        agent_cpu_ns=0, vmgexits=0, target_cpu_ns=0, src_host_cpu_ns=0, dst_host_cpu_ns=0, first_touches=0,
        link_dead=False,
    )  # fmt: skip
    e3 = make_engine(engine_kind, npages=8, vcpus=1, hosts=3, spa_base=[0, 512, 4096])
    assert e3.spa(2, 7) == 4103 and e3.rmp_size(0) == 8 + engine_mod.VMSA_SPARE


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.rmp_entry(2, 0),
        lambda e: e.rmp_entry(0, 1024 + 1024 + engine_mod.VMSA_SPARE),
        lambda e: e.rmp_entry(0, -1),
        lambda e: e.page(0, 1024),
        lambda e: e.rmpupdate(0, 1024, assigned=True, asid=1, gfn=1 << 32),
        lambda e: e.pvalidate(0, 1024, asid=1, gfn=0, vmpl=4, validate=True),
        lambda e: e.rmpadjust(0, 1024, asid=1, gfn=0, caller_vmpl=0, target_vmpl=1, perms=16),
        lambda e: e.check_access(0, 0, vmpl=0, access=0, private=True),
        lambda e: e.launch(0, [(5, 1024)]),
        lambda e: e.flags(0, [1024]),
    ],
)
def test_bad_arguments_raise_valueerror(e, call):
    with pytest.raises(ValueError):
        call(e)


def test_engine_kinds():
    assert engine_mod.ENGINE_KINDS == ("cython", "reference")
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("fortran", npages=1, vcpus=1)


def test_c_constants_mirror_snp():
    from replay.engines import _engine

    c = _engine._c_constants()
    assert (c["PAGE_SHIFT"], c["PAGES_PER_2M"], c["VMPLS"]) == (snp.PAGE_SHIFT, snp.PAGES_PER_2M, snp.VMPLS)
    assert (c["VMSA_SPARE"], c["MAX_HOSTS"]) == (engine_mod.VMSA_SPARE, engine_mod.MAX_HOSTS)
    assert (c["PRIVATE"], c["DIRTY"], c["PRESENT"]) == (engine_mod.PRIVATE, engine_mod.DIRTY, engine_mod.PRESENT)
    for enum in (snp.Op, snp.Perm, snp.Rc, snp.Fault):
        assert c[enum.__name__] == {k: int(m) for k, m in enum.__members__.items()}, enum.__name__
    # 5 bytes of page state per gfn per host (SPEC: <= 16 for both hosts); RMP entries only as exceptions
    assert c["sizeof"] == {"version": 4, "flags": 1, "RmpEntry": 16}


# ---------------------------------------------------------------------------------------------- RMPUPDATE


def test_rmpupdate_assign(e):
    spa = e.spa(0, 5)
    assert e.rmpupdate(0, spa, assigned=True, asid=1, gfn=5) is Rc.SUCCESS
    assert e.rmp_entry(0, spa) == RmpEntry(True, 1, 5, False, False, False, False, (15, 0, 0, 0))
    assert e.rmp_entry(1, e.spa(1, 5)) == FRESH  # the other host's RMP is separate
    assert rmp_counts(e)["rmpupdate"] == 1


def test_rmpupdate_no_change_keeps_validated_vmsa_perms(e):
    spa = assigned(e, 5)
    assert e.rmpadjust(0, spa, asid=1, gfn=5, caller_vmpl=0, target_vmpl=2, perms=3, vmsa=True) == Rc.SUCCESS
    kept = RmpEntry(True, 1, 5, False, False, True, True, (15, 0, 3, 0))
    assert e.rmp_entry(0, spa) == kept
    assert e.rmpupdate(0, spa, assigned=True, asid=1, gfn=5) == Rc.SUCCESS
    assert e.rmp_entry(0, spa) == kept


@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(assigned=True, asid=2, gfn=5), RmpEntry(True, 2, 5, False, False, False, False, (15, 0, 0, 0))),
        (dict(assigned=True, asid=1, gfn=6), RmpEntry(True, 1, 6, False, False, False, False, (15, 0, 0, 0))),
        (dict(assigned=False, asid=1, gfn=5), FRESH),  # unassigned stores asid 0, gfn 0
    ],
)
def test_rmpupdate_change_clears_validated_vmsa_perms(e, change, expect):
    spa = assigned(e, 5)
    assert e.rmpadjust(0, spa, asid=1, gfn=5, caller_vmpl=0, target_vmpl=1, perms=15, vmsa=True) == Rc.SUCCESS
    assert e.rmpupdate(0, spa, **change) == Rc.SUCCESS
    assert e.rmp_entry(0, spa) == expect


def test_rmpupdate_size_change_clears_validated(e):
    spa = assigned(e, 512)  # 2M-aligned gfn and spa (1024 + 512)
    assert e.rmpupdate(0, spa, assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    assert e.rmp_entry(0, spa) == RmpEntry(True, 1, 512, True, False, False, False, (15, 0, 0, 0))


def test_rmpupdate_immutable_entry_fails(e):
    spa = e.spa(0, 7)
    assert e.rmpupdate(0, spa, assigned=True, asid=1, gfn=7, immutable=True) == Rc.SUCCESS
    before = e.rmp_entry(0, spa)
    assert before == RmpEntry(True, 1, 7, False, True, False, False, (15, 0, 0, 0))
    assert e.rmpupdate(0, spa, assigned=False) is Rc.FAIL_PERMISSION
    assert e.rmpupdate(0, spa, assigned=True, asid=1, gfn=7) is Rc.FAIL_PERMISSION
    assert e.rmp_entry(0, spa) == before
    assert rmp_counts(e)["rmpupdate"] == 3  # failed instructions count too


def test_rmpupdate_2m_alignment_fails_input(e):
    assert e.rmpupdate(0, e.spa(0, 1), assigned=True, asid=1, gfn=512, size_2m=True) == Rc.FAIL_INPUT
    assert e.rmpupdate(0, e.spa(0, 0), assigned=True, asid=1, gfn=1, size_2m=True) == Rc.FAIL_INPUT
    assert e.rmp_size(0) == 3072 and e.rmpupdate(0, 2560, assigned=True, asid=1, gfn=0, size_2m=True) == Rc.SUCCESS
    kind = "reference" if type(e).__module__.endswith("refengine") else "cython"
    e2 = make_engine(kind, npages=1000, vcpus=1)  # RMP size 3048: a 2M page at 2560 would run past its end
    assert e2.rmpupdate(0, 2560, assigned=True, asid=1, gfn=0, size_2m=True) == Rc.FAIL_INPUT
    assert e.rmp_entry(0, e.spa(0, 0)) == FRESH


def test_rmpupdate_2m_writes_512_entries(e):
    head = e.spa(0, 512)
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    for i in (0, 1, 300, 511):
        assert e.rmp_entry(0, head + i) == RmpEntry(True, 1, 512 + i, True, False, False, False, (15, 0, 0, 0))
    assert e.rmp_entry(0, head + 512) == FRESH and e.rmp_entry(0, head - 1) == FRESH
    assert rmp_counts(e)["rmpupdate"] == 1


def test_rmpupdate_2m_overlap_with_4k(e):
    head = e.spa(0, 0)
    assigned(e, 3, validate=False)
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=0, size_2m=True) is Rc.FAIL_OVERLAP
    assert e.rmp_entry(0, head) == FRESH
    # the head itself being a 4K assigned entry is no overlap (only the 511 following entries count)
    e2 = make_engine("reference" if type(e).__module__.endswith("refengine") else "cython", npages=1024, vcpus=1)
    assigned(e2, 0, validate=False)
    assert e2.rmpupdate(0, head, assigned=True, asid=1, gfn=0, size_2m=True) == Rc.SUCCESS


def test_rmpupdate_2m_immutable_following_entry(e):
    head = e.spa(0, 0)
    assert e.rmpupdate(0, head + 9, assigned=False, immutable=True) == Rc.SUCCESS
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=0, size_2m=True) is Rc.FAIL_PERMISSION


# ---------------------------------------------------------------------------------------------- PSMASH


def test_psmash(e):
    head = e.spa(0, 512)
    assert e.psmash(0, head) is Rc.FAIL_INPUT  # unassigned
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    assert e.pvalidate(0, head, asid=1, gfn=512, vmpl=0, validate=True, size_2m=True) == Rc.SUCCESS
    assert e.rmpadjust(0, head, asid=1, gfn=512, caller_vmpl=0, target_vmpl=1, perms=1, size_2m=True) == Rc.SUCCESS
    assert e.psmash(0, head + 1) is Rc.FAIL_INPUT  # not the head
    assert e.psmash(0, head) is Rc.SUCCESS
    for i in (0, 1, 511):
        assert e.rmp_entry(0, head + i) == RmpEntry(True, 1, 512 + i, False, False, True, False, (15, 1, 0, 0))
    assert e.psmash(0, head) is Rc.FAIL_INPUT  # now 4K
    assert rmp_counts(e)["psmash"] == 4


def test_psmash_unassigned_2m(e):
    head = e.spa(0, 0)
    assert e.rmpupdate(0, head, assigned=False, size_2m=True) == Rc.SUCCESS
    assert e.rmp_entry(0, head).size_2m
    assert e.psmash(0, head) is Rc.FAIL_INPUT


# ---------------------------------------------------------------------------------------------- PVALIDATE


def test_pvalidate_double_validation(e):
    spa = assigned(e, 9, validate=False)
    pv = lambda v: e.pvalidate(0, spa, asid=1, gfn=9, vmpl=0, validate=v)  # noqa: E731
    assert pv(True) is Rc.SUCCESS and e.rmp_entry(0, spa).validated
    assert pv(True) is Rc.FAIL_NOUPDATE and e.rmp_entry(0, spa).validated
    assert pv(False) is Rc.SUCCESS and not e.rmp_entry(0, spa).validated
    assert pv(False) is Rc.FAIL_NOUPDATE
    assert rmp_counts(e)["pvalidate"] == 4 and faults(e) == {}


def test_pvalidate_only_vmpl0(e):
    spa = assigned(e, 9, validate=False)
    for vmpl in (1, 2, 3):
        assert e.pvalidate(0, spa, asid=1, gfn=9, vmpl=vmpl, validate=True) is Rc.FAIL_PERMISSION
    assert not e.rmp_entry(0, spa).validated


@pytest.mark.parametrize(
    "setup, asid, gfn, kind",
    [
        (None, 1, 9, "npf_not_assigned"),
        (dict(asid=2), 1, 9, "npf_asid"),
        (dict(rgfn=10), 1, 9, "npf_gpa_mismatch"),
        (dict(rgfn=10, asid=2), 1, 9, "npf_gpa_mismatch"),  # gpa mismatch is checked first
    ],
)
def test_pvalidate_nested_pf(e, setup, asid, gfn, kind):
    spa = e.spa(0, 9)
    if setup is not None:
        assigned(e, 9, validate=False, **setup)
    assert e.pvalidate(0, spa, asid=asid, gfn=gfn, vmpl=0, validate=True) is Rc.NESTED_PF
    assert faults(e) == {kind: 1}
    assert e.counters()["first_faults"] == [[-1, kind, 9]]
    assert not e.rmp_entry(0, spa).validated


def test_pvalidate_size_mismatch_and_2m(e):
    spa = assigned(e, 0, validate=False)
    assert e.pvalidate(0, spa, asid=1, gfn=0, vmpl=0, validate=True, size_2m=True) is Rc.FAIL_SIZEMISMATCH
    assert e.pvalidate(0, spa + 1, asid=1, gfn=1, vmpl=0, validate=True, size_2m=True) is Rc.FAIL_INPUT
    head = e.spa(0, 512)
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    assert e.pvalidate(0, head, asid=1, gfn=512, vmpl=0, validate=True, size_2m=True) is Rc.SUCCESS
    assert all(e.rmp_entry(0, head + i).validated for i in (0, 255, 511))
    assert not e.rmp_entry(0, head + 512).validated
    assert e.pvalidate(0, head, asid=1, gfn=512, vmpl=0, validate=True, size_2m=True) is Rc.FAIL_NOUPDATE
    assert e.pvalidate(0, head, asid=1, gfn=512, vmpl=0, validate=False, size_2m=True) is Rc.SUCCESS
    assert not e.rmp_entry(0, head + 511).validated


# ---------------------------------------------------------------------------------------------- RMPADJUST


def adj(e, spa, gfn, caller, target, perms, **kw):
    return e.rmpadjust(0, spa, asid=1, gfn=gfn, caller_vmpl=caller, target_vmpl=target, perms=perms, **kw)


def test_rmpadjust_direction(e):
    spa = assigned(e, 4)
    assert adj(e, spa, 4, 0, 0, 1) is Rc.FAIL_PERMISSION
    assert adj(e, spa, 4, 2, 1, 1) is Rc.FAIL_PERMISSION
    assert adj(e, spa, 4, 1, 1, 0) is Rc.FAIL_PERMISSION
    assert adj(e, spa, 4, 0, 4, 1) is Rc.FAIL_PERMISSION
    assert e.rmp_entry(0, spa).perms == (15, 0, 0, 0)
    assert adj(e, spa, 4, 0, 3, Perm.READ | Perm.WRITE) is Rc.SUCCESS
    assert e.rmp_entry(0, spa).perms == (15, 0, 0, 3)
    assert rmp_counts(e)["rmpadjust"] == 5


def test_rmpadjust_subset_of_callers_mask(e):
    spa = assigned(e, 4)
    assert adj(e, spa, 4, 0, 1, Perm.READ | Perm.USER_EXEC) is Rc.SUCCESS
    assert adj(e, spa, 4, 1, 2, Perm.WRITE) is Rc.FAIL_PERMISSION  # VMPL1 lacks WRITE
    assert adj(e, spa, 4, 1, 2, Perm.READ | Perm.WRITE) is Rc.FAIL_PERMISSION
    assert adj(e, spa, 4, 1, 2, Perm.READ) is Rc.SUCCESS
    assert adj(e, spa, 4, 2, 3, 0) is Rc.SUCCESS  # the empty mask is a subset
    assert e.rmp_entry(0, spa).perms == (15, 5, 1, 0)


def test_rmpadjust_not_validated_and_npf(e):
    spa = assigned(e, 4, validate=False)
    assert adj(e, spa, 4, 0, 1, 1) is Rc.FAIL_INPUT
    assert adj(e, e.spa(0, 6), 6, 0, 1, 1) is Rc.NESTED_PF
    assert adj(e, spa, 5, 0, 1, 1) is Rc.NESTED_PF
    assert faults(e) == {"npf_not_assigned": 1, "npf_gpa_mismatch": 1}
    assert e.rmp_entry(0, spa).perms == (15, 0, 0, 0)


def test_rmpadjust_size_mismatch(e):
    spa = assigned(e, 0)
    assert adj(e, spa, 0, 0, 1, 1, size_2m=True) is Rc.FAIL_SIZEMISMATCH
    head = e.spa(0, 512)
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    assert e.pvalidate(0, head, asid=1, gfn=512, vmpl=0, validate=True, size_2m=True) == Rc.SUCCESS
    assert adj(e, head, 512, 0, 1, 1) is Rc.FAIL_SIZEMISMATCH  # 4K request on a 2M entry


def test_rmpadjust_vmsa_only_from_vmpl0(e):
    spa = assigned(e, 4)
    assert adj(e, spa, 4, 0, 1, 15, vmsa=True) is Rc.SUCCESS
    assert e.rmp_entry(0, spa).vmsa
    assert adj(e, spa, 4, 1, 2, 1, vmsa=True) is Rc.FAIL_PERMISSION
    assert adj(e, spa, 4, 1, 2, 1) is Rc.SUCCESS  # a VMPL1 caller leaves the vmsa bit alone
    assert e.rmp_entry(0, spa).vmsa and e.rmp_entry(0, spa).perms == (15, 15, 1, 0)
    assert adj(e, spa, 4, 0, 1, 15) is Rc.SUCCESS  # VMPL0 sets it to what it asks for
    assert not e.rmp_entry(0, spa).vmsa


# ---------------------------------------------------------------------------------------------- checks


def ca(e, gfn, vmpl=0, access=Access.WRITE, private=True):
    return e.check_access(0, gfn, vmpl=vmpl, access=access, private=private)


def test_check_access_fault_order(e):
    spa = e.spa(0, 20)
    # gpa mismatch first, even with another asid
    assert e.rmpupdate(0, spa, assigned=True, asid=2, gfn=21) == Rc.SUCCESS
    assert ca(e, 20) is Fault.NPF_GPA_MISMATCH
    assert e.rmpupdate(0, spa, assigned=False) == Rc.SUCCESS
    assert ca(e, 20) is Fault.NPF_NOT_ASSIGNED
    # other asid before immutable
    assert e.rmpupdate(0, spa, assigned=True, asid=2, gfn=20, immutable=True) == Rc.SUCCESS
    assert ca(e, 20) is Fault.NPF_ASID
    # immutable before size and not-validated
    e2 = make_engine("reference" if type(e).__module__.endswith("refengine") else "cython", npages=1024, vcpus=1)
    head = e2.spa(0, 512)
    assert e2.rmpupdate(0, head, assigned=True, asid=1, gfn=512, size_2m=True, immutable=True) == Rc.SUCCESS
    assert e2.check_access(0, 512, vmpl=0, access=Access.READ, private=True) is Fault.NPF_IMMUTABLE
    # size before not-validated
    assert e.rmpupdate(0, e.spa(0, 512), assigned=True, asid=1, gfn=512, size_2m=True) == Rc.SUCCESS
    assert ca(e, 512) is Fault.NPF_SIZE and ca(e, 1023) is Fault.NPF_SIZE
    assert e.psmash(0, e.spa(0, 512)) == Rc.SUCCESS
    assert ca(e, 1023) is Fault.VC_NOT_VALIDATED
    # not validated before VMPL permissions
    assigned(e, 30, validate=False)
    assert ca(e, 30, vmpl=2) is Fault.VC_NOT_VALIDATED
    assert e.pvalidate(0, e.spa(0, 30), asid=1, gfn=30, vmpl=0, validate=True) == Rc.SUCCESS
    assert ca(e, 30, vmpl=2) is Fault.NPF_VMPL
    assert ca(e, 30, vmpl=0) is Fault.NONE


def test_check_access_vmpl_masks(e):
    spa = assigned(e, 30)
    assert adj(e, spa, 30, 0, 1, Perm.READ) == Rc.SUCCESS
    assert ca(e, 30, vmpl=1, access=Access.READ) is Fault.NONE
    assert ca(e, 30, vmpl=1, access=Access.WRITE) is Fault.NPF_VMPL
    assert ca(e, 30, vmpl=3, access=Access.READ) is Fault.NPF_VMPL
    assert ca(e, 30, vmpl=0, access=Access.WRITE) is Fault.NONE


def test_check_access_shared(e):
    assert ca(e, 40, private=False) is Fault.NONE
    assigned(e, 40)
    assert ca(e, 40, private=False) is Fault.NPF_SHARED_ASSIGNED
    assert ca(e, 40, private=True) is Fault.NONE


def test_check_access_counts_nothing(e):
    before = e.counters()
    ca(e, 50)
    ca(e, 50, private=False)
    assert e.counters() == before


def test_host_write(e):
    assert e.host_write(0, e.spa(0, 8)) is Fault.NONE
    assert e.host_write(0, 5) is Fault.NONE  # an SPA below the guest, unassigned
    assigned(e, 8, validate=False)
    assert e.host_write(0, e.spa(0, 8)) is Fault.HOST_RMP_PF
    assert faults(e) == {"host_rmp_pf": 1}
    assert e.counters()["first_faults"] == [[-1, "host_rmp_pf", 8]]
    assert e.host_write(1, e.spa(1, 8)) is Fault.NONE  # other host
    e.reset_counters()
    assert faults(e) == {} and e.counters()["first_faults"] == []


def test_first_faults_keeps_16(e):
    for _ in range(20):
        e.pvalidate(0, e.spa(0, 3), asid=1, gfn=3, vmpl=0, validate=True)
    c = e.counters()
    assert c["faults"]["npf_not_assigned"] == 20
    assert c["first_faults"] == [[-1, "npf_not_assigned", 3]] * 16


# ---------------------------------------------------------------------------------------------- launch


@pytest.mark.parametrize("os_vmpl", [0, 2])
def test_launch(engine_kind, os_vmpl):
    e = make_engine(engine_kind, npages=8, vcpus=1, asid=7, os_vmpl=os_vmpl)
    e.launch(0, [(2, 3), [6, 6]])
    perms = (15, 0, 15, 0) if os_vmpl == 2 else (15, 0, 0, 0)
    for g in range(8):
        shared = g in (2, 3, 6)
        ent = e.rmp_entry(0, e.spa(0, g))
        assert ent == (FRESH if shared else RmpEntry(True, 7, g, False, False, True, False, perms)), g
        assert e.page(0, g) == (0, not shared, False, True)
        assert e.rmp_entry(1, e.spa(1, g)) == FRESH and e.page(1, g) == (0, False, False, False)
    assert list(e.flags(0, range(8))) == [5, 5, 4, 4, 5, 5, 4, 5]
    assert e.flags(0, [3]).dtype == np.uint8 and e.versions(0, [3]).dtype == np.uint32
    assert e.count_present(0) == 8 and e.count_present(1) == 0
    assert e.counters()["rmp"] == {
        "rmpupdate": 5, "pvalidate": 5, "rmpadjust": 5 if os_vmpl else 0, "psmash": 0, "psc": 0
    }
    want = hashlib.blake2b(
        np.zeros(8, "<u4").tobytes() + bytes([1, 1, 0, 0, 1, 1, 0, 1]), digest_size=32
    ).hexdigest()
    assert e.digest(0) == want
    assert e.check_access(0, 0, vmpl=os_vmpl, access=Access.WRITE, private=True) is Fault.NONE
    assert e.check_access(0, 2, vmpl=os_vmpl, access=Access.WRITE, private=False) is Fault.NONE


def test_launch_unassigns_shared_and_is_counted(engine_kind):
    e = make_engine(engine_kind, npages=4, vcpus=1)
    assert e.rmpupdate(0, e.spa(0, 1), assigned=True, asid=1, gfn=1) == Rc.SUCCESS
    e.reset_counters()
    e.launch(0, [(1, 1)])
    assert e.rmp_entry(0, e.spa(0, 1)) == FRESH
    assert e.counters()["rmp"]["rmpupdate"] == 4  # 3 private assigns + 1 unassign


def test_check_access_many_is_check_access_per_page(e):
    """The batch check gives, page by page, exactly the single check's fault (every kind the fault-order
    test makes, shared and private, two VMPLs), and counts nothing."""
    assert e.rmpupdate(0, e.spa(0, 20), assigned=True, asid=2, gfn=21) == Rc.SUCCESS  # gpa mismatch
    assert e.rmpupdate(0, e.spa(0, 22), assigned=True, asid=2, gfn=22, immutable=True) == Rc.SUCCESS  # asid
    assigned(e, 30, validate=False)  # not validated
    assigned(e, 31)  # the guest's
    assert adj(e, e.spa(0, 31), 31, 0, 1, Perm.READ) == Rc.SUCCESS
    gfns = np.array([31, 20, 0, 22, 30, 31, 1023], np.int64)
    before = e.counters()
    for private in (True, False):
        for vmpl, access in ((0, Access.READ), (1, Access.WRITE)):
            got = e.check_access_many(0, gfns, vmpl=vmpl, access=access, private=private)
            assert got.dtype == np.uint8
            assert [Fault(int(f)) for f in got] == [ca(e, int(g), vmpl, access, private) for g in gfns]
    assert e.counters() == before
    assert e.check_access_many(0, np.zeros(0, np.int64), vmpl=0, access=Access.READ, private=True).size == 0
    with pytest.raises(ValueError):
        e.check_access_many(0, [e.npages], vmpl=0, access=Access.READ, private=True)
