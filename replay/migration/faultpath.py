"""The post-copy fault path as queues: each remote fault goes through FIFO stages that other faults and
the background push also use, so a fault's latency is what is actually ahead of it, not a constant.

Stages of one fault on gfn raised by a vCPU at virtual time t (all on the virtual clock):

1. exit: the vCPU leaves the guest (KVM userfault exit, or the uffd wake-up), ``postcopy_fault_exit_ns``;
2. request: one latency (plus its jitter, ``migration.latency_jitter``) + the request's bytes on the return
   path (uncontended);
3. packaging at the source: the earliest free source agent (private pages: a VMGEXIT to fetch the request
   and hand back the page, the mirror VM's first-touch NPF, packaging or a zero page's check) or the source
   host's migration thread (shared pages). An agent runs at its share of the CPUs the design gives its
   agents (the mirror VM's ``host_cpus``; shadow vCPUs: the quota, the guest being stopped at the
   source); when the push keeps the agents busy (it is agent-bound), a request also waits for the page an
   agent is packaging;
4. the reply on the link: without ``postcopy_preempt`` it shares the push's channel and first waits for
   what the push has in flight at that moment: a full ``postcopy_queue_bytes`` window when the link is the
   push's bottleneck, one packet when the agents are (the link then drains faster than they fill it),
   never more than the push still has to send (zero pages as headers), nothing once the push is done;
   replies then go one after another; with preempt they have a channel of their own. A zero page is a
   header. Then one latency plus its jitter;
5. unpacking at the target: the earliest free target agent (its first-touch NPF for the mirror VM,
   unpack, PVALIDATE, RMPADJUST), at its share of the CPUs: with shadow vCPUs, a share of the guest's
   quota beside the vCPUs that are busy then (replay.model.demand), as in the push;
6. installing: serialized. ``fault_delivery = "uffd-shared"``: one handler thread for every vCPU holds
   (install + uffd_handler_ns + per_waiter_sq x w^2: each wake-up of the shared queue wakes the w blocked
   vCPUs, which retry under the same contended lock); ``"kvm-exit"`` and ``"uffd-per-vcpu"``: the install
   path's lock is held (install + fault_lock_ns + per_waiter x w), w being the vCPUs blocked at that
   moment. The install is ``page_install``: write() into guest_memfd, UFFDIO_COPY or UFFDIO_CONTINUE, plus
   the target's RMPUPDATE for a private page.

Faults are examined in trace order, which is not always time order (a vCPU delayed by earlier faults
raises its next one later than the trace says). So every stage is a timeline of booked intervals, not a
single "free at" time: a fault takes the earliest gap that fits at or after its arrival. Each vCPU has at
most one fault outstanding, so at every stage at most vCPUs - 1 other faults can be ahead of one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ..model.snp import PAGE_SIZE
from ..scenario.strategies import SOURCE, TARGET
from .context import Run

JITTER_STREAM = 0x6A17  # the latency jitter's own random stream, derived from the scenario's seed


@dataclass(frozen=True)
class Served:
    done_ns: int  # the page is usable (virtual time)
    reply_bytes: int  # bytes on the link (request + header + page unless zero)
    pack_ns: int  # source agent CPU
    unpack_ns: int  # target agent CPU (unpack, PVALIDATE, RMPADJUST)
    host_ns: int  # host CPU (source thread for shared pages, the install's serialized section)
    arrive_ns: int = 0  # the reply's last byte reaches the target (virtual time)
    sent_ns: int = 0  # the reply's first byte goes on the link (virtual time): when the host can touch it


class Timeline:
    """Booked intervals of ``servers`` identical servers (agents, a channel, a lock)."""

    def __init__(self, servers: int = 1):
        self.busy: list[list[tuple[int, int]]] = [[] for _ in range(servers)]

    def book(self, t: int, dur: int) -> int:
        """The earliest start >= t of a free gap of ``dur`` on any server; books it and returns its end."""
        best = None
        for k, iv in enumerate(self.busy):
            start = t
            i = bisect.bisect_right(iv, (start, 1 << 62)) - 1
            if i >= 0 and iv[i][1] > start:
                start = iv[i][1]
            i += 1
            while i < len(iv) and iv[i][0] < start + dur:
                start = max(start, iv[i][1])
                i += 1
            if best is None or start < best[0]:
                best = (start, k)
        start, k = best
        bisect.insort(self.busy[k], (start, start + dur))
        return start + dur

    def prune(self, before: int) -> None:
        """Forget intervals that end before ``before`` (no future booking can start earlier)."""
        for k, iv in enumerate(self.busy):
            i = bisect.bisect_left(iv, (before, -1))
            while i > 0 and iv[i - 1][1] > before:
                i -= 1
            if i:
                self.busy[k] = iv[i:]


class FaultPath:
    def __init__(self, run: Run):
        self.run = run
        self.c = run.s.costs
        self.m = run.s.migration
        self.link = run.link
        a = max(1, run.agents)
        self.agents = a
        self.src_agents = Timeline(a)
        self.dst_agents = Timeline(a)
        self.src_host = Timeline()
        self.reply = Timeline()
        self.install = Timeline()
        # Each vCPU's blocked intervals (starts, ends): faults are served in trace order, not in time order,
        # so a vCPU's later interval can be booked before another vCPU's install that falls in an earlier one.
        # One vCPU's intervals come in time order and never overlap (its next row waits for the page), so
        # the one that can hold a moment is the last to start at or before it: a bisection.
        self.busy: list[tuple[list[int], list[int]]] = [([], []) for _ in range(run.vcpus)]
        self.horizon = 0  # the latest prune: no install is booked before it
        self.mirror = run.strategy.agents_on_host_cpus
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run.s.seed, JITTER_STREAM])))

    def jitter_ns(self) -> int:
        """One crossing's extra latency (``migration.latency_jitter``), from the seeded stream."""
        j, kind = self.m.latency_jitter_ns, self.m.latency_jitter
        if kind == "none" or not j:
            return 0
        u = int(self._rng.bit_generator.random_raw())
        if kind == "uniform":
            return u % (j + 1)
        # Exponential by inversion: -ln(U) with U in (0, 1] from 53 bits; float only inside one draw, the
        # result truncated to whole ns.
        return int(-j * np.log(((u >> 11) + 1) / float(1 << 53)))

    def agent_ns(self, cpu_ns: int, side: int, g: int) -> int:
        """Time one agent on ``side`` takes for ``cpu_ns``: its share of what the design gives the agents
        (the guest runs on the target; at trace time ``g`` for its demand there)."""
        num, den = self.run.cpu.agent_capacity(self.agents, side, TARGET, g)
        return -(-cpu_ns * den * self.agents // num)

    def install_ns(self, private: bool) -> int:
        c = self.c
        base = {"gmem-write": c.install_gmem_write_ns, "uffd-copy": c.install_uffd_copy_ns,
                "uffd-continue": c.install_uffd_continue_ns}[self.m.page_install]
        return base + (c.rmpupdate_ns if private else 0)

    def hold_ns(self, private: bool, waiters: int) -> int:
        """The serialized install section with ``waiters`` vCPUs blocked."""
        c, w = self.c, waiters
        if self.m.fault_delivery == "uffd-shared":
            return self.install_ns(private) + c.uffd_handler_ns + c.uffd_handler_per_waiter_sq_ns * w * w
        return self.install_ns(private) + c.fault_lock_ns + c.fault_lock_per_waiter_ns * w

    def waiters(self, vcpu: int, t: int) -> int:
        n = 1
        for i, (starts, ends) in enumerate(self.busy):
            k = bisect.bisect_right(starts, t) - 1
            n += i != vcpu and k >= 0 and t < ends[k]
        return n

    def serve(self, vcpu: int, gfn: int, t: int, private: bool, zero: bool, queued_ahead_bytes: int, g: int,
              agents_busy_ns: tuple[int, int] = (0, 0)) -> Served:
        """Take a fault on ``gfn`` raised at virtual time ``t`` (trace time ``g``) through every stage;
        ``queued_ahead_bytes``: what the push has on the link ahead of a reply now (0 once the push is done,
        or with preempt); ``agents_busy_ns``: the wait for the page each side's agent is packaging for an
        agent-bound push (0 otherwise)."""
        c, link, eng = self.c, self.link, self.run.eng
        t += c.postcopy_fault_exit_ns
        t += link.latency_ns + self.jitter_ns() + link.wire_ns(c.postcopy_request_bytes)
        pack = unpack = host = 0
        if private:
            pack = (c.zero_page_ns if zero else self.run.page_ns[0]) + c.vmgexit_ns
            if self.mirror and eng.first_touch(SOURCE, gfn):
                pack += c.mirror_npf_ns
            t = self.src_agents.book(t + agents_busy_ns[0], self.agent_ns(pack, SOURCE, g))
        else:
            host = c.host_page_ns
            t = self.src_host.book(t, host)
        page_bytes = c.page_header_bytes + (0 if zero else PAGE_SIZE)
        ahead = 0 if self.m.postcopy_preempt else queued_ahead_bytes
        # The push data in flight on the channel drains first; replies then go one after another (the
        # sender serves queued requests before its next push page).
        t = self.reply.book(t + link.wire_ns(ahead), link.wire_ns(page_bytes))
        sent = t - link.wire_ns(page_bytes)
        t += link.latency_ns + self.jitter_ns()
        arrive = t
        if private:
            unpack = self.run.target_page_ns
            if self.mirror and eng.first_touch(TARGET, gfn):
                unpack += c.mirror_npf_ns
            t = self.dst_agents.book(t + agents_busy_ns[1], self.agent_ns(unpack, TARGET, g))
        hold = self.hold_ns(private, self.waiters(vcpu, t))
        t = self.install.book(t, hold)
        return Served(t, c.postcopy_request_bytes + page_bytes, pack, unpack, host + hold, arrive, sent)

    def prune(self, before: int) -> None:
        for tl in (self.src_agents, self.dst_agents, self.src_host, self.reply, self.install):
            tl.prune(before)
        self.horizon = before

    def block(self, vcpu: int, start: int, end: int) -> None:
        starts, ends = self.busy[vcpu]
        k = bisect.bisect_right(starts, start)
        starts.insert(k, start)
        ends.insert(k, end)
        # No install comes before the horizon (the fault being served): an interval over by then holds nobody.
        # They are dropped in batches, as a drop moves the whole list.
        over = bisect.bisect_right(ends, self.horizon)
        if over > 64:
            del starts[:over], ends[:over]
