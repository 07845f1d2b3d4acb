"""CLIP-loss training from scratch on image-caption shards, in one process: how `make demo` makes
its teacher. The result is an OpenCLIP model directory that later stages load like any hub model."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dime_ds.data.loaders import paired_batches
from dime_ds.data.pipelines import image_transform
from dime_ds.data.shards import list_shards, sha256_file
from dime_ds.engine.param_groups import param_groups
from dime_ds.engine.schedule import lr_at
from dime_ds.losses.functional import clip_loss
from dime_ds.models import (build_student, read_openclip_dir, resolve_device, save_openclip_dir,
                            student_preprocess_cfg, student_tokenizer)

log = logging.getLogger(__name__)


def recipe_hash(cfg: Any) -> str:
    """What determines the trained model: architecture, data, loss, optimiser, seed."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("student", "loss", "optim")}
    # The data by content, so a regenerated world retrains the teacher.
    parts["data"] = {"paired": [sha256_file(p) for p in list_shards(cfg.data.paired)],
                     "augment": cfg.data.augment, "crop_scale_min": cfg.data.crop_scale_min}
    parts["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def is_current(out_dir: Path, cfg: Any) -> bool:
    try:
        return read_openclip_dir(out_dir).get("dime_ds", {}).get("recipe") == recipe_hash(cfg)
    except FileNotFoundError:
        return False


def pretrain_clip(cfg: Any, out_dir: str | Path) -> dict:
    """Train `cfg.student` (text=own) with the CLIP loss on `cfg.data.paired`; save to `out_dir`.
    Returns a summary (steps, final loss, samples/s, wall time)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student).to(device).train()
    preprocess = student_preprocess_cfg(model.model_cfg)
    transform = image_transform(preprocess, train=cfg.data.augment, crop_scale_min=cfg.data.crop_scale_min)
    batch = cfg.optim.global_batch_size
    batches = paired_batches(list_shards(cfg.data.paired), transform, student_tokenizer(model), batch,
                             seed=cfg.seed, workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    steps, start, loss_value = cfg.optim.steps, time.time(), float("nan")
    bar = tqdm(total=steps, desc=f"pretrain {cfg.name}", disable=not cfg.log.progress, dynamic_ncols=True)
    for step in range(steps):
        pair = next(batches)
        images, tokens = pair["images"], pair["tokens"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim)
        loss = clip_loss(model.encode_image(images.to(device)), model.encode_text(tokens.to(device)),
                         model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr_at(step, cfg.optim):.2e}")
        if bar.disable and (step + 1) % (10 * cfg.log.every_n_steps) == 0:  # logs instead of a bar
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, steps, loss_value, lr_at(step, cfg.optim))
    bar.close()
    batches.close()
    wall = time.time() - start
    summary = {"steps": steps, "final_loss": loss_value, "samples_per_s": steps * batch / wall, "wall_s": wall,
               "recipe": recipe_hash(cfg)}
    state, model_cfg = model.openclip_state()
    save_openclip_dir(state, model_cfg, preprocess, out_dir, extra=summary)
    log.info("saved %s: %s", out_dir, summary)
    return summary
