"""The teacher-ensemble study on the synthetic world: students distilled from teacher A (the demo
teacher), from teacher B (its recipe from seed 1) and from A+B (experiment=demo_ensemble), each over
`seeds=N` student seeds (default 3), on A's grounded corpus and the demo's schedule; every model
through the synthetic eval suite; a table of mean ± sd per cell (teachers: one value) and its JSON.

    python -m dime_ds.demo.ensemble_study [seeds=3] [Hydra overrides of the students, as for the demo]

Teachers are trained first unless current (recipe-cached, as `make demo` does); results go to
<work_dir>/study/ensemble.{json,md}."""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config
from dime_ds.demo.teacher import ensure_teacher, student_overrides, teacher_dir

log = logging.getLogger("dime_ds.demo")
STUDENTS = (("from A", "demo"), ("from B", "demo_from_b"), ("from A+B", "demo_ensemble"))
METRICS = (("shape zero-shot top-1", "shape", "top1"), ("colour zero-shot top-1", "colour", "top1"),
           ("captions image->text R@1", "captions", "image_to_text_R@1"),
           ("captions text->image R@1", "captions", "text_to_image_R@1"),
           ("shape linear probe top-1", "shape_probe", "top1"))


def _cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    return f"{pct[0]:.1f}" if len(pct) == 1 else f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def main(argv: Sequence[str]) -> int:
    import torch

    from dime_ds.demo.comparisons import ground
    from dime_ds.eval.models import checkpoint_encoders, openclip_encoder
    from dime_ds.eval.suite import evaluate_suite
    from dime_ds.log.table import format_table
    from dime_ds.training import run_training

    seeds = [a for a in argv if a.startswith("seeds=")]
    overrides = [a for a in argv if not a.startswith("seeds=")]
    n = int(seeds[-1].split("=", 1)[1]) if seeds else 3
    if n < 1:
        raise ConfigError(f"seeds={n}: at least one seed")
    start = time.time()
    cfgs = {exp: load_config([f"experiment={exp}", *student_overrides(overrides)]) for _, exp in STUDENTS}
    ensure_teacher(overrides, teacher_dir(cfgs["demo"]))
    ensure_teacher(overrides, teacher_dir(cfgs["demo_from_b"]), "demo_teacher_b")
    ground(cfgs["demo"])
    device, eval_cfg = torch.device("cpu"), cfgs["demo"].eval
    results: dict[str, list[dict]] = {}
    for name, cfg in (("teacher A", cfgs["demo"]), ("teacher B", cfgs["demo_from_b"])):
        encoder = openclip_encoder(str(teacher_dir(cfg)), None, eval_cfg.precision, device, name)
        results[name] = [evaluate_suite(encoder, eval_cfg, progress=False)]
    speeds: dict[str, list[float]] = {}
    for seed in range(n):
        for name, exp in STUDENTS:
            cfg = load_config([f"experiment={exp}", *student_overrides(overrides), f"seed={seed}",
                               f"name=study_ensemble_{exp}_seed{seed}"])
            summary = run_training(cfg)
            if summary["status"] != "completed":
                raise RuntimeError(f"{cfg.name} stopped at step {summary['step']}: rerun the study")
            encoder, _ = checkpoint_encoders(cfg.run_dir, eval_cfg.precision, device, with_teacher=False)
            results.setdefault(name, []).append(evaluate_suite(encoder, eval_cfg, progress=False))
            speeds.setdefault(name, []).append(summary.get("samples_per_s", 0))
            log.info("seed %d, %s: shape %.1f %%", seed, name, 100 * results[name][-1]["shape"]["top1"])
    columns = list(results)
    table = format_table(["metric (%)", *columns],
                         [[label, *[_cell([r[ds][key] for r in results[c]]) for c in columns]]
                          for label, ds, key in METRICS])
    head = (f"Teacher ensemble study: students over seeds 0-{n - 1} (mean ± sd), teachers once; "
            f"{cfgs['demo'].optim.steps} steps x {cfgs['demo'].optim.global_batch_size} samples, A's grounded corpus")
    print(f"\n{head}\n{table}\nwall time {time.time() - start:.0f} s")
    out = Path(cfgs["demo"].work_dir) / "study"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble.md").write_text(f"{head}\n\n{table}\n")
    (out / "ensemble.json").write_text(json.dumps({"seeds": n, "results": results, "samples_per_s": speeds,
                                                   "wall_s": time.time() - start}, indent=2, default=str))
    print(f"results: {out / 'ensemble.json'} (and ensemble.md)")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
