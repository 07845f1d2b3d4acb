"""`python -m dime_ds.eval model=<what> [suite=<name>] [overrides]`: evaluate a model on a suite.

    python -m dime_ds.eval model=work/runs/demo suite=synthetic          # student and its teacher
    python -m dime_ds.eval model=exported/vitb32 eval.teacher=ViT-L-14 eval.teacher_pretrained=openai \\
        suite=elevater eval.root=/datasets/elevater
    python -m dime_ds.eval model=ViT-B-32 pretrained=openai suite=imagenet_robustness eval.root=/datasets

`model=`, `pretrained=` and `suite=` are short for `eval.model=`, `eval.pretrained=` and the `eval=`
config group; `suite=/path/suite.yaml` reads a suite file of your own, and
`+eval.datasets.NAME.path=DIR [+eval.datasets.NAME.task=retrieval]` adds a dataset of your own.
A dime_ds run/checkpoint is shown beside its own teacher (`eval.teacher=auto`);
`eval.teacher=none` leaves it out. On several ranks (torchrun, srun, the launcher) every rank
extracts a share of the features; rank 0 prints the table and writes <suite>.json and <suite>.md."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, config_dir, load_config
from dime_ds.config.schema import RootConfig
from dime_ds.jobs import config_overrides

log = logging.getLogger("dime_ds.eval")


def default_out_dir(cfg: RootConfig) -> Path:
    model = Path(cfg.eval.model).expanduser()
    if (model / "config.yaml").is_file():  # a dime_ds run directory keeps its own evaluations
        return model / "eval"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(cfg.eval.model)).strip("_")[-80:]
    return Path(cfg.work_dir) / "eval" / slug


def main(overrides: Sequence[str]) -> int:
    cfg = load_config(config_overrides("eval", overrides))  # model=, pretrained=: dime_ds/jobs.py
    if not cfg.eval.datasets:
        suites = "|".join(sorted(p.stem for p in (config_dir() / "eval").glob("*.yaml") if p.stem != "none"))
        raise ConfigError(f"no evaluation datasets: pick a suite (suite={suites}, or suite=/path/my_suite.yaml) "
                          "or add your own with +eval.datasets.NAME.path=DIR")
    from dime_ds.distributed.stage import stage  # after validation: no heavy import for a bad config
    from dime_ds.eval.models import load_encoders
    from dime_ds.eval.report import compare

    with stage(cfg.dist, cfg.device) as ctx:
        encoders = load_encoders(cfg.eval, ctx.device)
        out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else default_out_dir(cfg)
        results = compare(encoders, cfg.eval, out_dir, progress=cfg.log.progress)
    failed = any("error" in m for per in results.values() for m in per.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
