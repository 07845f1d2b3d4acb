"""`make demo`: the embedded default on one CPU machine, nothing downloaded.

1. writes the synthetic world (unpaired images, a mostly non-visual corpus, pairs, labelled sets);
2. trains the demo teacher with the CLIP loss on the pairs (or reuses it while its recipe holds)
   and saves it as an OpenCLIP model directory, loaded afterwards like any hub model;
3. embeds images and corpus with the teacher and keeps a grounded corpus (Algorithm 1);
4. distills the teacher into a smaller student with DIME-FM on unpaired images and the grounded
   sentences;
5. trains the same student architecture from scratch with the CLIP loss on as many *paired*
   samples, the yardstick;
6. evaluates the three models with `dime_ds.eval` (the students from their checkpoints) and prints
   one table: zero-shot, retrieval and linear probe per set, image-tower parameters, samples/s.

Extra arguments are Hydra overrides (e.g. `work_dir=/tmp/demo optim.steps=300`). Those of the
training recipe (optim, loss, student, eval, ckpt) apply to the two students only: the cached
teacher keeps its own recipe (`experiment=demo_teacher`), changed with a `pretrain.` prefix
(`pretrain.optim.steps=200`); the rest (work_dir, data, seed, ...) apply to every stage."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from open_clip.factory import parse_model_name

from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config
from dime_ds.config.schema import RootConfig
from dime_ds.demo.synthetic import write_world
from dime_ds.models import read_openclip_dir

log = logging.getLogger("dime_ds.demo")


def teacher_dir(cfg: RootConfig) -> Path:
    schema, path = parse_model_name(cfg.teacher.arch)
    if schema != "local-dir":
        raise ConfigError(f"the demo trains its own teacher: teacher.arch must be local-dir:<dir>, "
                          f"not {cfg.teacher.arch}")
    return Path(path)


STUDENT_ONLY = ("optim.", "loss.", "student.", "eval.", "ckpt.", "teacher.", "name=")


TEACHER_ONLY = "pretrain."


def teacher_overrides(overrides: Sequence[str]) -> list[str]:
    return [o[len(TEACHER_ONLY):] if o.startswith(TEACHER_ONLY) else o for o in overrides
            if o.startswith(TEACHER_ONLY) or not o.lstrip("+~").startswith(STUDENT_ONLY)]


def student_overrides(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(TEACHER_ONLY)]


def ensure_teacher(overrides: Sequence[str], out_dir: Path) -> dict | None:
    """Train the demo teacher unless a current one (same recipe) is already there."""
    from dime_ds.demo.teacher import is_current, pretrain_clip, recipe_hash

    cfg = load_config(["experiment=demo_teacher", *teacher_overrides(overrides)])
    write_world(cfg.data.root, cfg.data.synthetic)
    if is_current(out_dir, cfg):
        log.info("demo teacher in %s is current; reusing it", out_dir)
        return None
    # One run directory per recipe: resuming an interrupted pretraining never mixes recipes.
    recipe = recipe_hash(cfg)
    cfg = load_config(["experiment=demo_teacher", *teacher_overrides(overrides),
                       f"run_dir={cfg.work_dir}/runs/demo_teacher-{recipe}"])
    return pretrain_clip(cfg, out_dir)


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


def main(overrides: Sequence[str]) -> int:
    # The stages import torch, DeepSpeed and faiss: after --help and a bad config have been answered.
    from dime_ds.embed.stage import run_embed_stage
    from dime_ds.engine.run import run_training
    from dime_ds.ground.stage import run_match_stage

    start = time.time()
    distill_cfg = load_config(["experiment=demo", *student_overrides(overrides)])
    baseline_cfg = load_config(["experiment=demo_baseline", *student_overrides(overrides)])
    trained = ensure_teacher(overrides, teacher_dir(distill_cfg))
    run_embed_stage(distill_cfg)  # shards embedded earlier from unchanged sources are skipped
    grounding = run_match_stage(distill_cfg)

    distilled = run_training(distill_cfg)
    baseline = run_training(baseline_cfg)
    # A reused teacher's training figures live in its model directory.
    recorded = trained or read_openclip_dir(teacher_dir(distill_cfg)).get("dime_ds", {})
    results = _models_table(distill_cfg, {
        "student DIME-FM (unpaired)": (distill_cfg.run_dir, distilled),
        "student from scratch (paired)": (baseline_cfg.run_dir, baseline)}, recorded.get("samples_per_s", 0))
    wall = time.time() - start
    kept = grounding["kinds"]["kept"]
    print(f"\ngrounded corpus: {grounding['sentences_kept']} of {grounding['sentences']} sentences kept, "
          f"{100 * kept.get('describing', 0) / max(1, grounding['sentences_kept']):.1f} % of them describe an image")
    print(f"{distill_cfg.optim.steps} steps x {distill_cfg.optim.global_batch_size} samples each for both "
          f"students; demo wall time {wall:.0f} s"
          + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out = Path(distill_cfg.run_dir) / "demo_results.json"
    out.write_text(json.dumps({"eval": results, "distilled": distilled, "baseline": baseline,
                               "grounding": {k: grounding[k] for k in ("sentences", "sentences_kept", "rounds", "kinds")},
                               "teacher_training": trained, "wall_s": wall}, indent=2, default=str))
    print(f"results: {out}\nTensorBoard: tensorboard --logdir {Path(distill_cfg.work_dir) / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
