"""Shared fixtures: a tiny synthetic world and tiny OpenCLIP model configs (no downloads)."""
from __future__ import annotations

import copy
import os

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never wait on the network

TINY_WORLD = dict(seed=3, image_size=32, n_images=64, n_texts=96, describing_fraction=0.25, n_paired=96,
                  n_eval=32, shard_size=32, second_object_p=0.3)

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "mlp_ratio": 2.0},
}


def tiny_model_cfg(embed_dim: int = 32, width: int = 32) -> dict:
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["embed_dim"] = embed_dim
    cfg["vision_cfg"]["width"] = width
    cfg["text_cfg"]["width"] = width
    return cfg


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from dime_ds.config.demo_schema import SyntheticConfig
    from dime_ds.demo.synthetic import write_world

    out = tmp_path_factory.mktemp("tiny_world")
    write_world(out, OmegaConf.structured(SyntheticConfig(**TINY_WORLD)), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A random tiny CLIP saved as an OpenCLIP model directory: enough to exercise every teacher path."""
    import open_clip
    import torch

    from dime_ds.models import save_openclip_dir
    from dime_ds.models.student import student_preprocess_cfg

    out = tmp_path_factory.mktemp("tiny_teacher")
    cfg = tiny_model_cfg(embed_dim=32, width=32)
    cfg["text_cfg"]["context_length"] = 32
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_openclip_dir(model.state_dict(), cfg, student_preprocess_cfg(cfg), out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_b_dir(tmp_path_factory):
    """A second tiny teacher for ensembles: another seed, another width (24) and text context (16)."""
    import open_clip
    import torch

    from dime_ds.models import save_openclip_dir
    from dime_ds.models.student import student_preprocess_cfg

    out = tmp_path_factory.mktemp("tiny_teacher_b")
    cfg = tiny_model_cfg(embed_dim=24, width=32)
    torch.manual_seed(1)
    model = open_clip.CLIP(**cfg)
    save_openclip_dir(model.state_dict(), cfg, student_preprocess_cfg(cfg), out)
    return out


def ensemble_override(*teachers: str) -> str:
    """ensemble.teachers=[...] for teacher sections written as `key:value,...` strings."""
    return "ensemble.teachers=[" + ",".join("{" + t + "}" for t in teachers) + "]"


def engine_overrides(work_dir, world_dir, teacher_dir, *extra: str) -> list[str]:
    """A seconds-long distillation run on the tiny world (demo student: 64-d, so it is projected), in
    the precision policy's choice for this CPU (the demo itself pins fp32): bf16 where it is native."""
    return ["experiment=demo", "student.precision=auto", "teacher.precision=auto", f"work_dir={work_dir}",
            f"data.root={world_dir}", f"data.texts={world_dir}/texts",
            f"teacher.arch=local-dir:{teacher_dir}", "optim.steps=3", "optim.warmup_steps=1",
            "optim.global_batch_size=16", "data.workers=0", "data.shuffle_buffer=8", "log.progress=false",
            "log.every_n_steps=1", "eval.every_n_steps=0", "eval.workers=0", "ckpt.every_n_steps=0", *extra]
