"""Layer 1, foundations: the exception hierarchy, the validation rules every input passes, units, where
commands may read and write, atomic canonical records, the package's version. Imports nothing else of
``replay``."""
