"""Console logging: dime_ds at INFO, libraries (open_clip, deepspeed) at WARNING, so the user sees
our progress rather than every library's internals."""
from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("dime_ds").setLevel(level)
