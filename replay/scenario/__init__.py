"""Layer 5, what a run is asked to do: scenarios (TOML into frozen dataclasses), the two strategies under
comparison, the command line's adversary grammar. Imports the layers below (core, model, traces)."""
