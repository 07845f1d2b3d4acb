"""What every command-line entry point shares: logging set-up, and a user error (bad config,
missing data or weights) printed as a message (exit 2) rather than a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from dime_ds.errors import UserError
from dime_ds.log.setup import setup_logging


def run_entry(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    setup_logging()
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        print(err, file=sys.stderr)
        return 2
