"""The two migration designs under comparison: what each needs from the kernel, what its setup costs,
how its agents are created and limited, and whose CPU quota their work is charged to.

- mirror-vm: a transient mirror VM (own KVM object, same ASID, private memory shared through a linked
  guest_memfd) whose vCPUs run the SVSM at VMPL0 as migration agents. Agents are charged to the mirror VM.
- shadow-vcpu: extra VMPL0 vCPUs of the primary VM, created by AP creation with a dynamic VMSA, with APIC
  IDs from a reserved range. Their CPU time is the primary VM's: the guest slows while they work.

The driver (``replay.migrate``) is strategy-agnostic; everything that differs lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CapabilityError, SetupError
from .scenario import Scenario

HOST = "host"
MIRROR_VM = "mirror_vm"
PRIMARY_VM = "primary_vm_agents"
OWNERS = ("guest", PRIMARY_VM, MIRROR_VM, HOST)


@dataclass(frozen=True)
class Step:
    """One setup action: virtual time it takes and whose CPU it runs on."""

    name: str
    ns: int
    owner: str


class Strategy:
    name = ""
    agent_owner = ""
    # Agent CPU counts against the primary VM's quota, slowing the guest.
    charge_guest = False

    def __init__(self, scenario: Scenario):
        self.s = scenario

    # -- checks
    def check(self, has_private: bool, guest_vcpus: int) -> None:
        """Raise CapabilityError/SetupError when this strategy cannot run the scenario's mode."""
        k, mode = self.s.kernel, self.s.migration.mode
        if mode in ("precopy", "hybrid") and has_private and not k.gmem_dirty_log:
            raise CapabilityError(
                f"{self.name} {mode}: pre-copy of private memory needs kernel capability 'gmem_dirty_log' "
                "(dirty logging on guest_memfd slots; upstream KVM refuses it)"
            )
        if mode in ("postcopy", "hybrid") and not k.kvm_userfault:
            raise CapabilityError(f"{self.name} {mode}: post-copy needs kernel capability 'kvm_userfault' (KVM_MEM_USERFAULT)")

    # -- setup
    def agent_limit(self) -> int:
        raise NotImplementedError

    def agent_step(self, host: str) -> Step:
        """Creating one more agent on ``host`` ("source" or "target")."""
        raise NotImplementedError

    def setup_steps(self) -> list[Step]:
        raise NotImplementedError

    def attestation_step(self) -> Step:
        return Step("attested handshake (reports, VCEK chains, ECDH P-384, HKDF)", self.s.costs.attestation_ns, self.agent_owner)


class MirrorVM(Strategy):
    name = "mirror-vm"
    agent_owner = MIRROR_VM
    charge_guest = False

    def check(self, has_private: bool, guest_vcpus: int) -> None:
        k, mode = self.s.kernel, self.s.migration.mode
        if not k.gmem_link:
            raise CapabilityError("mirror-vm: needs kernel capability 'gmem_link' (KVM_LINK_GUEST_MEMFD) to share private memory with the mirror VM")
        super().check(has_private, guest_vcpus)
        if mode in ("postcopy", "hybrid") and not k.gmem_link_userfault:
            raise CapabilityError(f"mirror-vm {mode}: post-copy needs kernel capability 'gmem_link_userfault' (userfault on a linked guest_memfd)")

    def agent_limit(self) -> int:
        return self.s.migration.agents_max

    def agent_step(self, host: str) -> Step:
        return Step(f"{host}: mirror vCPU + VMSA", self.s.costs.vcpu_create_ns, MIRROR_VM)

    def setup_steps(self) -> list[Step]:
        c = self.s.costs
        steps = []
        for host in ("source", "target"):
            steps.append(Step(f"{host}: create mirror VM (shared ASID)", c.mirror_vm_create_ns, HOST))
            steps.append(Step(f"{host}: link guest_memfd", c.gmem_link_ns, HOST))
            steps.extend(self.agent_step(host) for _ in range(self.s.migration.agents_initial))
        return steps


class ShadowVCPU(Strategy):
    name = "shadow-vcpu"
    agent_owner = PRIMARY_VM
    charge_guest = True

    def check(self, has_private: bool, guest_vcpus: int) -> None:
        super().check(has_private, guest_vcpus)
        m, g = self.s.migration, self.s.guest
        first = m.shadow_apic_id_base
        last = first + m.shadow_apic_ids - 1
        g_last = g.apic_id_first + guest_vcpus - 1 if g.apic_id_last < 0 else g.apic_id_last
        if m.shadow_apic_ids < 1:
            raise SetupError("shadow-vcpu: migration.shadow_apic_ids must reserve at least one APIC ID")
        if first <= g_last and g.apic_id_first <= last:
            raise SetupError(
                f"shadow-vcpu: shadow APIC IDs {first}..{last} overlap the guest's APIC IDs {g.apic_id_first}..{g_last}"
            )
        if m.agents_initial > m.shadow_apic_ids:
            raise SetupError(
                f"shadow-vcpu: agents_initial {m.agents_initial} exceeds the reserved APIC ID range ({m.shadow_apic_ids} IDs)"
            )

    def agent_limit(self) -> int:
        return min(self.s.migration.agents_max, self.s.migration.shadow_apic_ids)

    def agent_step(self, host: str) -> Step:
        return Step(f"{host}: shadow vCPU (AP creation, dynamic VMSA at VMPL0)", self.s.costs.ap_create_ns, PRIMARY_VM)

    def setup_steps(self) -> list[Step]:
        return [self.agent_step(host) for host in ("source", "target") for _ in range(self.s.migration.agents_initial)]


def make_strategy(scenario: Scenario) -> Strategy:
    return {"mirror-vm": MirrorVM, "shadow-vcpu": ShadowVCPU}[scenario.migration.strategy](scenario)
