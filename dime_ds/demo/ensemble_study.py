"""The teacher-ensemble study, now `make study` with the ensemble comparison alone:

    python -m dime_ds.demo.ensemble_study [seeds=3] [overrides]
    = python -m dime_ds.demo.study demo.compare=[ensemble] [seeds=3] [overrides]

Students distilled from teacher A (the demo teacher), from teacher B (its recipe from seed 1) and
from A+B, beside the from-scratch yardstick, over `seeds=N` student seeds; results in
<work_dir>/study/ (study.md, study.json, study.png)."""
from __future__ import annotations

import sys
from typing import Sequence

from dime_ds.cli import run_entry


def main(argv: Sequence[str]) -> int:
    from dime_ds.demo import study

    return study.main(["demo.compare=[ensemble]", *argv])


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
