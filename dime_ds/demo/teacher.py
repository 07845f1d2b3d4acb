"""The demo teacher: CLIP-loss training from scratch on image-caption shards, through the same
trainer as distillation (loss=clip), then saved as an OpenCLIP model directory that later stages
load like any hub model. A teacher whose recipe (architecture, data content, loss, optimiser,
seed) is unchanged is reused."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from typing import Sequence

from omegaconf import OmegaConf
from open_clip.factory import parse_model_name
from safetensors.torch import load_file

from dime_ds.config import ConfigError, load_config
from dime_ds.config.schema import RootConfig
from dime_ds.demo.stopping import Stopped
from dime_ds.demo.synthetic import write_world
from dime_ds.data.shards import list_shards, sha256_file
from dime_ds.training import run_training
from dime_ds.models import build_student, read_openclip_dir, save_openclip_dir, student_preprocess_cfg

log = logging.getLogger(__name__)


RECIPE_SECTIONS = ("student", "loss", "optim")


def set_values(values: dict, defaults: dict) -> dict:
    """The entries of a config section that differ from the schema's defaults. A knob added to the
    schema later, with the old behaviour as its default, then leaves the recipe (and every user's
    cached teacher) as it was."""
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def recipe_hash(cfg: RootConfig) -> str:
    """What determines the trained model: architecture, data, loss, optimiser, seed."""
    schema = RootConfig()
    parts = {k: set_values(OmegaConf.to_container(cfg[k], resolve=True), dataclasses.asdict(getattr(schema, k)))
             for k in RECIPE_SECTIONS}
    # The data by content, so a regenerated world retrains the teacher.
    parts["data"] = {"paired": [sha256_file(p) for p in list_shards(cfg.data.paired)],
                     "augment": cfg.data.augment, "crop_scale_min": cfg.data.crop_scale_min}
    parts["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def is_current(out_dir: Path, cfg: RootConfig) -> bool:
    try:
        return read_openclip_dir(out_dir).get("dime_ds", {}).get("recipe") == recipe_hash(cfg)
    except FileNotFoundError:
        return False


def pretrain_clip(cfg: RootConfig, out_dir: str | Path, rerun: str = "the same command") -> dict:
    """Train `cfg.student` (text=own, loss=clip) on `cfg.data.paired`; save it to `out_dir` as an
    OpenCLIP model directory. Returns the training summary with its wall time. Stopped by a signal:
    Stopped (status 3) after its checkpoint, naming `rerun`, which resumes it."""
    start = time.time()
    summary = run_training(cfg)
    if summary["status"] != "completed":
        raise Stopped(f"stopped at step {summary['step']} of {cfg.optim.steps} (the demo teacher {cfg.name}, "
                      f"checkpoint in {cfg.ckpt.dir}); rerun `{rerun}` to resume")
    model = build_student(cfg.student)
    model.load_state_dict(load_file(summary["final_weights"]))
    state, model_cfg = model.openclip_state()
    summary = {**summary, "wall_s": time.time() - start, "recipe": recipe_hash(cfg)}
    extra = {k: summary[k] for k in ("step", "samples_per_s", "wall_s", "recipe") if k in summary}
    save_openclip_dir(state, model_cfg, student_preprocess_cfg(model.model_cfg), out_dir, extra=extra)
    log.info("saved the teacher to %s: %s", out_dir, extra)
    return summary


def teacher_dir(cfg: RootConfig) -> Path:
    """Where the demo keeps the teacher `cfg.teacher` names (a local-dir: model directory it trains)."""
    schema, path = parse_model_name(cfg.teacher.arch)
    if schema != "local-dir":
        raise ConfigError(f"the demo trains its own teacher: teacher.arch must be local-dir:<dir>, "
                          f"not {cfg.teacher.arch}")
    return Path(path)


def teacher_record(cfg: RootConfig, trained: dict | None) -> dict:
    """The training figures of `cfg.teacher`: this run's (`trained`), or those its model directory recorded."""
    return trained or read_openclip_dir(teacher_dir(cfg)).get("dime_ds", {})


STUDENT_ONLY = ("optim.", "loss.", "student.", "eval.", "ckpt.", "teacher.", "name=", "seed=")


TEACHER_ONLY = "pretrain."


def teacher_overrides(overrides: Sequence[str]) -> list[str]:
    return [o[len(TEACHER_ONLY):] if o.startswith(TEACHER_ONLY) else o for o in overrides
            if o.startswith(TEACHER_ONLY) or not o.lstrip("+~").startswith(STUDENT_ONLY)]


def student_overrides(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(TEACHER_ONLY)]


def ensure_teacher(overrides: Sequence[str], out_dir: Path, experiment: str = "demo_teacher",
                   rerun: str = "the same command") -> dict | None:
    """Train a demo teacher (`experiment`: its recipe) unless a current one (same recipe) is already
    there; an interrupted training resumes (its run directory is per recipe). `rerun`: the command
    a stop message names."""
    cfg = load_config([f"experiment={experiment}", *teacher_overrides(overrides)])
    write_world(cfg.data.root, cfg.data.synthetic)
    if is_current(out_dir, cfg):
        log.info("demo teacher in %s is current; reusing it", out_dir)
        return None
    # One run directory per recipe: resuming an interrupted pretraining never mixes recipes.
    recipe = recipe_hash(cfg)
    cfg = load_config([f"experiment={experiment}", *teacher_overrides(overrides),
                       f"run_dir={cfg.work_dir}/runs/{experiment}-{recipe}"])
    return pretrain_clip(cfg, out_dir, rerun)
