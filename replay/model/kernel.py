"""Kernel capability profiles: what the kernel under test offers, and whether a run's assumptions exist.

Both migration designs lean on KVM features that are not all upstream. Each capability has an upstream
state (``STATES``), the date of what that state rests on, a short source and the status text users read,
as of ``AS_OF``. A scenario's ``[kernel]`` table either names a profile (``linux-7.1``: what is merged in
mainline; ``linux-7.1-mm``: that plus what is queued in a maintainer tree; ``proposed-2026``: that plus
what has a posted series) or sets each capability itself (``custom``, the default: every capability on
unless turned off). Whatever the profile, every run records which capabilities it relied on, the state of
each and a verdict saying whether that exists upstream today or what it still needs, so a comparison never
hides that one design depends on unmerged or unwritten kernel work.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The date the table below was last checked against upstream.
AS_OF = "2026-12"

#: Upstream states, most advanced first. ``merged``: in Linus' tree by Linux 7.1. ``queued``: in a
#: maintainer's tree bound for mainline (e.g. akpm's mm-unstable), not known to be in a release.
#: ``posted``: a series on the list or a public out-of-tree branch, in no maintainer tree. ``none``: no
#: series at all.
STATES = ("merged", "queued", "posted", "none")


@dataclass(frozen=True)
class Upstream:
    """Where a kernel feature stands upstream."""

    state: str  # one of STATES
    date: str  # YYYY[-MM[-DD]] of the newest item the state rests on; for "none", when the absence was checked
    source: str  # a short citation (tree and branch, or series and version), no links
    status: str  # the status as users should read it


#: Capabilities a run can rely on (``needed``), in the order checks and records list them. The keys are
#: exactly the booleans of ``[kernel]`` (``replay.scenario.spec.KernelCaps``).
CAPABILITIES: dict[str, Upstream] = {
    "gmem_link": Upstream(
        "posted", "2025-05", "KVM_LINK_GUEST_MEMFD RFC v2, 2025-05",
        "KVM_LINK_GUEST_MEMFD: RFC v2, May 2025, no later version"),
    "kvm_userfault": Upstream(
        "posted", "2025-06-18", "KVM Userfault v3, 2025-06-18; absent from v7.1.0-rc6",
        "KVM_MEM_USERFAULT: v3, June 2025, no later version, not merged in 7.1"),
    "gmem_link_userfault": Upstream(
        "none", AS_OF, "no series found",
        "userfault on a linked guest_memfd: no series"),
    "gmem_dirty_log": Upstream(
        "none", AS_OF, "in-place conversion changelog, 2026: guest_memfd memslots don't support dirty tracking",
        "dirty logging on guest_memfd memslots: no series (KVM refuses dirty tracking on them)"),
    "kvm_planes": Upstream(
        "posted", "2026-06", "SVSM on KVM planes, out-of-tree branch on Linux 7.1, 2026-06",
        "KVM planes (multi-VMPL vCPUs, SVSM at VMPL0): out of tree on 7.1, June 2026"),
    "gmem_write": Upstream(
        "posted", "2025-10", "guest_memfd write() v6, 2025-10; preview branch only",
        "write() population of guest_memfd: v6, Oct 2025, preview branch only"),
    "uffd_gmem": Upstream(
        "queued", "2026-03-31",
        "akpm/mm mm-unstable 2026-03-31 (vm_uffd_ops series: KVM: guest_memfd: implement userfaultfd "
        "operations); vm_uffd_ops in mainline via mm-hotfixes-stable-2026-06-01",
        "userfaultfd on guest_memfd (MISSING and MINOR): queued in the mm tree on 2026-03-31; "
        "in Linux 7.1 likely, unverified"),
}

#: Kernel features the capability table documents although no code path models them (no ``[kernel]``
#: boolean, never assumed by a run).
DOCUMENTED: dict[str, Upstream] = {
    "gmem_inplace_conversion": Upstream(
        "posted", "2026-08-07", "guest_memfd in-place conversion v10 (41 patches), 2026-08-07",
        "in-place shared/private conversion of guest_memfd: v10, Aug 2026, not merged"),
    "gmem_hugetlb_1g": Upstream(
        "posted", "2026", "AMD RMPOPT v2, 2026: 1 GiB RMPOPT waits until 1GB hugetlb guest_memfd is merged",
        "1 GiB hugetlb pages in guest_memfd: not merged (depends on in-place conversion)"),
}

#: What each named profile turns on: the capabilities in these states.
PROFILE_STATES: dict[str, tuple[str, ...]] = {
    "linux-7.1": ("merged",),
    "linux-7.1-mm": ("merged", "queued"),
    "proposed-2026": ("merged", "queued", "posted"),
}

PROFILES: dict[str, dict[str, bool] | None] = {
    "custom": None,  # the [kernel] booleans as set
    **{name: {cap: up.state in states for cap, up in CAPABILITIES.items()} for name, states in PROFILE_STATES.items()},
}

#: How a verdict names a capability that is not merged, by state.
_NEEDS = {"queued": "queued", "posted": "unmerged", "none": "no series"}


def profile_caps(profile: str) -> dict[str, bool] | None:
    """The capabilities a named profile fixes, or None for ``custom``."""
    return PROFILES[profile]


@dataclass(frozen=True)
class Verdict:
    assumed: tuple[str, ...]  # capabilities the run relied on, in CAPABILITIES order

    @property
    def missing_upstream(self) -> tuple[str, ...]:
        return tuple(c for c in self.assumed if CAPABILITIES[c].state != "merged")

    @property
    def text(self) -> str:
        if not self.missing_upstream:
            return "feasible upstream"
        return "needs: " + ", ".join(f"{c} ({_NEEDS[CAPABILITIES[c].state]})" for c in self.missing_upstream)

    def to_json(self, profile: str) -> dict:
        caps = {c: CAPABILITIES[c] for c in self.assumed}
        return {
            "profile": profile,
            "assumed": list(self.assumed),
            "verdict": self.text,
            "status": {c: up.status for c, up in caps.items()},
            "state": {c: up.state for c, up in caps.items()},
            "date": {c: up.date for c, up in caps.items()},
            "source": {c: up.source for c, up in caps.items()},
            "as_of": AS_OF,
        }


def needed(strategy: str, mode: str, has_private: bool, os_vmpl: int, fault_delivery: str = "kvm-exit",
           page_install: str = "gmem-write") -> Verdict:
    """The capabilities a strategy/mode needs for a guest (SPEC: mirror-vm shares private memory through a
    gmem link; pre-copy of private memory needs dirty logging on gmem; post-copy needs KVM userfault, and
    for the mirror VM userfault on the linked gmem; an SVSM below the OS needs multi-VMPL vCPUs)."""
    caps = set()
    if strategy == "mirror-vm":
        caps.add("gmem_link")
    if mode in ("precopy", "hybrid") and has_private:
        caps.add("gmem_dirty_log")
    if mode in ("postcopy", "hybrid"):
        caps.add("kvm_userfault")
        if strategy == "mirror-vm":
            caps.add("gmem_link_userfault")
        if has_private and page_install == "gmem-write":
            caps.add("gmem_write")
        if has_private and (fault_delivery != "kvm-exit" or page_install != "gmem-write"):
            caps.add("uffd_gmem")  # userfaultfd delivery or install on private guest_memfd pages
    if os_vmpl > 0 or strategy == "shadow-vcpu":  # shadow agents are VMPL0 vCPUs beside the guest's
        caps.add("kvm_planes")
    return Verdict(tuple(c for c in CAPABILITIES if c in caps))
