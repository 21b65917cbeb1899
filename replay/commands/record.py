"""`replay record --out FILE [options] -- CMD [ARGS...]`: record a real program with valgrind's lackey.

The program's stdin, stdout and stderr are this command's (lackey's log travels on a private pipe), so
`replay record --out t.arrow -- gzip -c f > f.gz` works; the summary line goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

from ..core.errors import UsageError
from ..core.units import format_bytes


def configure(p) -> None:
    p.add_argument("--out", required=True, metavar="FILE", help="trace file to write (appears atomically)")
    p.add_argument("--vcpus-from", choices=("threads", "single"), default="threads",
                   help="threads: valgrind thread N becomes vCPU N-1 (default); single: everything on vCPU 0")
    p.add_argument("--rate-ns-per-instr", type=int, default=1, metavar="N",
                   help="guest ns per executed instruction (t_ns = N x instructions before the access; default 1)")
    p.add_argument("--no-reads", action="store_true", help="drop loads (L lines); keep only writes")
    p.add_argument("--guest-size", metavar="SIZE",
                   help="guest memory size (e.g. 64MiB); default: what the program touched, rounded up to 2 MiB")
    p.add_argument("--region-size", default="1MiB", metavar="SIZE",
                   help="granularity of the virtual->guest-physical layout (power of two, 4KiB..1GiB; default 1MiB)")
    p.add_argument("--clean-env", action="store_true",
                   help="run the program with a fixed minimal environment (PATH, LC_ALL=C, TZ=UTC) so that the "
                        "trace does not depend on the calling shell's environment (it shifts stack addresses)")
    p.add_argument("--valgrind", default="valgrind", metavar="PATH", help="valgrind executable (default: from PATH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    from . import record_vm  # --vm and its options (replay.traces.vm)

    record_vm.configure(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the program to record")


def run(args) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("record: no command given (usage: replay record --out FILE -- CMD [ARGS...])")
    if args.vm:
        from . import record_vm

        return record_vm.run(args, cmd)
    from ..api import record

    result = record(args.out, cmd, ns_per_instr=args.rate_ns_per_instr, reads=not args.no_reads,
                    vcpus_from=args.vcpus_from,
                    guest_size=args.guest_size, region_size=args.region_size, valgrind=args.valgrind,
                    clean_env=args.clean_env, progress=not args.no_progress)
    meta, stats = result.meta, result.stats
    skipped = sum(stats["skipped"].values())
    print(
        f"recorded {meta.path}: {meta.events} events ({stats['stores'] + stats['modifies']} writes, "
        f"{stats['loads'] if not args.no_reads else 0} reads), {stats['instructions']} instructions, "
        f"{meta.vcpus} vcpu(s), guest {format_bytes(meta.guest_bytes)} in {result.mapping['regions']} region(s), "
        f"{skipped} odd line(s) skipped, digest {meta.digest}",
        file=sys.stderr,
    )
    if stats["processes"] > 1:
        print(f"replay record: warning: {stats['processes']} processes wrote to the lackey log (the program forked); "
              "their accesses are interleaved in one address space", file=sys.stderr)
    return 0
