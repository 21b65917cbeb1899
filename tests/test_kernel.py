"""Kernel capabilities as of December 2026: each one's state and date, each profile's set, against tables
written here (not derived from replay/model/kernel.py); the refusals those profiles imply, the run record's
kernel block, and the docs' table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from replay.model import kernel
from replay.core.errors import CapabilityError
from replay.migration import run
from replay.core.records import canonical_json
from replay.scenario.spec import KERNEL_PROFILES, KernelCaps, make_scenario
from test_truthful import trace  # noqa: F401  (the module-scoped trace fixture)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "how-it-works.md"

#: capability -> (state, date), as the issue and its sources give them (December 2026)
STATE = {
    "gmem_link": ("posted", "2025-05"),  # KVM_LINK_GUEST_MEMFD RFC v2 only
    "kvm_userfault": ("posted", "2025-06-18"),  # v3, nothing later, absent from v7.1.0-rc6
    "gmem_link_userfault": ("none", "2026-12"),
    "gmem_dirty_log": ("none", "2026-12"),
    "kvm_planes": ("posted", "2026-06"),  # out of tree on 7.1
    "gmem_write": ("posted", "2025-10"),  # v6
    "uffd_gmem": ("queued", "2026-03-31"),  # akpm/mm mm-unstable; in 7.1 not verified
}
DOCUMENTED_ONLY = {
    "gmem_inplace_conversion": ("posted", "2026-08-07"),  # v10, 41 patches
    "gmem_hugetlb_1g": ("posted", "2026"),  # unmerged; RMPOPT v2 waits for it
}
#: profile -> the capabilities it turns on
PROFILE_ON = {
    "linux-7.1": set(),
    "linux-7.1-mm": {"uffd_gmem"},
    "proposed-2026": {"gmem_link", "kvm_userfault", "kvm_planes", "gmem_write", "uffd_gmem"},
}


def test_each_capability_has_its_state_date_and_source():
    assert {c: (u.state, u.date) for c, u in kernel.CAPABILITIES.items()} == STATE
    assert {c: (u.state, u.date) for c, u in kernel.DOCUMENTED.items()} == DOCUMENTED_ONLY
    assert kernel.AS_OF == "2026-12"
    for cap, up in {**kernel.CAPABILITIES, **kernel.DOCUMENTED}.items():
        assert up.state in kernel.STATES and up.source and up.status, cap
        assert re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", up.date), cap
        assert "http" not in up.source and "/work" not in up.source, cap
        # nothing that is not merged may read as merged
        assert re.search(r"(?<!not )merged", up.status) is None, (cap, up.status)
    uffd = kernel.CAPABILITIES["uffd_gmem"]
    assert "unverified" in uffd.status and "MISSING and MINOR" in uffd.status
    assert "mm-unstable 2026-03-31" in uffd.source and "mm-hotfixes-stable-2026-06-01" in uffd.source


def test_capabilities_are_exactly_the_kernel_table_booleans():
    # the [kernel] keys come from KernelCaps; a profile is splatted into it, so the two must agree
    booleans = [f.name for f in dataclasses.fields(KernelCaps) if f.name != "profile"]
    assert list(kernel.CAPABILITIES) == booleans
    assert not set(kernel.DOCUMENTED) & set(booleans)


@pytest.mark.parametrize("profile", sorted(PROFILE_ON))
def test_each_profile_turns_on_exactly_its_capabilities(profile):
    caps = kernel.profile_caps(profile)
    assert {c for c, on in caps.items() if on} == PROFILE_ON[profile]
    k = make_scenario(trace={"file": "x"}, kernel={"profile": profile}).kernel
    assert {c for c in STATE if getattr(k, c)} == PROFILE_ON[profile]
    assert KERNEL_PROFILES == ("custom", "linux-7.1", "linux-7.1-mm", "proposed-2026")
    assert kernel.profile_caps("custom") is None


def base(profile, mode="postcopy", **migration):
    return make_scenario(guest={"os_vmpl": 0}, trace={"file": "x"}, kernel={"profile": profile},
                         migration={"mode": mode, "start_ns": 1000, "shadow_apic_id_base": 8, **migration})


@pytest.mark.parametrize(
    "profile, strategy, mode, migration, message",
    [
        # shadow-vcpu post-copy: KVM userfault is the first thing 7.1 lacks
        ("linux-7.1", "shadow-vcpu", "postcopy", {},
         "shadow-vcpu postcopy: post-copy needs kernel capability 'kvm_userfault' (KVM_MEM_USERFAULT) "
         "(kernel profile 'linux-7.1')"),
        # the queued userfaultfd-on-gmem does not make post-copy possible: KVM userfault is still missing
        ("linux-7.1-mm", "shadow-vcpu", "postcopy", {"fault_delivery": "uffd-shared"},
         "shadow-vcpu postcopy: post-copy needs kernel capability 'kvm_userfault' (KVM_MEM_USERFAULT) "
         "(kernel profile 'linux-7.1-mm')"),
        # mirror-vm post-copy also needs kvm_userfault, but the gmem link is checked (and missing) first
        ("linux-7.1", "mirror-vm", "postcopy", {},
         "mirror-vm: needs kernel capability 'gmem_link' (KVM_LINK_GUEST_MEMFD) to share private memory with "
         "the mirror VM (kernel profile 'linux-7.1')"),
        ("linux-7.1", "shadow-vcpu", "precopy", {},
         "shadow-vcpu precopy: pre-copy of private memory needs kernel capability 'gmem_dirty_log' (dirty logging "
         "on guest_memfd slots; upstream KVM refuses it) (kernel profile 'linux-7.1')"),
        ("proposed-2026", "mirror-vm", "postcopy", {},
         "mirror-vm postcopy: post-copy needs kernel capability 'gmem_link_userfault' (userfault on a linked "
         "guest_memfd) (kernel profile 'proposed-2026')"),
    ],
)
def test_profiles_refuse_with_one_line_naming_the_capability(trace, profile, strategy, mode, migration, message):  # noqa: F811
    with pytest.raises(CapabilityError) as e:
        run(base(profile, mode, **migration), strategy=strategy, trace_path=trace)
    assert str(e.value) == message


@pytest.mark.parametrize("profile", ["linux-7.1", "linux-7.1-mm"])
@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
def test_merged_and_queued_kernels_refuse_every_run(trace, profile, strategy, mode):  # noqa: F811
    with pytest.raises(CapabilityError, match=f"kernel profile '{profile}'"):
        run(base(profile, mode), strategy=strategy, trace_path=trace)


def test_run_records_state_date_and_source_of_what_it_assumed(trace):  # noqa: F811
    r = run(base("proposed-2026", fault_delivery="uffd-shared"), strategy="shadow-vcpu", trace_path=trace)
    assert r.status == "completed"
    k = r.summary["kernel"]
    assumed = ["kvm_userfault", "kvm_planes", "gmem_write", "uffd_gmem"]
    assert k["profile"] == "proposed-2026" and k["assumed"] == assumed
    assert k["verdict"] == "needs: kvm_userfault (unmerged), kvm_planes (unmerged), gmem_write (unmerged), uffd_gmem (queued)"
    assert k["state"] == {c: STATE[c][0] for c in assumed}
    assert k["date"] == {c: STATE[c][1] for c in assumed}
    assert k["as_of"] == "2026-12"
    assert set(k["status"]) == set(k["source"]) == set(assumed)
    assert k["status"]["uffd_gmem"].endswith("in Linux 7.1 likely, unverified")
    assert set(k) == {"profile", "assumed", "verdict", "status", "state", "date", "source", "as_of"}
    assert canonical_json(k) == canonical_json(run(base("proposed-2026", fault_delivery="uffd-shared"),
                                                   strategy="shadow-vcpu", trace_path=trace).summary["kernel"])


def test_verdict_names_each_state():
    v = kernel.Verdict(("gmem_link", "gmem_dirty_log", "uffd_gmem"))
    assert v.text == "needs: gmem_link (unmerged), gmem_dirty_log (no series), uffd_gmem (queued)"
    assert kernel.Verdict(()).text == "feasible upstream"
    assert kernel.Verdict(()).to_json("custom") == {"profile": "custom", "assumed": [], "verdict": "feasible upstream",
                                                    "status": {}, "state": {}, "date": {}, "source": {},
                                                    "as_of": "2026-12"}


def test_a_merged_capability_is_not_needed(monkeypatch):
    merged = dataclasses.replace(kernel.CAPABILITIES["uffd_gmem"], state="merged")
    monkeypatch.setitem(kernel.CAPABILITIES, "uffd_gmem", merged)
    assert kernel.Verdict(("uffd_gmem",)).text == "feasible upstream"
    assert kernel.Verdict(("kvm_userfault", "uffd_gmem")).text == "needs: kvm_userfault (unmerged)"


def test_docs_table_gives_each_state_date_and_profiles():
    text = DOCS.read_text()
    section = text[text.index("### Kernel profiles"):text.index("### The invariants")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \|(.*)\|$", line)
        if m:
            cells = [c.strip() for c in m.group(2).split(" | ")]
            rows[m.group(1)] = cells
    assert set(rows) == set(STATE) | set(DOCUMENTED_ONLY)
    for cap, (state, date) in {**STATE, **DOCUMENTED_ONLY}.items():
        _, doc_state, doc_date, _, profiles = rows[cap]
        assert (doc_state, doc_date) == (state, date), cap
        if cap in STATE:
            on = sorted(p for p, caps in PROFILE_ON.items() if cap in caps)
            assert profiles == (", ".join(on) if on else "no profile"), cap
        else:
            assert profiles == "not a `[kernel]` key", cap
    assert "/work/" not in section and "http" not in section
