"""Cross-field checks the type system cannot express. Each error names the key and the fix."""
from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from dime_ds.config.schema import DEMO_COMPARISONS
from dime_ds.data.workers import loader_workers
from dime_ds.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; raised before any heavy work."""


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "teacher.precision": ("auto", "bf16", "fp16", "fp32"),
    "teacher.shard": ("replicate", "zero3"),
    "teacher.source": ("live", "cache"),
    "student.text": ("teacher", "own"),
    "loss.kind": ("dime", "clip"),
    "optim.name": ("adamw",),
    "optim.schedule": ("cosine", "constant"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "match.index": ("flat", "ivf"),
    "match.stage": ("embed", "match", "all"),
    "curate.stage": ("metaclip", "semantic_balance", "cluster"),
    "curate.input": ("pool", "grounded"),
    "embed.choice": ("random", "round_robin"),
    "eval.precision": ("auto", "bf16", "fp16", "fp32"),
}
EVAL_TASKS = ("zeroshot", "retrieval", "linear_probe")

POSITIVE = (
    "loss.t_vl", "loss.t_pvl", "loss.t_ud", "loss.scale", "loss.cluster_scale", "loss.instance_temperature",
    "loss.cluster_sample_rate", "optim.lr", "optim.steps",
    "optim.global_batch_size", "optim.grad_accum", "optim.eps", "log.every_n_steps",
    "ckpt.keep_last", "match.topk", "match.block_size", "match.batch_size", "eval.batch_size",
    "eval.probe.max_iter", "curate.top_entries", "balance.beta", "balance.k", "balance.max_k",
    "balance.block_size", "cluster.k", "cluster.niter",
    "data.synthetic.image_size", "data.synthetic.shard_size", "slurm.nodes", "embed.views",
)
NON_NEGATIVE = (
    "loss.w_vl", "loss.w_pvl", "loss.w_ud", "loss.w_cluster", "loss.w_instance", "loss.cluster_margin",
    "optim.weight_decay", "optim.warmup_steps",
    "optim.min_lr", "optim.grad_clip", "ckpt.every_n_steps", "eval.every_n_steps",
    "eval.workers", "slurm.gpus_per_node", "embed.seed", "balance.buckets", "balance.groups_shown",
)
FRACTIONS = ("match.stop_ratio", "loss.cluster_sample_rate", "data.crop_scale_min", "data.synthetic.describing_fraction",
             "data.synthetic.second_object_p", "eval.probe.val_fraction", "eval.probe.test_fraction")


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
    return found


def validate(cfg: DictConfig) -> None:
    errors = _unknown_keys(cfg)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            errors.append(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            errors.append(f"{key}={_get(cfg, key)!r} must be >= 0")
    try:
        loader_workers(cfg.data.workers)
    except ValueError as err:
        errors.append(str(err))
    for key in FRACTIONS:
        if not 0.0 <= _get(cfg, key) <= 1.0:
            errors.append(f"{key}={_get(cfg, key)!r} must lie in [0, 1]")

    loss, optim, teacher = cfg.loss, cfg.optim, cfg.teacher
    if loss.kind == "dime" and loss.w_vl + loss.w_pvl + loss.w_ud <= 0:
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
    if teacher.source == "cache" and teacher.shard == "zero3":
        errors.append("teacher.shard=zero3 contradicts teacher.source=cache: a cached teacher has no "
                      "parameters to partition; use teacher.shard=replicate")
    if loss.kind != "dime" and (loss.w_cluster > 0 or loss.w_instance > 0):
        errors.append(f"loss.w_cluster / loss.w_instance are CLIP-CID terms of the DIME-FM objective; "
                      f"loss.kind={loss.kind} has no teacher to take them from: set them to 0")
    if loss.learn_centres and not loss.w_cluster > 0:
        errors.append("loss.learn_centres=true trains the centres of the cluster term, which loss.w_cluster=0 "
                      "switches off: set loss.w_cluster > 0 or loss.learn_centres=false")
    if loss.kind == "clip" and cfg.student.text != "own":
        errors.append("loss.kind=clip trains image and text towers together: set student.text=own")
    if cfg.student.model_cfg is not None:
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg.student.model_cfg]
        if missing:
            errors.append(f"student.model_cfg lacks {', '.join(missing)} (an OpenCLIP model config)")
    for name, ds in cfg.eval.datasets.items():
        if ds.task not in EVAL_TASKS:
            errors.append(f"eval.datasets.{name}.task={ds.task!r} is not one of: {', '.join(EVAL_TASKS)}")
        if ds.metric not in ("top1", "mean_per_class"):
            errors.append(f"eval.datasets.{name}.metric={ds.metric!r} is not one of: top1, mean_per_class")
    bad_tasks = [t for t in cfg.eval.periodic_tasks if t not in EVAL_TASKS]
    if bad_tasks:
        errors.append(f"eval.periodic_tasks has {bad_tasks}; allowed: {', '.join(EVAL_TASKS)}")
    if not cfg.eval.probe.reg or any(r < 0 for r in cfg.eval.probe.reg):
        errors.append(f"eval.probe.reg={list(cfg.eval.probe.reg)} must be a non-empty list of L2 strengths >= 0")
    errors.extend(_curate_errors(cfg.curate))
    unknown = [c for c in cfg.demo.compare if c not in DEMO_COMPARISONS]
    if unknown:
        errors.append(f"demo.compare has {unknown}; allowed: {', '.join(DEMO_COMPARISONS)}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _curate_errors(c) -> list[str]:
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
    if c.enabled and c.input == "grounded":
        errors.append("curate.enabled=true makes embed and match ground the curated pool, but with "
                      "curate.input=grounded curation reads what match wrote: drop curate.enabled and train on "
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
