"""Scenarios: the declarative description of one comparison, parsed from TOML into frozen dataclasses.

A scenario names the guest, the trace (a file, or a generator spec so that no file is needed), the
migration (strategy, mode, link, limits, agents), the costs of every step (``[costs]``: integers in ns or
bytes, defaults below with where each figure comes from), the capabilities of the kernel under test
(``[kernel]``), link faults (``[[fault]]``) and a seed. Unknown keys are rejected with a "did you mean"
hint; ``--set section.key=value`` overrides any key. ``Scenario.resolved()`` is the fully resolved form
that every run record embeds, so that two runs can be compared by their effective parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..model.demand import check_cpu_demand, check_cpu_quota
from ..core.errors import ScenarioError, UsageError
from ..model.kernel import PROFILES
from ..core.units import parse_duration_ns, parse_size
from ..core.validate import MAX_DEPTH, check_key, clip, depth, short

STRATEGIES = ("mirror-vm", "shadow-vcpu")
MODES = ("precopy", "postcopy", "hybrid")
ON_MAX_ROUNDS = ("cancel", "stop-and-copy", "postcopy")
FAULT_DELIVERY = ("kvm-exit", "uffd-shared", "uffd-per-vcpu")
PAGE_INSTALL = ("gmem-write", "uffd-copy", "uffd-continue")
CPU_SHARING = ("fair", "agents-first")
LATENCY_JITTER = ("none", "uniform", "exponential")
KERNEL_PROFILES = tuple(PROFILES)  # replay.model.kernel: the profiles it knows
FAULT_KINDS = ("link_down",)
FOREVER = -1  # duration_ns of a link that never comes back


@dataclass(frozen=True)
class GuestSpec:
    """The customer's VM. ``guest_bytes``/``vcpus`` default to the trace's."""

    guest_bytes: int = 0  # 0: take the trace's guest_bytes
    vcpus: int = 0  # 0: take the trace's vcpus
    os_vmpl: int = 2  # the OS runs at VMPL2 under an SVSM at VMPL0 (COCONUT-SVSM's layout)
    apic_id_first: int = 0
    apic_id_last: int = -1  # -1: apic_id_first + vcpus - 1
    asid: int = 1
    memslots: int = 2  # guest_memfd memslots (below and above the 4 GiB hole): one gmem link each
    # When the vCPUs want CPU (replay.model.demand): "trace" (its idle intervals, else busy to its last event),
    # "busy" (always, the model of earlier versions) or a fraction of the vCPUs busy up to the last event.
    cpu_demand: str = "trace"
    # The VM's CPU quota in CPUs (a cgroup's cpu.max), a decimal; "": one CPU per vCPU.
    cpu_quota: str = ""


@dataclass(frozen=True)
class TraceSpec:
    """Either ``file`` (relative to the scenario file) or a generator spec (``generator`` + options)."""

    file: str = ""
    generator: str = ""
    events: int = 0
    rate: int = 1_000_000  # accesses per guest second
    fill: bool = False
    seed: int = -1  # -1: the scenario's seed
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MigrationSpec:
    strategy: str = "mirror-vm"
    mode: str = "precopy"
    start_ns: int = 0  # guest (trace) time at which migration starts
    bandwidth_bytes_per_s: int = 1_250_000_000  # 10 Gbit/s
    latency_ns: int = 50_000  # one way; a datacentre hop plus the agent's queueing
    downtime_limit_ns: int = 300_000_000  # QEMU's default downtime-limit is 300 ms
    # QEMU never caps rounds (dirty syncs); a scenario says what happens at max_rounds (guestperf's max_iters
    # cancels; KubeVirt switches to post-copy): "cancel" | "stop-and-copy" | "postcopy"
    max_rounds: int = 30
    on_max_rounds: str = "stop-and-copy"
    # QEMU's switchover threshold uses the bandwidth measured over the last period, unless this is set
    # (avail-switchover-bandwidth); 0: measured
    avail_switchover_bandwidth_bytes_per_s: int = 0
    burst_ns: int = 50_000_000  # ram_save_iterate sends for at most ~50 ms (MAX_WAIT) before re-estimating
    bandwidth_period_ns: int = 100_000_000  # BUFFER_DELAY: bandwidth and threshold are updated every 100 ms
    host_cpus: int = 2  # host CPUs given to migration work (QEMU's migration thread, mirror VM vCPUs)
    agents_initial: int = 1
    agents_max: int = 4
    shadow_apic_id_base: int = 240  # reserved APIC ID range for shadow vCPUs
    shadow_apic_ids: int = 4  # size of that range: bounds the number of shadow agents
    precopy_rounds: int = 1  # hybrid: pre-copy rounds before switching to post-copy
    postcopy_preempt: bool = False  # requests get their own channel (QEMU postcopy-preempt)
    prepaging: bool = False  # background push around recent faults (Hines & Gopalan, VEE'09)
    prepage_pages: int = 64  # pages after a faulting gfn pushed first when prepaging
    # How a vCPU's access to a missing page reaches the handler: its own KVM userfault exit, one userfaultfd
    # whose single handler thread serves every vCPU, or one userfaultfd (and handler) per vCPU.
    fault_delivery: str = "kvm-exit"
    # How the handler installs the page: write() into guest_memfd, UFFDIO_COPY or UFFDIO_CONTINUE.
    page_install: str = "gmem-write"
    # false: no background push while the guest runs; faults alone bring pages (KVM's demand_paging_test);
    # the rest is pushed after the trace's last event so that the migration completes
    postcopy_background_push: bool = True
    # Variation of the one-way latency each post-copy request and reply sees (network queueing, interrupt
    # coalescing): "none", "uniform" (0..latency_jitter_ns) or "exponential" (mean latency_jitter_ns),
    # drawn from the scenario's seed.
    latency_jitter: str = "none"
    latency_jitter_ns: int = 0
    # Data mode: real page contents (encrypted per host), moved through the attested, sealed channel.
    data: bool = False
    data_zstd_level: int = 0  # 0: no compression; else the zstd level of the packets' payloads


@dataclass(frozen=True)
class Costs:
    """Every cost in one place: integers in ns or bytes.

    Figures are order-of-magnitude defaults for a current EPYC host; change them per scenario. Where a
    figure comes from is said beside it. The comparison between strategies depends on their ratios more
    than on their absolute values.
    """

    # -- setup, mirror-vm
    mirror_vm_create_ns: int = 2_000_000  # KVM_CREATE_VM + KVM_CAP_VM_COPY_ENC_CONTEXT_FROM (ms scale)
    gmem_link_ns: int = 500_000  # KVM_LINK_GUEST_MEMFD: a new file on the same inode, memslot setup
    # -- every agent, both designs: the host creates its vCPU (a mirror VM's, or a VMPL0 plane vCPU of the
    # guest's VM) and the SVSM builds its VMSA (then PVALIDATE, RMPADJUST vmsa=1; the host's RMPUPDATE)
    vcpu_create_ns: int = 1_000_000  # KVM_CREATE_VCPU and its setup (ms scale, per agent)
    ap_create_ns: int = 600_000  # the SVSM builds an agent's VMSA and starts it (AP Creation NAE)
    # -- both
    # Attested handshake, split: waiting on the PSP for the reports is not CPU; verifying the VCEK chains
    # and reports, ECDH P-384 and HKDF are agent CPU (ms scale for P-384 in software).
    attestation_psp_ns: int = 15_000_000
    attestation_cpu_ns: int = 5_000_000
    # -- work only one design does
    mirror_npf_ns: int = 2_000  # mirror VM: NPF exit + gmem lookup + map on an agent's first touch of a page
    # Both: tear one agent vCPU down (shadow: AP destroy NAE; mirror: vCPU destroy), RMPADJUST vmsa=0.
    ap_destroy_ns: int = 200_000
    mirror_vm_destroy_ns: int = 1_000_000  # mirror VM: KVM VM destroy, gmem unlink (the order of its creation)
    # Both: the incoming VM's SVSM runs at VMPL0 on the target before any agent there can work.
    target_vmpl0_boot_ns: int = 5_000_000
    # -- dirty tracking and the host's own work
    dirty_wp_fault_ns: int = 260  # guest write-protect fault on its first write after a sync (Cloud Hypervisor)
    dirty_log_start_ns_per_gib: int = 4_500_000  # start dirty logging: 4-5 ms/GiB (Cloud Hypervisor)
    host_page_ns: int = 500  # QEMU's migration thread per shared page: zero check, copy to the socket
    rmpadjust_ns: int = 1_000  # RMPADJUST (agent at VMPL0, per 4K page)
    cpu_sharing: str = "fair"  # how shadow agents and guest vCPUs share the VM's CPUs: "fair" | "agents-first"
    dirty_sync_ns: int = 200_000  # fixed cost of one get-and-clear of the dirty log
    dirty_sync_ns_per_gib: int = 100_000  # bitmap walk: 32 KiB of bitmap per GiB
    page_pack_ns: int = 2_000  # agent CPU per private 4 KiB page: AES-GCM ~2 GB/s + copy + header
    zero_page_ns: int = 300  # agent detects a zero private page (sends a header only)
    page_unpack_ns: int = 2_000  # target agent: verify/decrypt one private page
    vmgexit_ns: int = 5_000  # one VMGEXIT round trip to the host per batch of pages
    batch_pages: int = 64  # pages an agent packages per VMGEXIT
    rmpupdate_ns: int = 1_000  # RMPUPDATE (host, per 4K page)
    pvalidate_ns: int = 1_000  # PVALIDATE (agent at VMPL0, per 4K page)
    page_header_bytes: int = 64  # gfn, stream, sequence, flags, GCM tag (a zero page costs only this)
    vmsa_bytes: int = 4_096  # one VMSA page per vCPU per VMPL in use
    device_state_bytes: int = 1_048_576  # QEMU device state (virtio, APIC, timers...)
    resume_ns: int = 5_000_000  # target resumes vCPUs after the validation token is accepted
    postcopy_fault_exit_ns: int = 2_000  # vCPU exit to userspace (or uffd wake-up) + userfault bookkeeping
    # Serialized sections of the fault path (replay.migration.faultpath), calibrated on KVM's
    # demand_paging_test (64 MiB per vCPU): each parameter pair is fitted on the published rates at 2 and 64
    # vCPUs and predicts the one at 8 (docs/how-it-works.md "Calibration" gives both).
    # KVM userfault exits (160,326 / 128,247 / 39,913 faults/s at 2 / 8 / 64 vCPUs): the install path's lock
    # is held install + fault_lock_ns + fault_lock_per_waiter_ns x w per fault, w = vCPUs blocked (cache-line
    # and lock hand-off costs that grow with the contenders).
    fault_lock_ns: int = 3_820
    fault_lock_per_waiter_ns: int = 303
    # One shared userfaultfd (86,840 / 37,912 / 1,664 faults/s): its single handler holds install +
    # uffd_handler_ns + per_waiter_sq x w^2 per fault: each wake-up of the shared wait queue wakes all w
    # blocked vCPUs (a thundering herd), each of which retries under the lock the w others contend for.
    uffd_handler_ns: int = 9_129
    uffd_handler_per_waiter_sq_ns: int = 144
    # Installing a 4 KiB page (Firecracker: write() 202 ms vs UFFDIO_COPY 237 ms per 512 MiB);
    # UFFDIO_CONTINUE maps a page already in the page cache: no copy.
    install_gmem_write_ns: int = 1_540
    install_uffd_copy_ns: int = 1_810
    install_uffd_continue_ns: int = 600
    # Data mode's agent work per private 4 KiB page, measured by `tools/bench --data` on the project's
    # 2-core machine (best of 3, quiet): decrypt AES-XTS + AES-256-GCM seal 3,220-3,380 ns; zstd level 3
    # adds 700 ns on a compressible page and 3,300 on an incompressible one; open + check + re-encrypt
    # 4,140-4,550 ns. (Metadata mode keeps page_pack_ns / page_unpack_ns.)
    data_page_pack_ns: int = 3_300
    data_zstd_page_ns: int = 2_000
    data_page_unpack_ns: int = 4_300
    postcopy_request_bytes: int = 64  # page request on the return path
    # The push's in-flight window: the most push data buffered on the channel ahead of a reply without a
    # preempt channel (QEMU's postcopy-preempt cover letter measured 10.7 ms vanilla vs 0.57 ms preempt
    # per 4K fault, Peter Xu, 2022). A reply waits for min(this, what the push still has to send).
    postcopy_queue_bytes: int = 4_194_304


@dataclass(frozen=True)
class KernelCaps:
    """Capabilities of the kernel under test (SPEC section 4). A ``profile`` other than ``custom`` fixes
    them (``replay/model/kernel.py``)."""

    profile: str = "custom"
    gmem_link: bool = True  # KVM_LINK_GUEST_MEMFD (posted, RFC v2): mirror VM shares private memory
    kvm_userfault: bool = True  # KVM_MEM_USERFAULT + bitmap (posted, v3): post-copy of private memory
    gmem_link_userfault: bool = True  # userfault on a linked guest_memfd (mirror post-copy)
    gmem_dirty_log: bool = True  # dirty logging on guest_memfd slots (upstream refuses it today)
    kvm_planes: bool = True  # multi-VMPL vCPUs (SVSM at VMPL0 beside the OS): out of tree on 7.1
    gmem_write: bool = True  # write() population of guest_memfd (v6 series): installs a private page
    uffd_gmem: bool = True  # userfaultfd on guest_memfd (queued in mm): uffd delivery or install for private pages


@dataclass(frozen=True)
class AttestationSpec:
    """Data mode's attested handshake: what each platform reports and what both sides require. TCB
    versions are "bootloader.tee.snp.microcode"; measurements are names of the SVSM builds."""

    allowed_measurement: str = "svsm"
    min_tcb: str = "9.0.23.72"
    source_measurement: str = "svsm"
    target_measurement: str = "svsm"
    source_tcb: str = "9.0.23.72"
    target_tcb: str = "9.0.23.72"
    target_migratable: bool = True  # the guest policy's MIGRATE_MA bit, as the target's report says
    target_debug: bool = False  # the guest policy's DEBUG bit, as the target's report says
    target_root: str = "amd"  # "amd", or anything else: the target's VCEK chains to an untrusted root


@dataclass(frozen=True)
class LinkFault:
    kind: str = "link_down"
    at_ns: int = 0  # virtual time
    duration_ns: int = FOREVER


# What an untrusted host can do to a migration ([[adversary]]; replay.migration.adversary carries them out).
ADVERSARY_KINDS = ("flip", "drop", "replay", "reorder", "forge", "truncate", "bad-measurement", "bad-signature",
                   "bad-policy", "bad-tcb", "host-write-private", "rmp-remap", "skip-pvalidate", "double-pvalidate",
                   "replay-old-version", "tamper-shared", "link-loss",
                   # what if the RMP failed: memory encryption alone decides (replay.migration.adversary)
                   "rmp-bypass-copy", "stale-ciphertext", "raw-copy")
# The kinds that act on one packet, so may name it (stream + sequence) instead of a time.
ADVERSARY_PACKET_KINDS = ("flip", "drop", "replay", "reorder", "forge", "truncate", "replay-old-version",
                          "tamper-shared")
ADVERSARY_HOSTS = ("source", "target")
ADVERSARY_WHERE = ("header", "payload")
UNSET = -1  # at_ns / stream / sequence not given


@dataclass(frozen=True)
class AdversarySpec:
    """One action of the untrusted host: ``kind``, at virtual time ``at_ns`` or at packet ``sequence`` of
    ``stream`` (neither: the first chance after the migration starts)."""

    kind: str = ""
    at_ns: int = UNSET
    stream: int = UNSET
    sequence: int = UNSET
    where: str = "payload"  # flip: the header or the payload of the packet
    host: str = "source"  # host-write-private, rmp-bypass-copy, stale-ciphertext: whose host acts
    duration_ns: int = FOREVER  # link-loss: how long the link stays down


@dataclass(frozen=True)
class Scenario:
    name: str = ""
    description: str = ""
    seed: int = 0
    guest: GuestSpec = GuestSpec()
    trace: TraceSpec = TraceSpec()
    migration: MigrationSpec = MigrationSpec()
    costs: Costs = Costs()
    kernel: KernelCaps = KernelCaps()
    attestation: AttestationSpec = AttestationSpec()
    faults: tuple[LinkFault, ...] = ()
    adversary: tuple[AdversarySpec, ...] = ()
    base_dir: str = "."  # directory of the scenario file (trace.file is relative to it); not recorded

    def with_strategy(self, strategy: str) -> "Scenario":
        _one_of("strategy", strategy, STRATEGIES)
        return dataclasses.replace(self, migration=dataclasses.replace(self.migration, strategy=strategy))

    @property
    def trace_seed(self) -> int:
        """The generator's seed: ``trace.seed``, or the scenario's when it is -1."""
        return self.seed if self.trace.seed < 0 else self.trace.seed

    def resolved(self, *, guest_bytes: int, vcpus: int) -> dict:
        """The effective parameters, as every run record embeds them."""
        guest = dataclasses.replace(
            self.guest,
            guest_bytes=guest_bytes,
            vcpus=vcpus,
            apic_id_last=self.guest.apic_id_first + vcpus - 1 if self.guest.apic_id_last < 0 else self.guest.apic_id_last,
        )
        trace = dataclasses.replace(self.trace, seed=self.trace_seed) if self.trace.generator else self.trace
        out = {
            "name": self.name,
            "seed": self.seed,
            "guest": _plain(guest),
            "trace": _plain(trace),
            "migration": _plain(self.migration),
            "costs": _plain(self.costs),
            "kernel": _plain(self.kernel),
            "attestation": _plain(self.attestation),
            "faults": [_plain(f) for f in self.faults],
        }
        if self.adversary:  # only then: records of scenarios without one keep their bytes
            out["adversary"] = [_plain(a) for a in self.adversary]
        return out


def parse_tcb(text: str, where: str) -> tuple[int, int, int, int]:
    """"bootloader.tee.snp.microcode", each 0..255."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ScenarioError(f"{where}: expected a TCB version \"bootloader.tee.snp.microcode\" (each 0..255), "
                            f"got {text[:40]!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _plain(obj: Any) -> Any:
    """Dataclass -> dict with JSON-safe values; floats become decimal strings (records hold no floats)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    return obj


# --------------------------------------------------------------------------------------------- parsing

_SECTIONS = {"guest": GuestSpec, "trace": TraceSpec, "migration": MigrationSpec, "costs": Costs, "kernel": KernelCaps,
             "attestation": AttestationSpec}
_TOP_KEYS = {"name", "description", "seed", "fault", "adversary", *_SECTIONS}
# Keys that accept human units ("16GiB", "500ms") besides integers.
_SIZE_KEYS = {("guest", "guest_bytes")}
_DURATION_KEYS = {("migration", "start_ns"), ("migration", "latency_ns"), ("migration", "latency_jitter_ns"),
                  ("migration", "downtime_limit_ns"),
                  ("migration", "burst_ns"), ("migration", "bandwidth_period_ns"),
                  ("fault", "at_ns"), ("fault", "duration_ns"), ("adversary", "at_ns"), ("adversary", "duration_ns")}
# Friendly aliases users reach for first.
_ALIASES = {("guest", "size"): "guest_bytes",
            ("migration", "avail_switchover_bandwidth"): "avail_switchover_bandwidth_bytes_per_s"}


# -1 means "the scenario's seed", "derived from vcpus" and "forever" respectively.
_NEGATIVE_OK = {("trace", "seed"), ("guest", "apic_id_last"), ("fault", "duration_ns"), ("adversary", "duration_ns")}


def _one_of(where: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ScenarioError(f"{where} {short(value)} is not one of {', '.join(choices)}{hint(str(value), choices)}")
    return value


def hint(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_section(cls, table: Mapping[str, Any], section: str, src: str, label: str | None = None):
    """One table of the scenario as ``cls``; ``section`` names its kind (key rules), ``label`` the table in
    messages (``fault[2]``)."""
    label = label or section
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{src}: [{label}] must be a table")
    names = [f.name for f in fields(cls)]
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = _ALIASES.get((section, key), key)
        where = f"{src}: {label}.{key}"
        if name not in names:
            raise ScenarioError(f"{src}: {label}.{clip(key, 40)}: unknown key{hint(key, names)}")
        try:
            if (section, name) == ("guest", "cpu_demand"):
                value = check_cpu_demand(value, where)
            elif (section, name) == ("guest", "cpu_quota"):
                value = check_cpu_quota(value, where)
            elif (section, name) in _SIZE_KEYS and isinstance(value, str):
                value = parse_size(value, where)
            elif (section, name) in _DURATION_KEYS and isinstance(value, str):
                value = FOREVER if value == "forever" and (section, name) in _NEGATIVE_OK else parse_duration_ns(value, where)
        except UsageError as exc:
            raise ScenarioError(str(exc)) from None
        # Type from the field's default, range and unit from replay.core.validate's key rules.
        kwargs[name] = check_key(section, name, value, getattr(defaults, name), where)
    return cls(**kwargs)


def _validate(s: Scenario, src: str) -> Scenario:
    m, t, g, c = s.migration, s.trace, s.guest, s.costs
    _one_of(f"{src}: migration.strategy", m.strategy, STRATEGIES)
    _one_of(f"{src}: migration.mode", m.mode, MODES)
    if bool(t.file) == bool(t.generator):
        raise ScenarioError(f"{src}: [trace] needs exactly one of 'file' or 'generator'")
    if t.generator and t.events <= 0:
        raise ScenarioError(f"{src}: trace.events must be > 0 with a generator")
    if m.bandwidth_bytes_per_s <= 0:
        raise ScenarioError(f"{src}: migration.bandwidth_bytes_per_s must be > 0")
    if m.max_rounds < 1:
        raise ScenarioError(f"{src}: migration.max_rounds must be >= 1")
    _one_of(f"{src}: migration.on_max_rounds", m.on_max_rounds, ON_MAX_ROUNDS)
    _one_of(f"{src}: migration.fault_delivery", m.fault_delivery, FAULT_DELIVERY)
    _one_of(f"{src}: migration.page_install", m.page_install, PAGE_INSTALL)
    _one_of(f"{src}: costs.cpu_sharing", c.cpu_sharing, CPU_SHARING)
    _one_of(f"{src}: migration.latency_jitter", m.latency_jitter, LATENCY_JITTER)
    _one_of(f"{src}: kernel.profile", s.kernel.profile, KERNEL_PROFILES)
    for key in ("burst_ns", "bandwidth_period_ns", "host_cpus"):
        if getattr(m, key) < 1:
            raise ScenarioError(f"{src}: migration.{key} must be >= 1")
    for key in ("min_tcb", "source_tcb", "target_tcb"):
        parse_tcb(getattr(s.attestation, key), f"{src}: attestation.{key}")
    if not 0 <= m.data_zstd_level <= 22:
        raise ScenarioError(f"{src}: migration.data_zstd_level must be 0 (off) or a zstd level 1..22")
    if g.memslots < 1:
        raise ScenarioError(f"{src}: guest.memslots must be >= 1")
    if not 1 <= m.agents_initial <= m.agents_max:
        raise ScenarioError(f"{src}: migration.agents_initial must be between 1 and agents_max ({m.agents_max})")
    if g.os_vmpl > 3:
        raise ScenarioError(f"{src}: guest.os_vmpl must be 0..3")
    if c.batch_pages < 1:
        raise ScenarioError(f"{src}: costs.batch_pages must be >= 1")
    if t.rate <= 0:
        raise ScenarioError(f"{src}: trace.rate must be > 0")
    for i, f in enumerate(s.faults):
        _one_of(f"{src}: fault[{i}].kind", f.kind, FAULT_KINDS)
        if f.duration_ns < FOREVER or f.duration_ns == 0:
            raise ScenarioError(f"{src}: fault[{i}].duration_ns must be > 0, or -1 for forever")
    for i, a in enumerate(s.adversary):
        check_adversary(a, f"{src}: adversary[{i}]")
    if s.adversary and not m.data:  # the adversary attacks contents: it needs data mode, so it turns it on
        s = dataclasses.replace(s, migration=dataclasses.replace(m, data=True))
    return s


def with_adversary(s: Scenario, actions: Sequence[AdversarySpec]) -> Scenario:
    """``s`` with more adversary actions (data mode on)."""
    return _validate(dataclasses.replace(s, adversary=s.adversary + tuple(actions)), "--adversary") if actions else s


def check_adversary(a: AdversarySpec, where: str) -> None:
    """One [[adversary]] entry, checked (ScenarioError naming the entry)."""
    _one_of(f"{where}.kind", a.kind, ADVERSARY_KINDS)
    _one_of(f"{where}.where", a.where, ADVERSARY_WHERE)
    _one_of(f"{where}.host", a.host, ADVERSARY_HOSTS)
    if (a.stream == UNSET) != (a.sequence == UNSET):
        raise ScenarioError(f"{where}: stream and sequence go together (a packet number)")
    if a.stream != UNSET and a.at_ns != UNSET:
        raise ScenarioError(f"{where}: give at_ns or stream + sequence, not both")
    if a.duration_ns < FOREVER or a.duration_ns == 0:
        raise ScenarioError(f"{where}.duration_ns must be > 0, or -1 for forever")
    if a.stream != UNSET and a.kind not in ADVERSARY_PACKET_KINDS:
        raise ScenarioError(f"{where}: {a.kind} happens at a time (at_ns), not at a packet "
                            f"(packets: {', '.join(ADVERSARY_PACKET_KINDS)})")


def _from_table(doc: Mapping[str, Any], src: str, base_dir: str) -> Scenario:
    if depth(doc) > MAX_DEPTH:
        raise ScenarioError(f"{src}: tables or arrays nested deeper than {MAX_DEPTH} levels")
    for key in doc:
        if key not in _TOP_KEYS:
            raise ScenarioError(f"{src}: unknown key or section {short(key, 40)}{hint(key, sorted(_TOP_KEYS))}")
    kwargs: dict[str, Any] = {"base_dir": base_dir}
    for key, default in (("name", ""), ("description", ""), ("seed", 0)):
        if key in doc:
            kwargs[key] = check_key("", key, doc[key], default, f"{src}: {key}")
    for section, cls in _SECTIONS.items():
        if section in doc:
            kwargs[section] = build_section(cls, doc[section], section, src)
    faults = doc.get("fault", [])
    if not isinstance(faults, list):
        raise ScenarioError(f"{src}: 'fault' must be an array of tables ([[fault]])")
    parsed = [build_section(LinkFault, f, "fault", src, f"fault[{i}]") for i, f in enumerate(faults)]
    kwargs["faults"] = tuple(parsed)
    adversary = doc.get("adversary", [])
    if not isinstance(adversary, list):
        raise ScenarioError(f"{src}: 'adversary' must be an array of tables ([[adversary]])")
    kwargs["adversary"] = tuple(build_section(AdversarySpec, a, "adversary", src, f"adversary[{i}]")
                                for i, a in enumerate(adversary))
    kernel = doc.get("kernel")
    if isinstance(kernel, Mapping) and kernel.get("profile", "custom") != "custom":
        _one_of(f"{src}: kernel.profile", kernel["profile"], KERNEL_PROFILES)
        set_caps = sorted(k for k in kernel if k != "profile")
        if set_caps:
            raise ScenarioError(f"{src}: kernel.{set_caps[0]} cannot be set with profile {kernel['profile']!r} "
                                "(the profile fixes every capability; use profile = \"custom\")")
        from ..model.kernel import profile_caps

        kwargs["kernel"] = KernelCaps(profile=kernel["profile"], **profile_caps(kernel["profile"]))
    return _validate(Scenario(**kwargs), src)


def read_input_text(path: str | Path, what: str = "scenario") -> str:
    """The text of a scenario (or sweep) file, or one ScenarioError line: missing, not a regular file
    (never wait on a FIFO), unreadable, not UTF-8."""
    from ..core.paths import require_regular

    path = Path(path)
    if not path.exists() and not str(path).startswith("\x00"):
        raise ScenarioError(f"{path}: no such {what} file")
    require_regular(path, ScenarioError)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read ({short(str(exc), 120)})") from None


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Parse a scenario file, apply ``--set section.key=value`` overrides, validate."""
    path = Path(path)
    return parse_scenario_text(read_input_text(path), str(path), str(path.parent), overrides)


def parse_scenario_text(text: str, src: str = "<scenario>", base_dir: str = ".", overrides: Sequence[str] = ()) -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{src}: invalid TOML ({clip(str(exc), 120)})") from None
    except RecursionError:
        raise ScenarioError(f"{src}: invalid TOML (nested too deeply)") from None
    return scenario_from_doc(doc, src, base_dir, overrides)


def scenario_from_doc(doc: Mapping[str, Any], src: str = "<scenario>", base_dir: str = ".",
                      overrides: Sequence[str] = ()) -> Scenario:
    """A scenario from an already parsed TOML document (a sweep's base), with overrides, validated."""
    return _from_table(apply_overrides(dict(doc), overrides), src, base_dir)


def scenario_to_doc(s: Scenario) -> dict[str, Any]:
    """The document (as ``tomllib`` would parse it) that gives ``s`` back: ``scenario_from_doc(
    scenario_to_doc(s), base_dir=s.base_dir) == s``. With overrides it is how a built scenario takes
    ``--set`` values by the rules a file's do (``replay.api.override``). A named kernel profile stays a
    profile (its capabilities are the profile's)."""
    def table(obj: Any) -> dict[str, Any]:
        return {f.name: (dict(getattr(obj, f.name)) if f.name == "options" else getattr(obj, f.name))
                for f in fields(obj)}

    doc: dict[str, Any] = {"name": s.name, "description": s.description, "seed": s.seed}
    for section in ("guest", "trace", "migration", "costs", "attestation"):
        doc[section] = table(getattr(s, section))
    doc["kernel"] = {"profile": s.kernel.profile} if s.kernel.profile != "custom" else table(s.kernel)
    doc["fault"] = [table(f) for f in s.faults]
    doc["adversary"] = [table(a) for a in s.adversary]
    return doc


def parse_value(text: str) -> Any:
    if text.strip() == "":
        raise ScenarioError("empty value (write \"\" for an empty string)")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string (strategy names, sizes like 4GiB)
    except RecursionError:
        raise ScenarioError("value nested too deeply") from None


def apply_overrides(doc: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` (value in TOML syntax, bare words as strings) to a parsed document."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        where = f"--set {short(item)}"
        if not sep or not key.strip():
            raise ScenarioError(f"{where}: expected section.key=value")
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ScenarioError(f"{where}: empty key name in {short(key.strip())}")
        try:
            parsed = parse_value(value)
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        if len(parts) == 1:
            if parts[0] not in ("name", "description", "seed"):
                raise ScenarioError(f"{where}: unknown key {short(parts[0], 40)}{hint(parts[0], ['name', 'description', 'seed'])}")
            doc[parts[0]] = parsed
            continue
        section, *rest = parts
        if section == "adversary":
            _set_adversary(doc, rest, parsed, where)
            continue
        if section not in _SECTIONS:
            raise ScenarioError(f"{where}: unknown section {short(section, 40)}{hint(section, list(_SECTIONS))}")
        # Only [trace.options] holds free-form tables; every other key is a scalar of its section.
        if len(rest) > 1 and not (section == "trace" and rest[0] == "options" and len(rest) == 2):
            known = [f.name for f in fields(_SECTIONS[section])]
            if rest[0] in known:
                raise ScenarioError(f"{where}: {section}.{rest[0]} is a single value, not a table")
            raise ScenarioError(f"{where}: unknown key {short(rest[0], 40)} in [{section}]{hint(rest[0], known)}")
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ScenarioError(f"{where}: {section} is not a table in the scenario")
        table = doc[section] = dict(table)
        for p in rest[:-1]:
            sub = table.get(p, {})
            if not isinstance(sub, dict):
                raise ScenarioError(f"{where}: {section}.{p} is not a table")
            table[p] = dict(sub)
            table = table[p]
        table[rest[-1]] = parsed
    return doc


def _set_adversary(doc: dict, rest: list[str], value: Any, where: str) -> None:
    """``--set adversary.N.key=value``: a key of the N-th [[adversary]] entry (N = their count: a new one)."""
    entries = doc.get("adversary", [])
    if not isinstance(entries, list):
        raise ScenarioError(f"{where}: adversary is not an array of tables in the scenario")
    if len(rest) != 2 or not rest[0].isdigit():
        raise ScenarioError(f"{where}: expected adversary.N.key=value (N: the entry, from 0)")
    i = int(rest[0])
    if i > len(entries):
        raise ScenarioError(f"{where}: the scenario has {len(entries)} [[adversary]] entries; N must be at most that")
    entries = doc["adversary"] = [dict(e) if isinstance(e, dict) else e for e in entries]
    if i == len(entries):
        entries.append({})
    if not isinstance(entries[i], dict):
        raise ScenarioError(f"{where}: adversary[{i}] is not a table")
    entries[i][rest[1]] = value


def make_scenario(**sections: Mapping[str, Any]) -> Scenario:
    """Build a scenario from plain dicts (tests, library users): ``make_scenario(migration={...})``."""
    return _from_table(dict(sections), "<scenario>", ".")
