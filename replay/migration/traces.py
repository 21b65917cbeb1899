"""The trace a scenario replays: a file, or its generator's output cached by spec. (The no-migration
reference digest is ``replay.migration.refdigest``.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..core.version import __version__
from ..core.errors import ScenarioError
from ..core.paths import cache_dir
from ..scenario.spec import Scenario
from ..traces.format import VERSION as TRACE_VERSION, last_t_ns, open_trace


def trace_for(scenario: Scenario, cache: Path | None = None) -> Path:
    """The trace file a scenario replays: its ``trace.file``, or its generator's output (cached by spec)."""
    t = scenario.trace
    if t.file:
        path = Path(scenario.base_dir) / t.file
        if not path.exists():
            raise ScenarioError(f"trace.file {t.file!r}: no such file (looked in {path})")
        return path
    from ..traces.generators import generate  # only scenarios with a generator need it

    seed = scenario.trace_seed
    g = scenario.guest
    spec = {
        "snp_replay": __version__,  # a new version may generate differently: never reuse across versions
        "trace_version": TRACE_VERSION,  # the format (its digest's hash) written: a v2 file is not a v3 one
        "generator": t.generator, "events": t.events, "rate": t.rate, "fill": t.fill, "seed": seed,
        "guest_bytes": g.guest_bytes, "vcpus": g.vcpus, "options": {k: repr(v) for k, v in sorted(t.options.items())},
    }
    key = hashlib.blake2b(repr(sorted(spec.items())).encode(), digest_size=12).hexdigest()
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{t.generator}-{key}.arrow"
    if not path.exists():
        if not g.guest_bytes or not g.vcpus:
            raise ScenarioError("a [trace] generator needs guest.guest_bytes (or guest.size) and guest.vcpus")
        generate(
            t.generator, path, guest_bytes=g.guest_bytes, vcpus=g.vcpus, events=t.events, seed=seed,
            rate=t.rate, fill=t.fill, **dict(t.options),
        )
    return path


def last_event_ns(path: Path) -> int:
    """Guest time of the trace's last event (read from the last non-empty record batch only)."""
    with open_trace(path) as reader:
        return last_t_ns(reader) or 0
