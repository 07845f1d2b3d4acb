"""`make demo`: the embedded default on one CPU machine, nothing downloaded.

1. writes the synthetic world (unpaired images with planted near-duplicates, a head-heavy and mostly
   non-visual corpus, pairs, labelled sets);
2. trains the demo teacher with the CLIP loss on the pairs (or reuses it while its recipe holds)
   and saves it as an OpenCLIP model directory, loaded afterwards like any hub model;
3. embeds images and corpus with the teacher and keeps a grounded corpus (Algorithm 1);
4. distills the teacher into a smaller student with DIME-FM on the unpaired images and the
   grounded corpus (live teacher, augmented images);
5. beside it, the comparisons of `demo.compare` (dime_ds/demo/comparisons.py), each with its own
   stages and students: `curation` (the corpus curated with MetaCLIP, then grounded), `balance`
   (the image pool semantically balanced, scored against the planted duplicates), `cid` (CLIP-CID's
   cluster and instance terms on the balanced pool), `views` (the teacher cached as one plain view
   without augmentation, and as 4 augmented views), `families` (a MobileNet-style timm student),
   `ensemble` (a second teacher from another seed; students of A, of B and of A+B);
6. trains the same student architecture from scratch with the CLIP loss on as many *paired*
   samples, the yardstick;
7. evaluates the models with `dime_ds.eval` (the students from their checkpoints) and prints one
   table: zero-shot, retrieval and linear probe per set, image-tower parameters, samples/s; then
   each comparison's lines.

Extra arguments are Hydra overrides (e.g. `work_dir=/tmp/demo optim.steps=300 demo.compare=[views]`).
Those of the training recipe (optim, loss, student, eval, ckpt, teacher) apply to the students only:
the cached teacher keeps its own recipe (`experiment=demo_teacher`), changed with a `pretrain.`
prefix (`pretrain.optim.steps=200`); the rest (work_dir, data, seed, ...) apply to every stage."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.config import load_config
from dime_ds.config.schema import RootConfig
from dime_ds.demo.teacher import ensure_teacher, student_overrides, teacher_dir
from dime_ds.models import read_openclip_dir

log = logging.getLogger("dime_ds.demo")


def _models_table(distill_cfg: RootConfig, summaries: dict, teacher_speed: float) -> dict:
    """The three models through dime_ds.eval, students loaded from their checkpoints like any user's."""
    import torch

    from dime_ds.eval.models import checkpoint_encoders, openclip_encoder
    from dime_ds.eval.report import compare

    device, precision = torch.device("cpu"), distill_cfg.eval.precision
    teacher = openclip_encoder(str(teacher_dir(distill_cfg)), None, precision, device, "teacher (CLIP, paired)")
    columns = [teacher]
    speeds = [teacher_speed]
    for name, (run_dir, summary) in summaries.items():
        encoder, _ = checkpoint_encoders(run_dir, precision, device, with_teacher=False)
        encoder.name = name
        encoder.info["image_params"] = summary.get("image_params", 0)
        columns.append(encoder)
        speeds.append(summary.get("samples_per_s", 0))
    extra = [["model", "image params", *[f"{e.info['image_params'] / 1e6:.2f}M" for e in columns]],
             ["model", "train samples/s", *[f"{v:.0f}" for v in speeds]]]
    notes = ["chance: zero-shot 12.5 % (8 classes), retrieval R@1 "
             f"{100 / distill_cfg.data.synthetic.n_eval:.2f} %; linear probe: half of the shape set, L2 swept"]
    return compare(columns, distill_cfg.eval, Path(distill_cfg.run_dir) / "eval", progress=distill_cfg.log.progress,
                   extra_rows=extra, notes=notes)


BASELINE_COLUMN = "student from scratch (paired)"


def main(overrides: Sequence[str]) -> int:
    # The stages import torch, DeepSpeed and faiss: after --help and a bad config have been answered.
    from dime_ds.demo.comparisons import RAW_COLUMN, ground, grounding_line, grounding_record, selected
    from dime_ds.training import run_training

    start = time.time()

    def config(experiment: str) -> RootConfig:
        return load_config([f"experiment={experiment}", *student_overrides(overrides)])

    distill_cfg = config("demo")
    comparisons = selected(distill_cfg.demo.compare)
    cfgs = {s.experiment: config(s.experiment) for c in comparisons for s in c.students}
    baseline_cfg = config("demo_baseline")
    trained = ensure_teacher(overrides, teacher_dir(distill_cfg))
    for c in comparisons:  # further teachers (the ensemble's teacher B), each where its student reads it
        for experiment, student in c.teachers:
            ensure_teacher(overrides, teacher_dir(cfgs[student]), experiment)
    grounding = ground(distill_cfg)
    prepared = {c.name: c.prepare(cfgs, distill_cfg) for c in comparisons}

    students = [(RAW_COLUMN, distill_cfg), *((s.column, cfgs[s.experiment]) for c in comparisons for s in c.students),
                (BASELINE_COLUMN, baseline_cfg)]
    runs = {column: (cfg.run_dir, run_training(cfg)) for column, cfg in students}  # column -> (run dir, summary)
    summaries = {column: summary for column, (_, summary) in runs.items()}
    # A reused teacher's training figures live in its model directory.
    recorded = trained or read_openclip_dir(teacher_dir(distill_cfg)).get("dime_ds", {})
    results = _models_table(distill_cfg, runs, recorded.get("samples_per_s", 0))
    records, lines = {}, [grounding_line("raw", grounding)]
    for c in comparisons:
        more, records[c.name] = c.lines(cfgs, distill_cfg, prepared[c.name], results, summaries)
        lines += more
    wall = time.time() - start
    print("\n" + "\n".join(lines))
    print(f"{distill_cfg.optim.steps} steps x {distill_cfg.optim.global_batch_size} samples each for every "
          f"student; demo wall time {wall:.0f} s"
          + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out = Path(distill_cfg.run_dir) / "demo_results.json"
    out.write_text(json.dumps({"eval": results, "students": summaries, "grounding": grounding_record(grounding),
                               "compare": [c.name for c in comparisons], **records,
                               "teacher_training": trained, "wall_s": wall}, indent=2, default=str))
    print(f"results: {out}\nTensorBoard: tensorboard --logdir {Path(distill_cfg.work_dir) / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
