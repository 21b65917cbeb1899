"""``replay gen KIND``: write a synthetic workload trace (see replay.traces.generators for the kinds)."""

from __future__ import annotations

import argparse
import difflib
import sys
from fractions import Fraction

from ..core.errors import UsageError
from ..core.units import parse_duration_ns, parse_size

KIND_OPTIONS = {
    # flag: (keyword, parser, help, kinds)
    "--len": ("len", "size", "uniform: bytes per access, byte-granular gpa; spans may cross pages", ("uniform",)),
    "--hot-bytes": ("hot_bytes", "size", "hotcold: size of the hot set (default min(64MiB, guest/8))", ("hotcold",)),
    "--hot-fraction": ("hot_fraction_ppm", "ppm", "hotcold: hot set as a fraction of memory (0.1 or 10%%)", ("hotcold",)),
    "--hot-probability": ("hot_probability_ppm", "ppm", "hotcold: fraction of accesses to the hot set (default 0.8)", ("hotcold",)),
    "--zipf": ("zipf_ppm", "ppm", "hotcold: zipf law over pages with exponent S (e.g. 1.2) instead of a hot set", ("hotcold",)),
    "--start": ("start", "size", "ab: first byte of the range (default 1MiB)", ("ab",)),
    "--end": ("end", "size", "ab: end of the range, exclusive (default 100MiB, clipped to the guest)", ("ab",)),
    "--phases": ("phases", "int", "phased: number of phases (default 4)", ("phased",)),
    "--window": ("window_bytes", "size", "phased: working-set size of each phase (default guest/(2*phases))", ("phased",)),
    "--shared": ("shared_bytes", "size", "psc: initially shared memory [0, SIZE) (default 1MiB)", ("psc",)),
    "--burst-every": ("burst_every", "int", "psc: writes between conversion bursts (default 4096)", ("psc",)),
    "--burst-pages": ("burst_pages", "int", "psc: window of pages a burst converts (default 64)", ("psc",)),
    "--read-fraction": ("read_ppm", "ppm", "fraction of accesses that are READs (default 0)", None),
    "--access-bytes": ("access_bytes", "size", "bytes per access, power of two <= 4096 (default 8; stress 4096; ab 1)", None),
    "--utilization": ("utilization_ppm", "ppm", "fraction of the time the vCPUs run, e.g. 0.3 (default 1: always); "
                      "they halt for the rest of each --period", None),
    "--period": ("period_ns", "duration", "run/idle cycle of --utilization, e.g. 10ms (default)", None),
}


def parse_ppm(text: str, what: str) -> int:
    """Millionths from ``0.25``, ``25%`` or ``1.2`` (exact decimal arithmetic, no floats)."""
    s = str(text).strip()
    scale = Fraction(1)
    if s.endswith("%"):
        s, scale = s[:-1], Fraction(1, 100)
    try:
        v = Fraction(s) * scale * 1_000_000
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{what}: cannot parse {text!r} (use a decimal like 0.25 or a percentage like 25%)") from None
    if v.denominator != 1 or v < 0:
        raise UsageError(f"{what}: {text!r} must be a non-negative multiple of 0.000001")
    return int(v)


def _int(text: str, what: str) -> int:
    v = parse_size(text, what)  # accepts 100M, 1G: decimal multiples
    return v


def configure(parser: argparse.ArgumentParser) -> None:
    from ..traces.generators import GENERATORS

    parser.add_argument("kind", metavar="KIND", help="workload: " + ", ".join(GENERATORS))
    parser.add_argument("--out", required=True, help="trace file to write (.arrow)")
    parser.add_argument("--guest-size", required=True, help="guest memory, e.g. 4GiB")
    parser.add_argument("--vcpus", required=True, help="number of guest vCPUs")
    parser.add_argument("--events", required=True, help="accesses to generate, e.g. 100M (not counting --fill)")
    parser.add_argument("--seed", required=True, help="random seed (non-negative integer)")
    parser.add_argument("--rate", default=None, help="accesses per guest second (default 10M)")
    parser.add_argument("--fill", action="store_true", help="first write every page once, in address order (extra events)")
    parser.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    group = parser.add_argument_group("workload options")
    for flag, (dest, _, help_text, _kinds) in KIND_OPTIONS.items():
        group.add_argument(flag, dest=dest, default=None, help=help_text)
    # argparse 3.11 does not suggest near misses, and leftovers are reported by the top-level parser:
    # catch them here, where the workload options are known, and name the closest option.
    base_parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = base_parse(args, namespace)
        if extras:
            known = [a for act in parser._actions for a in act.option_strings]
            flag = extras[0].split("=")[0]
            close = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"replay gen: unrecognized arguments: {' '.join(extras)}{hint}")
        return ns, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from ..api import generate
    from ..traces.generators import GENERATORS
    from ..core.paths import check_output
    from ..core.units import format_bytes

    kind = args.kind
    check_output(args.out, [])
    if kind not in GENERATORS:
        close = difflib.get_close_matches(kind, list(GENERATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"gen: unknown workload {kind!r}{hint}; known: {', '.join(GENERATORS)}")
    opts = {}
    for flag, (dest, kind_of, _, kinds) in KIND_OPTIONS.items():
        text = getattr(args, dest)
        if text is None:
            continue
        if kinds is not None and kind not in kinds:
            raise UsageError(f"gen {kind}: {flag} applies only to {', '.join(kinds)}")
        if kind_of == "ppm":
            opts[dest] = parse_ppm(text, flag)
        elif kind_of == "size":
            opts[dest] = parse_size(text, flag)
        elif kind_of == "duration":
            opts[dest] = parse_duration_ns(text, flag)
        else:
            opts[dest] = _int(text, flag)
    guest = parse_size(args.guest_size, "--guest-size")
    events = _int(args.events, "--events")
    vcpus = _int(args.vcpus, "--vcpus")
    seed = _int(args.seed, "--seed")
    rate = None if args.rate is None else _int(args.rate, "--rate")
    total = events + (guest // 4096 if args.fill else 0)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="ev", unit_scale=True, desc=f"gen {kind}", file=sys.stderr)
    try:
        meta = generate(kind, args.out, guest_size=guest, vcpus=vcpus, events=events, seed=seed, rate=rate,
                        fill=args.fill, compression=None if args.compression == "none" else "zstd",
                        progress=bar.update if bar is not None else None, **opts)
    finally:
        if bar is not None:
            bar.close()
    print(f"{meta.events} events, {format_bytes(meta.guest_bytes)} guest, {meta.vcpus} vcpus, digest {meta.digest}, wrote {meta.path}")
    return 0
