"""The OpenCLIP model directory (open_clip_config.json + open_clip_model.safetensors): the layout of
OpenCLIP models on the HF hub, which `open_clip.create_model_and_transforms('local-dir:<dir>')`
loads with no dime_ds code. Demo teacher and exported students are written this way."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from dime_ds import atomic

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def save_openclip_dir(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any],
                      preprocess_cfg: Mapping[str, Any], out_dir: str | os.PathLike,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Write weights first and the config last, each atomically: a directory with a config is whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic.replacing(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a shared model directory must be readable
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg)}
    if extra:
        config["dime_ds"] = dict(extra)
    atomic.write_json(out / CONFIG_NAME, config, indent=2, sort_keys=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_openclip_dir(model_dir: str | os.PathLike) -> dict:
    """The parsed open_clip_config.json of a model directory."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an OpenCLIP model directory")
    return json.loads(path.read_text())
