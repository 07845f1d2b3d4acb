"""`python -m dime_ds.pipeline stages=<list> [hydra overrides]`: the grounded-corpus stages in one job,
in the order given, on every rank (one process group for them all); `sbatch slurm/match_corpus.sh`
runs it.

    python -m dime_ds.pipeline stages=embed,match data.images=... data.corpus=...
    python -m dime_ds.pipeline stages=curate,embed,match curate.metadata=... curate.t=20000 ...
    python -m dime_ds.pipeline stages=embed,match,curate curate.metadata=... curate.t=20000 ...

stages: curate, embed and match in the order they run, separated by commas or spaces (`[embed,match]`
too). Embed runs before match; `stages=match` alone grounds embeddings already written. Curate runs
first, and then every stage gets match.pool=curated (embed and match read the curated pool), or after
match, and then it gets curate.input=grounded (it balances the grounded corpus; distill then trains
on data.texts=<curate.out_dir>/corpus). Every stage's config is checked before the first one starts."""
from __future__ import annotations

import logging
import re
import sys
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config
from dime_ds.errors import UserError
from dime_ds.jobs import STAGES, entry_main

log = logging.getLogger(__name__)

PIPELINE_STAGES = ("curate", "embed", "match")
KEY = "stages="
CURATED_POOL = "match.pool=curated"  # every stage, when curate runs first
GROUNDED_INPUT = "curate.input=grounded"  # the curate stage, when it runs after match


def parse_stages(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(stage names in order, the other overrides); the order checked."""
    given = [a[len(KEY):] for a in argv if a.startswith(KEY)]
    rest = [a for a in argv if not a.startswith(KEY)]
    usage = f"give the stages once, in the order they run: stages=embed,match (of {', '.join(PIPELINE_STAGES)})"
    if len(given) != 1:
        raise UserError(f"{usage}; got {len(given)} stages= arguments")
    if any(a.startswith("stage=") for a in rest):
        raise UserError(f"stage= runs one stage (python -m dime_ds.match or dime_ds.curate); here {usage}")
    names = [n for n in re.split(r"[\s,]+", given[0].strip().strip("[]")) if n]
    unknown = [n for n in names if n not in PIPELINE_STAGES]
    if not names or unknown:
        raise UserError(f"{usage}; got stages={given[0]!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if len(set(names)) != len(names):
        raise UserError(f"stages={given[0]!r} names a stage twice")
    if "embed" in names and "match" in names and names.index("embed") > names.index("match"):
        raise UserError(f"stages={given[0]!r}: embed runs before match (match grounds the embeddings embed writes)")
    if "curate" in names and names.index("curate") > 0 and "match" not in names[:names.index("curate")]:
        raise UserError(f"stages={given[0]!r}: curate runs first (embed and match then read the curated pool) "
                        "or after match (it then balances the grounded corpus)")
    return names, rest


def stage_argv(names: Sequence[str], overrides: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(stage, the overrides its entry point gets) in order; the user's overrides come last and win."""
    after_match = "curate" in names and "match" in names[:names.index("curate")]
    common = [CURATED_POOL] if "curate" in names and not after_match else []
    steps = []
    for name in names:
        own = [GROUNDED_INPUT] if name == "curate" and after_match else []
        steps.append((name, [*STAGES[name].args, *common, *own, *overrides]))
    return steps


def main(argv: Sequence[str]) -> int:
    names, overrides = parse_stages(argv)
    steps = stage_argv(names, overrides)
    configs = [load_config(args) for _, args in steps]  # every stage's config checked before any runs
    from dime_ds.distributed.stage import stage  # after validation: no heavy import for a bad config

    # one process group for all: a group re-made per stage can race the old one's store
    with stage(configs[0].dist, configs[0].device):
        for i, (name, args) in enumerate(steps, 1):
            log.info("stage %d/%d: %s", i, len(steps), name)
            code = entry_main(name)(args)
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
