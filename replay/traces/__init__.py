"""Layer 3, traces and their sources: the trace format (reading, writing, validating), the synthetic
generators, the recorders (valgrind's lackey, a whole VM under QEMU), the importers and ``inspect``.
Imports ``replay.core`` and ``replay.model``."""
