"""What every command-line entry point shares: logging set-up, and a user error (bad config, missing
data or weights) printed as a message (exit 2, or the error's own `exit_status`) rather than a
traceback; and the `dime-ds` console script, one subcommand per entry point.

In a job of several ranks, an error every rank raised alike carries `agreed_rank` (the rank's number;
distributed/stage.py and distributed/watchdog.py set it): rank 0 prints it (a traceback when it is
not the user's), the others only exit with the same status, so the job's log holds it once."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from dime_ds.errors import UserError
from dime_ds.log.setup import setup_logging

HELP_FLAGS = ("-h", "--help")


def run_entry(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None,
              usage: str | None = None) -> int:
    """`usage`: the help text of an entry point whose arguments are Hydra overrides (argparse entry
    points print their own), shown for -h/--help instead of a grammar error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if usage and any(a in HELP_FLAGS for a in argv):
        print(usage.strip() + "\n\nArguments are Hydra overrides (key=value); groups and keys: configs/ and "
              "dime_ds/config/schema.py.")
        return 0
    setup_logging()
    try:
        return main(argv)
    except UserError as err:
        if not getattr(err, "agreed_rank", 0):
            print(err, file=sys.stderr)
        return getattr(err, "exit_status", 2)
    except Exception as err:
        if getattr(err, "agreed_rank", 0):
            return 1  # the status of the traceback rank 0 shows
        raise


# `dime-ds <command>` -> the module whose `main` it runs, and whether that main takes Hydra overrides
# (then the module's docstring is its --help; the others parse their own flags).
COMMANDS: dict[str, tuple[str, bool]] = {
    "distill": ("dime_ds.distill", True),
    "curate": ("dime_ds.curate.__main__", True),
    "match": ("dime_ds.match.__main__", True),
    "eval": ("dime_ds.eval.__main__", True),
    "export": ("dime_ds.export", False),
    "pipeline": ("dime_ds.pipeline", True),
    "launch": ("dime_ds.launch", False),
    "demo": ("dime_ds.demo.__main__", True),
    "synthetic": ("dime_ds.demo.synthetic", False),
}


def console(argv: Sequence[str] | None = None) -> int:
    """The `dime-ds` console script: `dime-ds distill experiment=demo` runs what
    `python -m dime_ds.distill experiment=demo` runs."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command not in COMMANDS:
        asked = command is None or command in HELP_FLAGS
        listing = "\n".join(f"  {name:<10} python -m {module.removesuffix('.__main__')}"
                            for name, (module, _) in COMMANDS.items())
        print(("" if asked else f"dime-ds: unknown command {command!r}\n")
              + f"usage: dime-ds <command> [arguments]; `dime-ds <command> --help` for each\n{listing}",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module_name, hydra_style = COMMANDS[command]
    module = importlib.import_module(module_name)
    return run_entry(module.main, argv[1:], usage=module.__doc__ if hydra_style else None)
