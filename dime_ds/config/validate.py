"""The range checks the schema's fields carry (positive(), non_negative(), fraction()), and the
cross-field checks no type can express. Allowed values are enum types on the fields (Hydra refuses
others while composing). Each error names the key and the fix."""
from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, ListConfig, OmegaConf

from dime_ds.config.schema import CHECK
from dime_ds.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; raised before any heavy work."""


RULES = {
    "positive": ("must be > 0", lambda v: v > 0),
    "non_negative": ("must be >= 0", lambda v: v >= 0),
    "fraction": ("must lie in [0, 1]", lambda v: 0 <= v <= 1),
    "positive_fraction": ("must lie in (0, 1]", lambda v: 0 < v <= 1),
}


def _range_errors(node: DictConfig, prefix: str = "") -> list[str]:
    """Every field's range rule (schema metadata), through nested sections; unset values are skipped."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return []
    errors = []
    for f in dataclasses.fields(kind):
        if f.name not in node or OmegaConf.is_missing(node, f.name):
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            errors += _range_errors(value, f"{prefix}{f.name}.")
        elif isinstance(value, ListConfig):  # a list of sections (ensemble.teachers)
            for i, item in enumerate(value):
                if isinstance(item, DictConfig):
                    errors += _range_errors(item, f"{prefix}{f.name}[{i}].")
        elif CHECK in f.metadata and value is not None:
            words, ok = RULES[f.metadata[CHECK]]
            if not ok(value):
                errors.append(f"{prefix}{f.name}={value!r} {words}")
    return errors


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that no schema dataclass declares (Hydra's `+key=` bypasses the struct flag)."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return []
    fields = {f.name for f in dataclasses.fields(kind)}
    found = []
    for key in node.keys():
        if key not in fields:
            found.append(f"{prefix}{key} is not a known key of {prefix.rstrip('.') or 'the config'} "
                         f"(known: {', '.join(sorted(fields))})")
        elif not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            found.extend(_unknown_keys(node[key], f"{prefix}{key}."))
        elif not OmegaConf.is_missing(node, key) and isinstance(node[key], ListConfig):
            for i, item in enumerate(node[key]):
                if isinstance(item, DictConfig):
                    found.extend(_unknown_keys(item, f"{prefix}{key}[{i}]."))
    return found


def validate(cfg: DictConfig) -> None:
    errors = _unknown_keys(cfg)
    errors += _range_errors(cfg)
    workers = cfg.data.workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        errors.append(f"data.workers={workers!r}: auto or a number of loader processes >= 0")

    loss, optim, teacher = cfg.loss, cfg.optim, cfg.teacher
    if loss.objective == "dime" and loss.w_vl + loss.w_pvl + loss.w_ud <= 0:
        errors.append("loss.w_vl + loss.w_pvl + loss.w_ud must be > 0: every DIME-FM term is switched off")
    if optim.warmup_steps > optim.steps:
        errors.append(f"optim.warmup_steps={optim.warmup_steps} exceeds optim.steps={optim.steps}")
    if optim.min_lr > optim.lr:
        errors.append(f"optim.min_lr={optim.min_lr} exceeds optim.lr={optim.lr}")
    if optim.global_batch_size % optim.grad_accum:
        errors.append(f"optim.global_batch_size={optim.global_batch_size} is not divisible by "
                      f"optim.grad_accum={optim.grad_accum}")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        errors.append(f"optim.betas={list(optim.betas)} must be two numbers in [0, 1)")
    if teacher.source == "cache" and not teacher.cache_dir:
        errors.append("teacher.source=cache needs teacher.cache_dir (the embed stage's output directory)")
    for i, t in enumerate([teacher, *cfg.ensemble.teachers]):
        key = "teacher" if i == 0 else f"ensemble.teachers[{i - 1}]"
        if t.source == "cache" and t.shard == "zero3":
            errors.append(f"{key}.shard=zero3 contradicts {key}.source=cache: a cached teacher has no "
                          f"parameters to partition; use {key}.shard=replicate")
    errors.extend(_ensemble_errors(cfg))
    if loss.objective != "dime" and (loss.w_cluster > 0 or loss.w_instance > 0):
        errors.append(f"loss.w_cluster / loss.w_instance are CLIP-CID terms of the DIME-FM objective; "
                      f"loss.objective={loss.objective} has no teacher to take them from: set them to 0")
    if loss.learn_centres and not loss.w_cluster > 0:
        errors.append("loss.learn_centres=true trains the centres of the cluster term, which loss.w_cluster=0 "
                      "switches off: set loss.w_cluster > 0 or loss.learn_centres=false")
    if loss.objective == "clip" and cfg.student.text != "own":
        errors.append("loss.objective=clip trains image and text towers together: set student.text=own")
    if cfg.student.model_cfg is not None:
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg.student.model_cfg]
        if missing:
            errors.append(f"student.model_cfg lacks {', '.join(missing)} (an OpenCLIP model config)")
    if not cfg.eval.probe.reg or any(r < 0 for r in cfg.eval.probe.reg):
        errors.append(f"eval.probe.reg={list(cfg.eval.probe.reg)} must be a non-empty list of L2 strengths >= 0")
    errors.extend(_curate_errors(cfg.curate, cfg.match.pool))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _ensemble_errors(cfg: DictConfig) -> list[str]:
    e, errors = cfg.ensemble, []
    n = 1 + len(e.teachers)
    if e.weights is not None:
        weights = list(e.weights)
        if len(weights) != n:
            errors.append(f"ensemble.weights={weights} gives {len(weights)} weight(s) for {n} teacher(s) "
                          "(`teacher` first, then ensemble.teachers)")
        elif any(w < 0 for w in weights) or not sum(weights) > 0:
            errors.append(f"ensemble.weights={weights} must be >= 0 with a positive sum")
    if e.cid_teacher >= n:
        errors.append(f"ensemble.cid_teacher={e.cid_teacher}: there are {n} teacher(s), numbered from 0 (`teacher`)")
    if cfg.match.teacher is not None and cfg.match.teacher >= n:
        errors.append(f"match.teacher={cfg.match.teacher}: there are {n} teacher(s), numbered from 0 (`teacher`)")
    if e.teachers and cfg.loss.objective != "dime":
        errors.append(f"ensemble.teachers are DIME-FM's targets; loss.objective={cfg.loss.objective} uses no "
                      "teacher: drop ensemble.teachers")
    return errors


def _curate_errors(c, pool: str) -> list[str]:
    errors = []
    given = [k for k in ("t", "target_size", "tail_share") if c[k] is not None]
    if len(given) > 1:
        errors.append(f"curate.{' and curate.'.join(given)} are all set: give one (the threshold t, a target "
                      "size, or a tail share)")
    if c.t is not None and not c.t > 0:
        errors.append(f"curate.t={c.t!r} must be > 0")
    if c.target_size is not None and not c.target_size > 0:
        errors.append(f"curate.target_size={c.target_size!r} must be > 0")
    if c.tail_share is not None and not 0.0 < c.tail_share <= 1.0:
        errors.append(f"curate.tail_share={c.tail_share!r} must lie in (0, 1]")
    if pool == "curated" and c.input == "grounded":
        errors.append("match.pool=curated makes embed and match ground the curated pool, but with "
                      "curate.input=grounded curation reads what match wrote: drop match.pool=curated and train on "
                      "the curated grounded corpus with data.texts=${curate.out_dir}/corpus")
    return errors


def require(cfg: DictConfig, *keys: str) -> None:
    """Keys a stage needs that may legitimately be unset (`???` or null) in other stages."""
    missing = []
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = _get(cfg, parent) if parent else cfg
        if OmegaConf.is_missing(node, leaf) or node[leaf] is None:
            missing.append(key)
    if missing:
        raise ConfigError("this stage needs: " + ", ".join(f"{k}=<value>" for k in missing)
                          + " (on the command line or in the experiment config)")
