"""The two migration designs under comparison: what each needs from the kernel, what its setup costs,
how its agents are created and limited, where they run, and whose CPU their work is charged to.

- mirror-vm: a transient mirror VM (own KVM object, same ASID, private memory shared through a linked
  guest_memfd, one link per memslot) whose vCPUs run the SVSM at VMPL0 as migration agents. The agents
  run on the host's CPUs given to migration (``migration.host_cpus``), shared with QEMU's migration
  thread, and are charged to the mirror VM. Its own nested page tables start empty: an agent's first touch
  of each page is an NPF + map (``costs.mirror_npf_ns``). Each mirror vCPU has a VMSA page the SVSM
  builds like any AP's (RMPUPDATE, PVALIDATE, RMPADJUST vmsa=1), and is torn down (RMPADJUST vmsa=0)
  with the mirror VM once the migration is over.
- shadow-vcpu: extra VMPL0 vCPUs of the primary VM, created by AP creation with a dynamic VMSA (a VMSA
  page per agent: RMPUPDATE, PVALIDATE and RMPADJUST(vmsa=1) on the RMP), with APIC IDs from a reserved
  range. Their CPU time is the primary VM's: where the guest runs, they take its spare quota first. The
  target's shadow APs stay while the migration needs them (post-copy: until the last page is in) and are
  torn down then, the guest running beside them.

Both designs need the incoming VM's SVSM running at VMPL0 on the target before any agent there can
work (``target_vmpl0_boot_ns``), and tear their agents down after the migration, off the downtime.

The driver (``replay.migration``) is strategy-agnostic; everything that differs lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import CapabilityError, SetupError
from ..model.kernel import Verdict, needed
from .spec import Scenario

HOST = "host"
MIRROR_VM = "mirror_vm"
PRIMARY_VM = "primary_vm_agents"
OWNERS = ("guest", PRIMARY_VM, MIRROR_VM, HOST)
SOURCE, TARGET = 0, 1
SIDES = ("source", "target")


@dataclass(frozen=True)
class Step:
    """One setup or teardown action on one side: CPU it uses (``cpu_ns``, on ``owner``'s CPU) and time it
    waits on firmware or the PSP (``wait_ns``, no CPU). ``vmsa_pages``: VMSA pages it creates (+1) or
    retires (-1) on that side's RMP."""

    name: str
    side: int
    owner: str
    cpu_ns: int = 0
    wait_ns: int = 0
    vmsa_pages: int = 0


class Strategy:
    name = ""
    # Whose CPU the agents use; PRIMARY_VM: the guest's own quota, so the guest slows where they run.
    agent_owner = ""
    # Agents run on the host CPUs given to migration, shared with QEMU's migration thread.
    agents_on_host_cpus = False

    def __init__(self, scenario: Scenario):
        self.s = scenario

    # -- checks
    def check(self, has_private: bool, guest_vcpus: int) -> None:
        """Raise CapabilityError/SetupError when this strategy cannot run the scenario's mode."""
        k, mode = self.s.kernel, self.s.migration.mode
        why = {
            "gmem_link": f"{self.name}: needs kernel capability 'gmem_link' (KVM_LINK_GUEST_MEMFD) to share private "
                         "memory with the mirror VM",
            "gmem_dirty_log": f"{self.name} {mode}: pre-copy of private memory needs kernel capability 'gmem_dirty_log' "
                              "(dirty logging on guest_memfd slots; upstream KVM refuses it)",
            "kvm_userfault": f"{self.name} {mode}: post-copy needs kernel capability 'kvm_userfault' (KVM_MEM_USERFAULT)",
            "gmem_link_userfault": f"{self.name} {mode}: post-copy needs kernel capability 'gmem_link_userfault' "
                                   "(userfault on a linked guest_memfd)",
            "kvm_planes": f"{self.name}: needs kernel capability 'kvm_planes' (VMPL0 vCPUs beside the guest's OS)",
            "gmem_write": f"{self.name} {mode}: page_install 'gmem-write' of private pages needs kernel capability "
                          "'gmem_write' (write() into guest_memfd)",
            "uffd_gmem": f"{self.name} {mode}: userfaultfd on private pages (fault_delivery "
                         f"'{self.s.migration.fault_delivery}', page_install '{self.s.migration.page_install}') needs "
                         "kernel capability 'uffd_gmem'",
        }
        for cap in self.capabilities(has_private).assumed:
            if not getattr(k, cap):
                suffix = f" (kernel profile {k.profile!r})" if k.profile != "custom" else ""
                raise CapabilityError(why[cap] + suffix)

    def capabilities(self, has_private: bool) -> Verdict:
        """The kernel capabilities this strategy and the scenario's mode and fault path rely on."""
        m = self.s.migration
        return needed(self.name, m.mode, has_private, self.s.guest.os_vmpl, m.fault_delivery, m.page_install)

    # -- agents
    def agent_limit(self) -> int:
        raise NotImplementedError

    def agent_steps(self, side: int) -> list[Step]:
        """Creating one more agent on ``side``."""
        raise NotImplementedError

    def setup_steps(self) -> list[Step]:
        """Strategy-specific setup, in order, before the handshake."""
        raise NotImplementedError

    def teardown_steps(self, side: int, agents: int) -> list[Step]:
        """Tearing ``side``'s agents down once the migration no longer needs them (after the target resumed
        in pre-copy, after the last page in post-copy): their VMSAs retired (RMPADJUST vmsa=0)."""
        raise NotImplementedError

    def target_boot_step(self) -> Step:
        """The incoming VM's SVSM boots at VMPL0 on the target: no agent works there before (both designs)."""
        return Step("target: launch the incoming VM's VMPL0 (SVSM)", TARGET, HOST, wait_ns=self.s.costs.target_vmpl0_boot_ns)

    def attestation_step(self, side: int) -> Step:
        c = self.s.costs
        return Step(f"{SIDES[side]}: attested handshake (report via the PSP; VCEK chain, ECDH P-384, HKDF)", side,
                    self.agent_owner, cpu_ns=c.attestation_cpu_ns, wait_ns=c.attestation_psp_ns)


class MirrorVM(Strategy):
    name = "mirror-vm"
    agent_owner = MIRROR_VM
    agents_on_host_cpus = True

    def agent_limit(self) -> int:
        return self.s.migration.agents_max

    def agent_steps(self, side: int) -> list[Step]:
        c = self.s.costs
        return [
            Step(f"{SIDES[side]}: mirror vCPU: SVSM builds its VMSA (PVALIDATE, RMPADJUST vmsa=1)", side, MIRROR_VM,
                 cpu_ns=c.ap_create_ns + c.pvalidate_ns + c.rmpadjust_ns, vmsa_pages=1),
            Step(f"{SIDES[side]}: mirror vCPU: KVM_CREATE_VCPU, host RMPUPDATE (VMGEXIT via the GHCB)", side, HOST,
                 cpu_ns=c.vcpu_create_ns + c.vmgexit_ns + c.rmpupdate_ns),
        ]

    def setup_steps(self) -> list[Step]:
        c = self.s.costs
        steps = []
        for side in (SOURCE, TARGET):
            steps.append(Step(f"{SIDES[side]}: create mirror VM (shared ASID)", side, HOST, cpu_ns=c.mirror_vm_create_ns))
            steps += [Step(f"{SIDES[side]}: link guest_memfd (memslot {i})", side, HOST, cpu_ns=c.gmem_link_ns)
                      for i in range(self.s.guest.memslots)]
            if side == TARGET:
                steps.append(self.target_boot_step())
            for _ in range(self.s.migration.agents_initial):
                steps += self.agent_steps(side)
        return steps

    def teardown_steps(self, side: int, agents: int) -> list[Step]:
        c = self.s.costs
        return [Step(f"{SIDES[side]}: tear down mirror vCPU (RMPADJUST vmsa=0)", side, MIRROR_VM,
                     cpu_ns=c.ap_destroy_ns, vmsa_pages=-1) for _ in range(agents)] + [
            Step(f"{SIDES[side]}: destroy the mirror VM", side, HOST, cpu_ns=c.mirror_vm_destroy_ns)]


class ShadowVCPU(Strategy):
    name = "shadow-vcpu"
    agent_owner = PRIMARY_VM

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

    def agent_steps(self, side: int) -> list[Step]:
        c = self.s.costs
        return [
            Step(f"{SIDES[side]}: shadow vCPU: SVSM builds its VMSA (PVALIDATE, RMPADJUST vmsa=1)", side,
                 PRIMARY_VM, cpu_ns=c.ap_create_ns + c.pvalidate_ns + c.rmpadjust_ns, vmsa_pages=1),
            Step(f"{SIDES[side]}: shadow vCPU: KVM_CREATE_VCPU (VMPL0 plane), host RMPUPDATE (AP creation NAE)",
                 side, HOST, cpu_ns=c.vcpu_create_ns + c.vmgexit_ns + c.rmpupdate_ns),
        ]

    def setup_steps(self) -> list[Step]:
        n = self.s.migration.agents_initial
        steps = [s for _ in range(n) for s in self.agent_steps(SOURCE)]
        # The target's SVSM must be running at VMPL0 before it can create APs.
        steps.append(self.target_boot_step())
        steps += [s for _ in range(n) for s in self.agent_steps(TARGET)]
        return steps

    def teardown_steps(self, side: int, agents: int) -> list[Step]:
        return [Step(f"{SIDES[side]}: tear down shadow AP (AP destroy NAE, RMPADJUST vmsa=0)", side, PRIMARY_VM,
                     cpu_ns=self.s.costs.ap_destroy_ns, vmsa_pages=-1) for _ in range(agents)]


def make_strategy(scenario: Scenario) -> Strategy:
    return {"mirror-vm": MirrorVM, "shadow-vcpu": ShadowVCPU}[scenario.migration.strategy](scenario)
