"""`make demo`: the embedded default on one CPU machine, nothing downloaded.

1. writes the synthetic world (unpaired images, a mostly non-visual corpus, pairs, labelled sets);
2. trains the demo teacher with the CLIP loss on the pairs (or reuses it while its recipe holds)
   and saves it as an OpenCLIP model directory, loaded afterwards like any hub model;
3. embeds images and the (head-heavy) corpus with the teacher and keeps a grounded corpus
   (Algorithm 1); curates the corpus with MetaCLIP against the world's concept list
   (`experiment=demo_curated`) and grounds the curated pool too;
4. distills the teacher into a smaller student with DIME-FM on unpaired images and each grounded
   corpus (raw pool, curated pool);
5. trains the same student architecture from scratch with the CLIP loss on as many *paired*
   samples, the yardstick;
6. evaluates the models with `dime_ds.eval` (the students from their checkpoints) and prints one
   table: zero-shot, retrieval and linear probe per set, image-tower parameters, samples/s; then,
   per shape class, the sentences naming it in each pool and the two DIME-FM students' zero-shot
   accuracy on it (curation should lift the tail classes).

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


def _ground(cfg: RootConfig) -> dict:
    """Embed (shards embedded earlier from unchanged sources are skipped) and ground cfg's pool."""
    from dime_ds.embed.stage import run_embed_stage
    from dime_ds.ground.stage import run_match_stage

    run_embed_stage(cfg)
    return run_match_stage(cfg)


def _curation_lines(raw_cfg: RootConfig, curated_cfg: RootConfig, curation: dict, results: dict) -> tuple[list[str], dict]:
    """Per shape class: sentences naming it in the raw and curated pools and in both grounded corpora,
    beside the two DIME-FM students' zero-shot top-1 on that class."""
    from dime_ds.demo.coverage import coverage_table, pool_sentences
    from dime_ds.demo.synthetic import SHAPES

    pools = {"raw pool": pool_sentences(raw_cfg.data.corpus),
             "curated pool": pool_sentences(str(Path(curated_cfg.curate.out_dir) / "corpus")),
             "grounded raw": pool_sentences(raw_cfg.data.texts),
             "grounded curated": pool_sentences(curated_cfg.data.texts)}
    per_class = {name: results[column]["shape"]["per_class"] for name, column in
                 (("raw", RAW_COLUMN), ("curated", CURATED_COLUMN))}
    table, record = coverage_table(pools, SHAPES, per_class)
    lines = [f"\nMetaCLIP curation (t = {curation['t']:.0f}, {curation['entries']['head']} head entries of "
             f"{curation['entries']['total']}): {curation['sentences_kept']} of {curation['sentences']} sentences kept; "
             "sentences naming each shape class, and the DIME-FM students' zero-shot top-1 per class (%):", table]
    return lines, {**record, "t": curation["t"], "kept": curation["sentences_kept"]}


RAW_COLUMN, CURATED_COLUMN = "student DIME-FM (raw pool)", "student DIME-FM (curated pool)"


def main(overrides: Sequence[str]) -> int:
    # The stages import torch, DeepSpeed and faiss: after --help and a bad config have been answered.
    from dime_ds.curate.stage import run_curate_stage
    from dime_ds.engine.run import run_training

    start = time.time()
    distill_cfg = load_config(["experiment=demo", *student_overrides(overrides)])
    curated_cfg = load_config(["experiment=demo_curated", *student_overrides(overrides)])
    baseline_cfg = load_config(["experiment=demo_baseline", *student_overrides(overrides)])
    trained = ensure_teacher(overrides, teacher_dir(distill_cfg))
    grounding = _ground(distill_cfg)
    curation = run_curate_stage(curated_cfg)
    curated_grounding = _ground(curated_cfg)

    distilled = run_training(distill_cfg)
    curated = run_training(curated_cfg)
    baseline = run_training(baseline_cfg)
    # A reused teacher's training figures live in its model directory.
    recorded = trained or read_openclip_dir(teacher_dir(distill_cfg)).get("dime_ds", {})
    results = _models_table(distill_cfg, {
        RAW_COLUMN: (distill_cfg.run_dir, distilled),
        CURATED_COLUMN: (curated_cfg.run_dir, curated),
        "student from scratch (paired)": (baseline_cfg.run_dir, baseline)}, recorded.get("samples_per_s", 0))
    curation_lines, coverage = _curation_lines(distill_cfg, curated_cfg, curation, results)
    wall = time.time() - start
    for name, g in (("raw", grounding), ("curated", curated_grounding)):
        kept = g["kinds"]["kept"]
        print(f"\ngrounded corpus ({name} pool): {g['sentences_kept']} of {g['sentences']} sentences kept, "
              f"{100 * kept.get('describing', 0) / max(1, g['sentences_kept']):.1f} % of them describe an image",
              end="")
    print("\n".join(["", *curation_lines]))
    print(f"{distill_cfg.optim.steps} steps x {distill_cfg.optim.global_batch_size} samples each for every "
          f"student; demo wall time {wall:.0f} s"
          + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out = Path(distill_cfg.run_dir) / "demo_results.json"

    def grounding_record(g):
        return {k: g[k] for k in ("sentences", "sentences_kept", "rounds", "kinds")}

    out.write_text(json.dumps({"eval": results, "distilled": distilled, "curated": curated, "baseline": baseline,
                               "grounding": grounding_record(grounding),
                               "curated_grounding": grounding_record(curated_grounding),
                               "curation": {"report": curation, "coverage": coverage},
                               "teacher_training": trained, "wall_s": wall}, indent=2, default=str))
    print(f"results: {out}\nTensorBoard: tensorboard --logdir {Path(distill_cfg.work_dir) / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
