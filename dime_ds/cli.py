"""What every command-line entry point shares: logging set-up, and a user error (bad config,
missing data or weights) printed as a message (exit 2) rather than a traceback."""
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
        print(err, file=sys.stderr)
        return 2
