"""The tool's version, in a module of its own: run records, cache keys and ``replay --version`` name it,
and they import it from here (the bottom of the import graph) rather than from the package's
``__init__``, which re-exports the public API above everything else."""

__version__ = "0.1.0"
