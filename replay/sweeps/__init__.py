"""Layer 10, many runs: sweeps over parameter axes on a Dask cluster, their report, and the adversary
matrix. Imports the driver (``replay.migration``) and the analysis below it."""
