"""The student's fp32 master weights from a dime_ds run's DeepSpeed checkpoint, read on one CPU
process without a process group, whatever ZeRO stage and world size wrote it; and the student
rebuilt from them (evaluation, export).

ZeRO 1-3 keep the fp32 masters partitioned in `*_optim_states.pt` shards, which DeepSpeed's
zero_to_fp32 stitches together. Two layouts it (0.19.8) cannot read are read here: stage 0 with
bf16/fp16 (no shards; the FP16 optimizer's unnamed per-parameter fp32 copies sit in the model-states
file, named here by the optimizer's group order) and ZeRO-1 under DeepSpeed's BF16_Optimizer.

Every read, DeepSpeed's included, is weights-only with a short allowlist (checkpoint.weights_only_reads):
a checkpoint from anywhere is never unpickled freely. DeepSpeed is imported inside functions: eval
imports this module."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dime_ds.config.schema import RootConfig
from dime_ds.engine.checkpoint import (OBJECTIVE_MODULE, TAG, CheckpointError, checkpoint_tags, find_tag, model_states,
                                       read_latest, weights_only_reads)
from dime_ds.engine.param_groups import split_names
from dime_ds.models import Student, build_run_student

log = logging.getLogger(__name__)
EXPECTED = ("expected a dime_ds run directory (config.yaml + checkpoints), a checkpoint directory (DeepSpeed "
            "`latest` file + step_* tags) or one tag directory (step_00000042)")
# deepspeed.checkpoint.constants' ZERO_STAGE and SINGLE_PARTITION_OF_FP32_GROUPS, without importing deepspeed
ZERO_STAGE_KEY = "zero_stage"
FP32_PARTITIONS_KEY = "single_partition_of_fp32_groups"


def _is_ckpt_dir(path: Path) -> bool:
    return read_latest(path) is not None or bool(checkpoint_tags(path))


def _ckpt_dir_of_run(run_dir: Path) -> Path:
    """A run's checkpoint directory: ckpt.dir of its config.yaml, or checkpoints/ beside it (a moved run)."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    candidates = [Path(str(OmegaConf.select(saved, "ckpt.dir", default=""))), run_dir / "checkpoints"]
    for candidate in candidates:
        if str(candidate) not in ("", ".") and candidate.is_dir() and _is_ckpt_dir(candidate):
            return candidate
    raise CheckpointError(f"{run_dir}: a dime_ds run directory without checkpoints (looked in "
                          f"{', '.join(sorted({str(c) for c in candidates}))}); a run checkpoints every "
                          "ckpt.every_n_steps and when it ends")


def _run_config(ckpt_dir: Path, tag: str) -> DictConfig:
    """The resolved config saved with the checkpoint (client state); config.yaml beside it for
    checkpoints without one."""
    client = _load(model_states(ckpt_dir / tag)[0])
    text = client.get("config") if isinstance(client, dict) else None
    if text is None:
        saved = ckpt_dir.parent / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{ckpt_dir / tag}: a DeepSpeed checkpoint without a dime_ds run config "
                                  f"(none in its client state, no {saved}); {EXPECTED}")
        text = saved.read_text()
    raw = OmegaConf.create(text)
    try:
        from dime_ds.config.schema import RootConfig

        cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), raw)
    except OmegaConfBaseException as err:  # another dime_ds version's config: plain, it still names the student
        log.debug("saved config does not fit the current schema (%s); using it untyped", err)
        cfg = raw
    OmegaConf.set_readonly(cfg, True)
    return cfg


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[DictConfig, Path, str]:
    """(run config, checkpoint directory, tag) for a run directory, a checkpoint directory or a tag
    directory; `tag` picks one other than the newest (DeepSpeed's `latest`)."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise CheckpointError(f"{p}: {'no such directory' if not p.exists() else 'not a directory'}; {EXPECTED}")
    if model_states(p):  # a tag directory
        if tag not in (None, p.name):
            raise CheckpointError(f"{p} is checkpoint {p.name}, but --tag {tag} was asked for")
        ckpt_dir, tag = p.parent, p.name
    else:
        if _is_ckpt_dir(p):
            ckpt_dir = p
        elif (p / "config.yaml").is_file():
            ckpt_dir = _ckpt_dir_of_run(p)
        else:
            raise CheckpointError(f"{p}: no config.yaml, no DeepSpeed `latest` file, no *model_states.pt; {EXPECTED}")
        tag = find_tag(ckpt_dir, tag)
    return _run_config(ckpt_dir, tag), ckpt_dir, tag


def step_of(tag: str) -> int | None:
    match = TAG.match(tag)
    return int(match.group(1)) if match else None


def fp32_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The student's fp32 master weights (Student.state_dict() keys; buffers from the module) from
    the checkpoint `tag` (default: DeepSpeed's `latest`) of `ckpt_dir`. No process group needed.
    An objective's own parameters (OBJECTIVE_MODULE) are left out: see fp32_objective_state_dict."""
    prefix = OBJECTIVE_MODULE + "."
    return {k: v for k, v in _fp32_engine_state(ckpt_dir, tag).items() if not k.startswith(prefix)}


def fp32_objective_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The fp32 masters of the objective's own parameters (CLIP-CID's learnable centres), names
    without the OBJECTIVE_MODULE prefix; empty when it trained none."""
    prefix = OBJECTIVE_MODULE + "."
    return {k[len(prefix):]: v for k, v in _fp32_engine_state(ckpt_dir, tag).items() if k.startswith(prefix)}


def _fp32_engine_state(ckpt_dir: str | Path, tag: str | None) -> dict[str, torch.Tensor]:
    ckpt_dir = Path(ckpt_dir)
    tag = find_tag(ckpt_dir, tag)
    tag_dir = ckpt_dir / tag
    shards = _optim_shards(tag_dir)
    if not shards:
        state = _stage0_state(tag_dir)
    elif ZERO_STAGE_KEY in _load(shards[0])["optimizer_state_dict"]:
        state = _zero_state(ckpt_dir, tag)
    else:
        state = _bf16_optimizer_state(tag_dir, shards)
    # Own storage per tensor: zero_to_fp32 returns views of one flat buffer, which safetensors refuses.
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}


def _load(path: Path) -> dict:
    with weights_only_reads(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _optim_shards(tag_dir: Path) -> list[Path]:
    """`*_optim_states.pt`, in rank order (zero_pp_rank_10 after zero_pp_rank_9)."""
    def rank(path: Path) -> int:
        match = re.search(r"zero_pp_rank_(\d+)_", path.name)
        return int(match.group(1)) if match else -1

    return sorted(tag_dir.glob("*optim_states.pt"), key=rank)


def _zero_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # its prints and progress bars would bury a command's own output
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                weights_only_reads(ckpt_dir / tag):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (ValueError, FileNotFoundError) as err:  # a missing or foreign shard
        raise CheckpointError(f"{ckpt_dir / tag}: cannot consolidate the ZeRO shards: {err}") from None
    finally:
        log.debug("zero_to_fp32: %s", chatter.getvalue())


def _checked(tag_dir: Path, sd: dict, masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's state with its parameters replaced by their fp32 masters, each checked to round to
    the half-precision weight the module trained with (a mis-named copy cannot pass)."""
    module, shared = sd["module"], dict(sd.get("shared_params") or {})
    params = [k for k in module if k not in set(sd.get("buffer_names") or ()) and k not in shared]
    if sorted(masters) != sorted(params):
        raise CheckpointError(f"{tag_dir}: the optimizer's fp32 copies do not match the module's parameters")
    state = dict(module)
    for name, master in masters.items():
        if master.shape != module[name].shape or not torch.equal(master.to(module[name].dtype), module[name]):
            raise CheckpointError(f"{tag_dir}: fp32 copy of {name} does not match the module's weights")
        state[name] = master
    for name, source in shared.items():
        state[name] = state[source]
    return state


def _stage0_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Stage 0: the FP16 optimizer's per-parameter fp32 copies, named in param_groups order."""
    sd = _load(model_states(tag_dir)[0])
    module, optim = sd["module"], sd.get("optimizer") or {}
    shared = dict(sd.get("shared_params") or {})
    names = [k for k in module if k not in set(sd.get("buffer_names") or ()) and k not in shared]
    groups = split_names((n, module[n].ndim) for n in names)
    if "fp32_groups" in optim:  # DeepSpeed's unfused FP16 optimizer (torch optimizers): per-parameter copies
        copies = optim["fp32_groups"]
    elif "fp32_groups_flat" in optim:  # its fused variant: one flat tensor per group
        from torch._utils import _unflatten_dense_tensors

        copies = [_unflatten_dense_tensors(flat, [module[n] for n in group])
                  for flat, group in zip(optim["fp32_groups_flat"], groups)]
    elif all(not v.is_floating_point() or v.dtype == torch.float32 for v in module.values()):
        copies = [[module[n] for n in group] for group in groups]  # fp32 training: the module is the master
    else:
        raise CheckpointError(f"{tag_dir}: half-precision weights without the optimizer's fp32 copies")
    if [len(c) for c in copies] != [len(g) for g in groups]:
        raise CheckpointError(f"{tag_dir}: the optimizer's fp32 groups do not match the student's parameters")
    return _checked(tag_dir, sd, {n: t for group, c in zip(groups, copies) for n, t in zip(group, c)})


def _bf16_optimizer_state(tag_dir: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    """ZeRO-1 with bf16 and fp32 gradient accumulation (`data_types.grad_accum_dtype: fp32`) runs
    DeepSpeed's BF16_Optimizer, whose shards zero_to_fp32 (0.19.8) rejects as "not a zero checkpoint".
    Layout: per group, the ranks' equal fp32 partitions concatenate to the parameters back to back,
    padded at the end only."""
    sd = _load(model_states(tag_dir)[0])
    partitions = [_load(f)["optimizer_state_dict"][FP32_PARTITIONS_KEY] for f in shards]
    masters = {}
    for g, shapes in enumerate(sd["param_shapes"]):
        flat, offset = torch.cat([p[g] for p in partitions]), 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            masters[name] = flat.narrow(0, offset, numel).view(shape)
            offset += numel
        if offset > flat.numel():
            raise CheckpointError(f"{tag_dir}: fewer fp32 elements than parameters in group {g}: a missing shard?")
    return _checked(tag_dir, sd, masters)


def student_from_state(cfg: RootConfig, state: dict[str, torch.Tensor]) -> Student:
    """The run's student (fp32, eval mode) holding `state`. The teacher's width is read off the
    projection, so no teacher weights are needed."""
    target_dim = state["image_proj.weight"].shape[0] if "image_proj.weight" in state else None
    heads = sorted((int(m.group(1)), state[k].shape[0]) for k in state
                   if (m := re.fullmatch(r"ensemble_proj\.(\d+)\.weight", k)))  # an ensemble's further teachers
    student = build_run_student(cfg.student, cfg.teacher, target_dim, init=False,
                                ensemble_dims=[dim for _, dim in heads])
    own = student.state_dict()
    if set(own) != set(state):
        raise CheckpointError(f"the checkpoint does not hold the student its config builds: missing "
                              f"{sorted(set(own) - set(state))[:5]}, unexpected {sorted(set(state) - set(own))[:5]}")
    # A 1-element parameter (the [1]-shaped logit scale) takes the module's own shape, whatever the writer kept.
    state = {k: v.reshape(own[k].shape) if v.numel() == 1 == own[k].numel() else v for k, v in state.items()}
    student.load_state_dict(state, strict=True)
    return student.float().eval()


def load_student(path: str | Path, tag: str | None = None) -> tuple[Student, DictConfig]:
    """(student in fp32 eval mode with the checkpoint's fp32 master weights, the run's config) for a
    run directory, checkpoint directory or tag directory (see resolve_checkpoint)."""
    cfg, ckpt_dir, tag = resolve_checkpoint(path, tag)
    return student_from_state(cfg, fp32_state_dict(ckpt_dir, tag)), cfg
