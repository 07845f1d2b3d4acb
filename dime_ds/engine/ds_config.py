"""DeepSpeed JSON holds engine knobs only (ZeRO stage, offload, bucket sizes, precision switch).
Batch size, accumulation and clipping belong to the Hydra `optim` section and are written into the
JSON's "auto" fields here; a JSON that sets one of them to something else is a conflict, and an
optimizer or scheduler section is refused (Hydra owns both)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dime_ds.config import ConfigError, shipped_dir
from dime_ds.config.schema import OptimConfig

OWNED_BY_HYDRA = ("optimizer", "scheduler")


AUTO = "auto"


def auto_ds_config(world_size: int) -> str:
    """`dist.ds_config=auto`: ZeRO-0 on one rank, ZeRO-1 on more. Alone, ZeRO-1's flat fp32
    partition buys no memory and costs time every step: its bf16 <-> fp32 buffer copies and gradient
    hooks, which stage 0 does without (docs/performance.md)."""
    return "zero0" if world_size == 1 else "zero1"


def ds_config_path(name_or_path: str, world_size: int = 1) -> Path:
    if name_or_path == AUTO:
        name_or_path = auto_ds_config(world_size)
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = shipped_dir("ds_configs") / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in shipped_dir("ds_configs").glob("*.json"))
        raise ConfigError(f"dist.ds_config={name_or_path!r}: {path} not found "
                          f"(auto, or shipped: {', '.join(available)})")
    return path


def _fill(cfg: dict, key: str, value: Any, owner: str, source: Path) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(f"{source.name} sets {key}={current!r} but {owner} gives {value!r}: "
                          f"set it to \"auto\" in the JSON and change {owner.split('=')[0]} instead")


def build_ds_config(name_or_path: str, optim_cfg: OptimConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict for this run (engine knobs from JSON, the rest from Hydra).
    `precision` (the policy's, models/precision.py) fills bf16/fp16 sections left at "auto"."""
    source = ds_config_path(name_or_path, world_size)
    cfg = json.loads(source.read_text())
    for key in OWNED_BY_HYDRA:
        if key in cfg:
            raise ConfigError(f"{source.name} has an {key!r} section; the optimizer and schedule are owned "
                              f"by the Hydra optim section (optim.*): remove it from the JSON")
    per_step = optim_cfg.global_batch_size
    if per_step % (world_size * optim_cfg.grad_accum):
        raise ConfigError(f"optim.global_batch_size={per_step} is not divisible by world size {world_size} "
                          f"x optim.grad_accum={optim_cfg.grad_accum}")
    micro = per_step // (world_size * optim_cfg.grad_accum)
    cfg = copy.deepcopy(cfg)
    _fill(cfg, "train_batch_size", per_step, f"optim.global_batch_size={per_step}", source)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro,
          f"optim.global_batch_size / (world x grad_accum)={micro}", source)
    _fill(cfg, "gradient_accumulation_steps", optim_cfg.grad_accum, f"optim.grad_accum={optim_cfg.grad_accum}", source)
    _fill(cfg, "gradient_clipping", float(optim_cfg.grad_clip), f"optim.grad_clip={optim_cfg.grad_clip}", source)
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        want = precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want
    if cfg["bf16"]["enabled"] and cfg["fp16"]["enabled"]:
        raise ConfigError(f"{source.name} enables both bf16 and fp16")
    return cfg


def engine_precision(ds_cfg: dict) -> str:
    """The precision a built DeepSpeed config trains in (its JSON's explicit choice, else the policy's)."""
    return "bf16" if ds_cfg["bf16"]["enabled"] else "fp16" if ds_cfg["fp16"]["enabled"] else "fp32"


def inference_ds_config(precision: str, micro_batch: int) -> dict:
    """ZeRO-3 with no optimizer: parameters partitioned across ranks, gathered per module forward.
    For teachers too big to replicate."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 100000000,
    }
