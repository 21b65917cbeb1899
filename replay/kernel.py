"""Kernel capability profiles: what the kernel under test offers, and whether a run's assumptions exist.

Both migration designs lean on KVM features that are not all upstream. A scenario's ``[kernel]`` table
either names a profile (``linux-7.1``: what is merged; ``proposed-2026``: what has a posted series) or
sets each capability itself (``custom``, the default: every capability on unless turned off). Whatever
the profile, every run records which capabilities it relied on and a verdict saying whether that exists
upstream today or what it still needs (with the state of each series), so a comparison never hides that
one design depends on unmerged or unwritten kernel work.
"""

from __future__ import annotations

from dataclasses import dataclass

#: capability -> (merged upstream?, has a posted series?, status as users should read it)
CAPABILITIES: dict[str, tuple[bool, bool, str]] = {
    "gmem_link": (False, True, "KVM_LINK_GUEST_MEMFD: RFC v2, May 2025, no later version"),
    "kvm_userfault": (False, True, "KVM_MEM_USERFAULT: v3, June 2025, not merged in 7.1"),
    "gmem_link_userfault": (False, False, "userfault on a linked guest_memfd: no series"),
    "gmem_dirty_log": (False, False, "dirty logging on guest_memfd memslots: no series"),
    "kvm_planes": (False, True, "KVM planes (multi-VMPL vCPUs, SVSM at VMPL0): out of tree on 7.1, June 2026"),
    "gmem_write": (False, True, "write() population of guest_memfd: v6, Oct 2025, preview branch only"),
    "uffd_gmem": (False, True, "userfaultfd on guest_memfd (missing/minor): RFC series 2025, not merged"),
}

PROFILES: dict[str, dict[str, bool] | None] = {
    "custom": None,  # the [kernel] booleans as set
    "linux-7.1": {cap: merged for cap, (merged, _, _) in CAPABILITIES.items()},
    "proposed-2026": {cap: merged or posted for cap, (merged, posted, _) in CAPABILITIES.items()},
}


def profile_caps(profile: str) -> dict[str, bool] | None:
    """The capabilities a named profile fixes, or None for ``custom``."""
    return PROFILES[profile]


@dataclass(frozen=True)
class Verdict:
    assumed: tuple[str, ...]  # capabilities the run relied on, in CAPABILITIES order

    @property
    def missing_upstream(self) -> tuple[str, ...]:
        return tuple(c for c in self.assumed if not CAPABILITIES[c][0])

    @property
    def text(self) -> str:
        if not self.missing_upstream:
            return "feasible upstream"
        parts = [f"{c} ({'unmerged' if CAPABILITIES[c][1] else 'no series'})" for c in self.missing_upstream]
        return "needs: " + ", ".join(parts)

    def to_json(self, profile: str) -> dict:
        return {
            "profile": profile,
            "assumed": list(self.assumed),
            "verdict": self.text,
            "status": {c: CAPABILITIES[c][2] for c in self.assumed},
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
