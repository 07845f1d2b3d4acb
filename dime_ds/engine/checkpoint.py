"""DeepSpeed checkpoints with client state: step, every rank's data-stream positions and RNG
states, the resolved config. Tags are `step_00000042`; the `latest` file names the newest complete
one, so a run killed mid-save resumes from the one before.

A save that fails part-way (a full disk, ENOSPC; any OSError of a write) on any rank is a failed
save on every rank: DeepSpeed's own collectives still run to their end (a failed file write is
recorded, not raised, inside it), then the incomplete tag is removed, `latest` is left naming the
previous checkpoint, and every rank raises CheckpointWriteError. `latest` is written by rank 0 only
once every rank's files are complete, atomically and durably (dime_ds.atomic), and keep_last prunes
only after that, never the checkpoint `latest` names.

The layout (a checkpoint directory holding `latest` and tag directories of DeepSpeed's
*model_states.pt and *optim_states.pt) is read by find_tag alone: resume and consolidation resolve a
tag, and fail, the same way."""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dime_ds import atomic
from dime_ds.distributed import collectives as C
from dime_ds.errors import UserError

log = logging.getLogger(__name__)
TAG = re.compile(r"^step_(\d{8})$")
# The submodule of the engine's module holding an objective's own parameters (CLIP-CID's learnable
# centres): saved and resumed with the student, stripped from its consolidated weights.
OBJECTIVE_MODULE = "objective_params"


# What a dime_ds DeepSpeed checkpoint holds besides tensors and builtins: DeepSpeed's plain state
# classes, and numpy arrays (the numpy RNG state in our client state). Nothing callable.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
)


LAYOUT_FILE = "engine_layout.json"  # beside DeepSpeed's files in a tag: how the engine held its state
LATEST = "latest"  # DeepSpeed's file naming the newest complete tag of a checkpoint directory


class CheckpointError(UserError, FileNotFoundError):
    """A path that holds no usable dime_ds checkpoint; the message names it and what is missing."""


def model_states(tag_dir: Path) -> list[Path]:
    """DeepSpeed's `*model_states.pt` files of a tag directory: present in every complete tag."""
    return sorted(tag_dir.glob("*model_states.pt"))


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """The tag directories of `ckpt_dir` that hold DeepSpeed's model states, sorted."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and model_states(p))


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, unchecked; None without a `latest` file."""
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def find_tag(ckpt_dir: str | Path, tag: str | None = None, *, missing_ok: bool = False) -> str | None:
    """The checkpoint `tag` of `ckpt_dir`, or (None, LATEST) the one its `latest` file names, checked to
    be a tag directory holding DeepSpeed's model states. No `latest` file: None when `missing_ok` (no
    checkpoint saved yet), else CheckpointError; a tag that is not there: CheckpointError, naming the
    directory, what is missing and the tags it holds."""
    ckpt_dir = Path(ckpt_dir)
    if tag in (None, LATEST):
        tag = read_latest(ckpt_dir)
        if tag is None:
            if missing_ok:
                return None
            raise _missing(ckpt_dir, f"no DeepSpeed `{LATEST}` file (no complete checkpoint); choose a tag")
        if not tag or not model_states(ckpt_dir / tag):
            raise _missing(ckpt_dir, f"its `{LATEST}` file names {tag!r}, which is not a complete checkpoint "
                                     f"(no {tag or '<tag>'}/*model_states.pt); choose a tag")
    elif not model_states(ckpt_dir / tag):
        # `none` or `false` reach here as strings: Hydra's word for no value is `null`.
        hint = "; to start without resuming: ckpt.resume=null" if tag.lower() in _NO_RESUME_WORDS else ""
        raise _missing(ckpt_dir, f"no checkpoint {tag} (no {tag}/*model_states.pt)", hint)
    return tag


_NO_RESUME_WORDS = {"none", "false", "no", "off", "0"}


def _missing(ckpt_dir: Path, what: str, hint: str = "") -> CheckpointError:
    tags = ", ".join(checkpoint_tags(ckpt_dir))
    held = f"tags in it: {tags}" if tags else "it holds no checkpoint"
    return CheckpointError(f"{ckpt_dir}: {what}; {held}{hint}")


class CheckpointLayoutError(UserError, ValueError):
    """A checkpoint written by an engine of another ZeRO stage or precision: DeepSpeed cannot load it
    (it fails deep inside its optimizer with a TypeError)."""


def engine_layout(engine) -> dict:
    return {"zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
            "fp16": bool(engine.fp16_enabled())}


def _describe(layout: dict) -> str:
    dtype = "bf16" if layout["bf16"] else "fp16" if layout["fp16"] else "fp32"
    return f"ZeRO stage {layout['zero_stage']}, {dtype}"


def check_layout(engine, ckpt_dir: Path, tag: str) -> None:
    """Refuse, naming both, a checkpoint whose engine layout differs from this run's (a checkpoint
    with no layout record is loaded unchecked)."""
    path = ckpt_dir / tag / LAYOUT_FILE
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), engine_layout(engine)
    if saved != now:
        raise CheckpointLayoutError(
            f"checkpoint {tag} in {ckpt_dir} was written by an engine with {_describe(saved)}; this run's engine "
            f"has {_describe(now)}. Resume with the dist.ds_config (and precision) it was written with (auto is "
            f"zero0 on one rank, zero1 on more: a run begun alone resumes on more ranks with "
            f"dist.ds_config=zero0), or start a new run (another name= or run_dir=)")


class CheckpointWriteError(UserError, OSError):
    """A checkpoint that could not be written (disk full, quota, I/O error); the previous one stays."""


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint file that holds objects a weights-only load refuses (it was not written by dime_ds)."""


@contextlib.contextmanager
def weights_only_reads(where: str | Path):
    """Every torch.load inside, DeepSpeed's own included (they pass weights_only=False), runs with
    weights_only=True and only CHECKPOINT_GLOBALS allowed: a checkpoint is never unpickled freely."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([_resolve(g) for g in CHECKPOINT_GLOBALS]):
            yield
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointError(f"{where}: refused to load: it holds objects no dime_ds checkpoint holds "
                                    f"(weights-only load: {first})") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, ckpt_dir: str | Path, step: int, rank_state: dict, config_yaml: str, keep_last: int) -> str:
    """Collective: every rank calls it. Rank r's `rank_state` is stored at index r. Raises
    CheckpointWriteError on every rank when any rank's write failed (see the module docstring)."""
    from dime_ds.distributed.stage import raise_agreed

    tag, ckpt_dir = tag_for(step), Path(ckpt_dir)
    if C.is_main() and (ckpt_dir / tag).exists():
        # An earlier run's checkpoint of this step (a rerun under the same name): DeepSpeed writes over
        # its files but leaves those another layout named otherwise, which consolidation would then mix.
        log.warning("replacing %s, an earlier run's checkpoint", ckpt_dir / tag)
        shutil.rmtree(ckpt_dir / tag)
    ranks = C.all_gather_object({**rank_state, "rng": rng_state()})  # also: no rank writes before the removal
    failures: list[tuple[str, OSError]] = []
    with _write_failures_recorded(engine, failures):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                               client_state={"step": step, "ranks": ranks, "config": config_yaml})
    complete = C.reduce_scalar(1.0 if failures else 0.0, op="max") == 0  # every rank's files written
    if C.is_main():
        target = ckpt_dir / tag / LAYOUT_FILE
        try:
            if complete:
                atomic.write_json(target, engine_layout(engine), indent=None)
                target = ckpt_dir / LATEST
                atomic.write_text(target, tag)
        except OSError as err:
            failures.append((str(target), err))
        if complete and not failures:
            _prune(ckpt_dir, keep_last, tag)
        else:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # never half a checkpoint under a tag name
    error = None
    if failures:
        path, err = failures[0]
        previous = read_latest(ckpt_dir)  # unchecked: raising here, on rank 0 alone, would strand the others
        error = CheckpointWriteError(
            f"checkpoint {tag} could not be written in {ckpt_dir}: {path}: {err.strerror or err}; "
            + (f"{previous} stays the latest (ckpt.resume=latest takes it)" if previous else "no checkpoint was kept"))
    raise_agreed(error, f"saving checkpoint {tag}", keep=(CheckpointWriteError,))  # also the barrier
    log.info("checkpoint %s saved in %s", tag, ckpt_dir)
    return tag


@contextlib.contextmanager
def _write_failures_recorded(engine, failures: list):
    """DeepSpeed's file writes record an OSError in `failures` instead of raising it (after the first,
    nothing more is written): the ranks' collectives inside save_checkpoint still match."""
    writer = engine.checkpoint_engine
    original = writer.save

    def save(state_dict, path, *args, **kwargs):
        if failures:
            return None
        try:
            return original(state_dict, path, *args, **kwargs)
        except OSError as err:
            log.error("rank %d: writing %s failed: %s", C.rank(), path, err)
            failures.append((str(path), err))
            return None

    writer.save = save
    try:
        yield
    finally:
        del writer.save  # the class's method again


def _prune(ckpt_dir: Path, keep_last: int, latest: str) -> None:
    """Keep the last `keep_last` tags up to `latest` (complete, just written); a later tag left by a
    killed run is incomplete and overwritten when its step comes again."""
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name) and p.name <= latest)
    for old in tags[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_tag(ckpt_dir: str | Path, resume: str) -> str | None:
    """ckpt.resume -> the tag to load: `latest` the one DeepSpeed's latest file names, None when there is
    no checkpoint yet (find_tag)."""
    return find_tag(ckpt_dir, resume, missing_ok=True)


def load(engine, ckpt_dir: str | Path, resume: str | None, rank: int) -> tuple[int, dict | None]:
    """(step to start from, this rank's saved state) — (0, None) when there is nothing to resume."""
    if not resume:
        return 0, None
    tag = resolve_tag(ckpt_dir, resume)
    if tag is None:
        log.info("ckpt.resume=%s: no checkpoint in %s yet, starting from step 0", resume, ckpt_dir)
        return 0, None
    check_layout(engine, Path(ckpt_dir), tag)
    with weights_only_reads(Path(ckpt_dir) / tag):
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    ranks = client["ranks"]
    if len(ranks) != C.world_size():
        raise RuntimeError(f"checkpoint {tag} was written by {len(ranks)} ranks; resuming needs the same "
                           f"world size for exact data positions")
    state = ranks[rank]
    set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", path, client["step"])
    return int(client["step"]), state
