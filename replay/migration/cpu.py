"""CPU accounting: who pays for migration work, how fast agents run, and whose progress they take.

Owners: the guest's own vCPUs (``guest``), agents on the primary VM's quota (``primary_vm_agents``,
shadow vCPUs), the mirror VM (``mirror_vm``) and the host (``host``: QEMU's migration thread, KVM ioctls).

Capacity, in CPUs, of ``A`` agents on one side (a rational, so that the clock stays in integers):

- mirror-vm: the agents run on the ``migration.host_cpus`` = H CPUs the host gives migration, shared with
  that side's migration thread: at most min(A, H) CPUs for the agents, and agents + host thread together
  at most H (a pool).
- shadow-vcpu: the agents are vCPUs of the guest's VM and share its CPU quota Q (``guest.cpu_quota``, by
  default one CPU per vCPU) with the D vCPUs that are busy (``replay.model.demand``). Where the guest runs,
  ``costs.cpu_sharing`` decides: ``fair`` (CFS) gives each runnable thread min(1, Q/(D+A)) of a CPU, so the
  agents get A x min(1, Q/(D+A)); ``agents-first`` lets them take min(A, Q) first. Where the guest does not
  run (the target before it resumes, the source after), they get min(A, Q). The guest loses only what the
  agents take beyond its spare quota Q - D (replay.model.demand's progress rule): an idle guest loses nothing.
  Both policies differ in how fast the agents go, hence in how long the guest is exposed.

Waiting on the PSP or firmware is time, not CPU.
"""

from __future__ import annotations

from ..model.demand import Demand, agent_share
from ..scenario.spec import Scenario
from ..scenario.strategies import OWNERS, PRIMARY_VM, Step, Strategy


class Cpu:
    def __init__(self, scenario: Scenario, strategy: Strategy, vcpus: int, demand: Demand):
        self.strategy = strategy
        self.vcpus = vcpus
        self.demand = demand
        self.host_cpus = scenario.migration.host_cpus
        self.fair = scenario.costs.cpu_sharing == "fair"
        self.ledger = {o: 0 for o in OWNERS}

    def charge(self, owner: str, ns: int) -> None:
        self.ledger[owner] += ns

    def agent_capacity(self, agents: int, side: int, guest_side: int | None, g: int = 0) -> tuple[int, int]:
        """CPUs (num, den) that ``agents`` agents on ``side`` get; ``guest_side``: where the guest runs
        (None: paused); ``g``: the guest's trace time (its demand then)."""
        if self.strategy.agents_on_host_cpus:
            return min(agents, self.host_cpus), 1
        if side == guest_side:
            return agent_share(agents, self.demand.at(g), self.demand.quota_mcpu, self.fair)
        return agent_share(agents, 0, self.demand.quota_mcpu, False)  # min(A, Q): the guest does not run here

    def pool(self) -> int:
        """CPUs the agents share with the host migration thread (0: separate)."""
        return self.host_cpus if self.strategy.agents_on_host_cpus else 0

    def transfer_params(self, agents: int, guest_side: int | None) -> dict:
        """begin_transfer()'s capacity and charging arguments."""
        owner = self.strategy.agent_owner
        shared = not self.strategy.agents_on_host_cpus
        return dict(
            src_cpus=self.agent_capacity(agents, 0, guest_side), dst_cpus=self.agent_capacity(agents, 1, guest_side),
            src_pool_cpus=self.pool(), dst_pool_cpus=self.pool(),
            charge_guest=self.takes_guest_cpu(owner, 0, guest_side),
            charge_target_guest=self.takes_guest_cpu(owner, 1, guest_side),
            agents=agents, fair=self.fair, src_shared=shared and guest_side == 0, dst_shared=shared and guest_side == 1,
            **self.demand.engine_args(),
        )

    def agent_work_ns(self, cpu_ns: int, agents: int, side: int, guest_side: int | None, g: int = 0) -> int:
        """Time ``agents`` agents on ``side`` take for ``cpu_ns`` of work (the guest at trace time ``g``)."""
        num, den = self.agent_capacity(agents, side, guest_side, g)
        return -(-cpu_ns * den // num)

    def step_ns(self, step: Step, guest_side: int | None, g: int = 0) -> int:
        """Time a setup/teardown step takes: its wait plus its CPU on one thread of its owner."""
        if step.owner == PRIMARY_VM:
            return step.wait_ns + self.agent_work_ns(step.cpu_ns, 1, step.side, guest_side, g)
        return step.wait_ns + step.cpu_ns

    @staticmethod
    def takes_guest_cpu(owner: str, side: int, guest_side: int | None) -> bool:
        """Whether CPU of ``owner`` on ``side`` comes out of the running guest's quota."""
        return owner == PRIMARY_VM and side == guest_side
