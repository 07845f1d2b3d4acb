"""`make demo`: the embedded default on one CPU machine, nothing downloaded, a few minutes.

1. writes the synthetic world (unpaired images, a head-heavy and mostly non-visual corpus, pairs,
   labelled sets);
2. trains the demo teacher with the CLIP loss on the pairs (or reuses it while its recipe holds)
   and saves it as an OpenCLIP model directory, loaded afterwards like any hub model;
3. embeds images and corpus with the teacher and keeps a grounded corpus (Algorithm 1);
4. distills the teacher into a smaller student with DIME-FM on the unpaired images and the
   grounded corpus (live teacher, augmented images);
5. trains the same student architecture from scratch with the CLIP loss on as many *paired*
   samples, the yardstick;
6. evaluates the three models with `dime_ds.eval` (the students from their checkpoints) and prints
   one table: zero-shot, retrieval and linear probe per set, image-tower parameters, samples/s;
   writes it as demo_results.json and demo_results.png in the DIME-FM run's directory.

The comparisons (curation, balance, CID, views, student families, teacher ensembles) and seeds are
`make study`'s (`python -m dime_ds.demo.study`).

Stopping: SIGTERM or Ctrl-C checkpoints the student in training and ends the demo with status 3;
rerunning it resumes that student, and reuses what finished (the teacher while its recipe holds,
each student while its config does).

Extra arguments are Hydra overrides (e.g. `work_dir=/tmp/demo optim.steps=300 seed=1`).
Those of the training recipe (optim, loss, student, eval, ckpt, teacher, seed) apply to the students
only: the cached teacher keeps its own recipe (`experiment=demo_teacher`), changed with a `pretrain.`
prefix (`pretrain.optim.steps=200`, `pretrain.seed=1`); the rest (work_dir, data, ...) apply to every
stage."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from dime_ds import atomic
from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config
from dime_ds.config.schema import RootConfig
from dime_ds.demo.stopping import user_command
from dime_ds.demo.teacher import ensure_teacher, student_overrides, teacher_dir, teacher_record

log = logging.getLogger("dime_ds.demo")


def models_table(cfg: RootConfig, summaries: dict[str, dict], teacher_speed: float) -> dict:
    """Teacher and students through dime_ds.eval, the students loaded from their runs like any
    user's; printed, and written to <run dir>/eval. A student that did not finish is marked in its
    column's name."""
    import torch

    from dime_ds.demo.comparisons import TEACHER_COLUMN
    from dime_ds.demo.runs import unfinished
    from dime_ds.eval.models import checkpoint_encoders, openclip_encoder
    from dime_ds.eval.report import compare

    device, precision = torch.device("cpu"), cfg.eval.precision
    columns = [openclip_encoder(str(teacher_dir(cfg)), None, precision, device, TEACHER_COLUMN)]
    speeds = [teacher_speed]
    marks = unfinished(summaries)
    for name, summary in summaries.items():
        encoder, _ = checkpoint_encoders(summary["run_dir"], precision, device, with_teacher=False)
        encoder.name = f"{name} ({marks[name]})" if name in marks else name
        encoder.info["image_params"] = summary.get("image_params", 0)
        columns.append(encoder)
        speeds.append(summary.get("samples_per_s", 0))
    extra = [["model", "image params", *[f"{e.info['image_params'] / 1e6:.2f}M" for e in columns]],
             ["model", "train samples/s", *[f"{v:.0f}" for v in speeds]]]
    notes = ["chance: zero-shot 12.5 % (8 classes), retrieval R@1 "
             f"{100 / cfg.data.synthetic.n_eval:.2f} %; linear probe: half of the shape set, L2 swept"]
    return compare(columns, cfg.eval, Path(cfg.run_dir) / "eval", progress=cfg.log.progress,
                   extra_rows=extra, notes=notes)


def report(cfg: RootConfig, results: dict, summaries: dict[str, dict], teacher: dict, trained: dict | None,
           grounding: dict, wall: float) -> None:
    """The lines under the table, demo_results.json and demo_results.png (in the DIME-FM run's directory)."""
    from dime_ds.demo.comparisons import grounding_line, grounding_record
    from dime_ds.demo.summary import bar_chart

    teacher_column, raw_column, baseline_column = results  # the table's columns, marks included
    shape = {c: 100 * results[c]["shape"]["top1"] for c in results}
    print("\n" + grounding_line("raw", grounding))
    print(f"DIME-FM on unpaired data against CLIP from scratch on as many pairs: zero-shot shape top-1 "
          f"{shape[raw_column]:.1f} % vs {shape[baseline_column]:.1f} % (teacher {shape[teacher_column]:.1f} %); "
          f"over seeds: `{user_command('study', 'seeds=3 demo.compare=[]')}`")
    print(f"{cfg.optim.steps} steps x {cfg.optim.global_batch_size} samples for each student; demo wall time "
          f"{wall:.0f} s" + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out, world = Path(cfg.run_dir), cfg.data.synthetic
    speeds = [teacher.get("samples_per_s", 0), *(s.get("samples_per_s", 0) for s in summaries.values())]
    png = bar_chart(out / "demo_results.png", {c: [r] for c, r in results.items()},
                    {c: [v] for c, v in zip(results, speeds)},
                    f"make demo: {cfg.optim.steps} steps x {cfg.optim.global_batch_size} per student",
                    notes=[f"synthetic world: {world.n_images} unpaired images, {world.n_paired} pairs, "
                           f"{world.n_eval} test images a set; chance 12.5 % zero-shot; wall time {wall:.0f} s"])
    atomic.write_json(out / "demo_results.json",
                      {"eval": results, "students": summaries, "grounding": grounding_record(grounding),
                       "teacher_training": trained, "teacher": teacher, "wall_s": wall}, indent=2, default=str)
    print(f"results: {out / 'demo_results.json'} and {png.name}\n"
          f"TensorBoard: tensorboard --logdir {Path(cfg.work_dir) / 'runs'}")


def main(overrides: Sequence[str]) -> int:
    # The stages import torch, DeepSpeed and faiss: after --help and a bad config have been answered.
    from dime_ds.demo.comparisons import BASELINE_COLUMN, RAW_COLUMN, ground
    from dime_ds.demo.runs import Runner
    from dime_ds.demo.stopping import StopGuard, Stopped

    if any(o.lstrip("+~").startswith("demo.compare") for o in overrides):
        raise ConfigError(f"demo.compare: the comparisons run in `{user_command('study')}`, e.g. "
                          f"`{user_command('study', 'seeds=1 demo.compare=[views]')}`; `{user_command('demo')}` "
                          "trains the teacher, the DIME-FM student and the from-scratch one")
    start = time.time()

    def config(experiment: str) -> RootConfig:
        return load_config([f"experiment={experiment}", *student_overrides(overrides)])

    distill_cfg, baseline_cfg = config("demo"), config("demo_baseline")
    command = user_command("demo", " ".join(overrides))
    with StopGuard(command) as guard:
        runner = Runner(guard)
        with guard.training() as late:
            trained = ensure_teacher(overrides, teacher_dir(distill_cfg), rerun=command)
        if late():
            raise Stopped(f"stopped after the teacher finished; rerun `{command}` to go on")
        grounding = ground(distill_cfg)
        summaries = {column: {**runner.train(cfg, column), "run_dir": cfg.run_dir}
                     for column, cfg in ((RAW_COLUMN, distill_cfg), (BASELINE_COLUMN, baseline_cfg))}
        teacher = teacher_record(distill_cfg, trained)
        results = models_table(distill_cfg, summaries, teacher.get("samples_per_s", 0))
        report(distill_cfg, results, summaries, teacher, trained, grounding, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
