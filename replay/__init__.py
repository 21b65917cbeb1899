"""snp-replay: deterministic record/replay of guest memory-write traces through SEV-SNP live migration.

The library API lives in the submodules (``replay.trace``, ``replay.scenario``, ``replay.migrate``,
``replay.diff``...); ``replay.cli`` is a thin command line over them.
"""

__version__ = "0.1.0"
