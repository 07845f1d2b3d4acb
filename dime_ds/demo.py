"""`make demo`: the embedded default on one CPU machine, nothing downloaded.

1. writes the synthetic world (unpaired images, a mostly non-visual corpus, pairs, labelled sets);
2. trains the demo teacher with the CLIP loss on the pairs (or reuses it while its recipe holds)
   and saves it as an OpenCLIP model directory, loaded afterwards like any hub model;
3. embeds images and corpus with the teacher and keeps a grounded corpus (Algorithm 1);
4. distills the teacher into a smaller student with DIME-FM on unpaired images and the grounded
   sentences;
5. trains the same student architecture from scratch with the CLIP loss on as many *paired*
   samples, the yardstick;
6. prints one table: zero-shot accuracy per labelled set, image-tower parameters, samples/s.

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
from dime_ds.data.synthetic import write_world
from dime_ds.engine.pretrain import is_current, pretrain_clip, recipe_hash
from dime_ds.engine.run import run_training
from dime_ds.log.table import format_table
from dime_ds.match.corpus import run_match_stage
from dime_ds.match.embed import run_embed_stage
from dime_ds.models import read_openclip_dir

log = logging.getLogger("dime_ds.demo")


def teacher_dir(cfg) -> Path:
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


def _rows(name: str, summary: dict, results: dict) -> list:
    row = [name]
    for dataset, m in results.items():
        row.append("missing" if m.get("missing") else f"{100 * m['top1']:.1f}")
    row += [f"{summary.get('image_params', 0) / 1e6:.2f}M", f"{summary.get('samples_per_s', 0):.0f}"]
    return row


def main(overrides: Sequence[str]) -> int:
    start = time.time()
    distill_cfg = load_config(["experiment=demo", *student_overrides(overrides)])
    baseline_cfg = load_config(["experiment=demo_baseline", *student_overrides(overrides)])
    trained = ensure_teacher(overrides, teacher_dir(distill_cfg))
    run_embed_stage(distill_cfg)  # shards embedded earlier from unchanged sources are skipped
    grounding = run_match_stage(distill_cfg)

    distilled = run_training(distill_cfg)
    baseline = run_training(baseline_cfg)
    teacher_eval = distilled["eval"]["teacher"]
    # A reused teacher's training figures live in its model directory.
    recorded = trained or read_openclip_dir(teacher_dir(distill_cfg)).get("dime_ds", {})
    teacher_summary = {"image_params": distilled.get("teacher_image_params", 0),
                       "samples_per_s": recorded.get("samples_per_s", 0)}
    datasets = list(teacher_eval)
    chance = {d: f"{100 / m['classes']:.1f}" for d, m in teacher_eval.items() if not m.get("missing")}
    rows = [_rows("teacher (CLIP loss, paired)", teacher_summary, teacher_eval),
            _rows("student, DIME-FM (unpaired)", distilled, distilled["eval"]["student"]),
            _rows("student, from scratch (paired)", baseline, baseline["eval"]["student"]),
            ["chance", *[chance.get(d, "") for d in datasets], "", ""]]
    header = ["model", *[f"{d} top-1 %" for d in datasets], "image params", "train samples/s"]
    wall = time.time() - start
    print("\n" + format_table(header, rows))
    kept = grounding["kinds"]["kept"]
    print(f"\ngrounded corpus: {grounding['sentences_kept']} of {grounding['sentences']} sentences kept, "
          f"{100 * kept.get('describing', 0) / max(1, grounding['sentences_kept']):.1f} % of them describe an image")
    print(f"{distill_cfg.optim.steps} steps x {distill_cfg.optim.global_batch_size} samples each for both "
          f"students; demo wall time {wall:.0f} s"
          + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out = Path(distill_cfg.run_dir) / "demo_results.json"
    out.write_text(json.dumps({"teacher": teacher_eval, "distilled": distilled, "baseline": baseline,
                               "grounding": {k: grounding[k] for k in ("sentences", "sentences_kept", "rounds", "kinds")},
                               "teacher_training": trained, "wall_s": wall}, indent=2, default=str))
    print(f"results: {out}\nTensorBoard: tensorboard --logdir {Path(distill_cfg.work_dir) / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
