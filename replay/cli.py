"""The ``replay`` command line: a thin layer over the library.

``main(argv) -> int`` parses arguments, calls one command module in ``replay.commands`` and maps
exceptions to exit codes in exactly one place. Command modules are imported lazily, so ``replay inspect``
does not pay for importing the migration driver. Each command module provides ``configure(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .core.version import __version__
from .core.errors import ExitCode, ReplayError, UsageError, one_line
from .core.validate import clip, short

# name -> (module, one-line help). Order is the order of `replay --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "gen": ("replay.commands.gen", "generate a synthetic workload trace"),
    "inspect": ("replay.commands.inspect", "show a trace's metadata, op counts, write rate and working set"),
    "record": ("replay.commands.record", "record a real program into a trace (valgrind lackey)"),
    "import": ("replay.commands.importcmd", "convert CSV/Parquet accesses or a dirty-page log into a trace"),
    "run": ("replay.commands.run", "replay a scenario under one migration strategy into a run directory "
            "(exit 0 completed, 1 aborted/cancelled/failed, 2 bad input)"),
    "compare": ("replay.commands.compare", "run a scenario under mirror-vm and shadow-vcpu and compare "
                "(exit 0 both completed, 1 one did not, 2 bad input)"),
    "sweep": ("replay.commands.sweep", "run a sweep (base scenario x axes) on a Dask cluster into a Parquet table"),
    "diff": ("replay.commands.diff", "compare two run directories (exit 0 same end state, 1 different, 2 bad input)"),
    "report": ("replay.commands.report", "write a self-contained HTML report of one or more runs"),
    "adversary-matrix": ("replay.commands.adversary_matrix", "run every adversary kind against both strategies and "
                         "the modes; one Arrow table and an HTML page (exit 0 no corrupted run, 1 some, 2 bad input)"),
    "verify": ("replay.commands.verify", "check a trace or a run directory completely (structure, order, digests)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a one-line UsageError instead of usage text and exit(2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {clip(one_line(Exception(message)))}")


def build_parser(selected: str | None) -> ArgumentParser:
    parser = ArgumentParser(prog="replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"snp-replay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .core.procmem import limit_reservations

    limit_reservations()  # before pyarrow allocates: workers then fit an address-space limit (ulimit -v)
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    selected = selected if selected in COMMANDS else None
    try:
        args, extra = build_parser(selected).parse_known_args(argv)
        if extra:  # named by the command they were given to (argparse would name only "replay")
            where = f"replay {args.command}" if args.command else "replay"
            raise UsageError(f"{where}: unrecognized arguments: {clip(' '.join(extra))}")
        if args.command is None:
            raise UsageError(f"no command given (one of {', '.join(COMMANDS)}; replay --help explains them)")
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args))
    except ReplayError as exc:
        print(f"replay: error: {one_line(exc)}", file=sys.stderr)
        return int(exc.exit_code)
    except ModuleNotFoundError as exc:
        if not _missing_dependency(exc):
            return _internal_error(exc)
        # A checkout run without its dependencies (or without the built engine): say what to install.
        print(f"replay: error: {exc.name} is not installed (pip install . in the project)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("replay: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return ExitCode.OK
    except OSError as exc:
        # Missing files, permissions, a full disk: the user's environment, reported in one line.
        where = f" {short(exc.filename)}" if getattr(exc, "filename", None) else ""
        print(f"replay: error:{where} {exc.strerror or clip(one_line(exc))}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except MemoryError:
        # Estimates (replay.core.validate.check_memory) refuse what cannot fit before allocating; this is the
        # machine running out anyway (other processes, --allow-memory).
        print("replay: error: out of memory (the machine could not provide what this command needed)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except RecursionError:
        print("replay: error: input nested too deeply", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except Exception as exc:  # the last line of defence: a bug, reported in one line
        return _internal_error(exc)


def _missing_dependency(exc: ModuleNotFoundError) -> bool:
    """A module that is not there: a dependency, or one of the project's compiled extensions (not built).
    Any other module of the project missing is a bug in an import, not an installation problem."""
    name = exc.name or ""
    return bool(name) and (name.split(".")[0] != "replay" or name.split(".")[-1].startswith("_"))


def _internal_error(exc: Exception) -> int:
    if os.environ.get("SNP_REPLAY_TRACEBACK"):
        raise exc
    print(f"replay: internal error: {type(exc).__name__}: {clip(one_line(exc))} (a bug in snp-replay; "
          "SNP_REPLAY_TRACEBACK=1 shows where)", file=sys.stderr)
    return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
