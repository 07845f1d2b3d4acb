"""Consolidation on 2 gloo ranks, ZeRO 0 (bf16, no ZeRO) to 3 and ZeRO-1 under BF16_Optimizer: the
fp32 state read back from the checkpoint shards by one process without a process group (what
final/student.safetensors and export hold) equals the fp32 master weights the live engines hold at
the end of training, gathered here through DeepSpeed's own accessors, bit for bit, and is not the
bf16 module copy."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dime_ds.config import load_config
from dime_ds.engine.consolidate import fp32_state_dict, load_student
from dime_ds.engine.ds_config import ds_config_path
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks

pytestmark = pytest.mark.slow


def _live_fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The reference: the optimizer's fp32 masters as the live engine holds them (collective under
    ZeRO 1-3). Stage 0's FP16 optimizers keep theirs outside the parameters' hooks."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    opt, stage0 = engine.optimizer, {}
    if isinstance(opt, FP16_UnfusedOptimizer):
        stage0 = {id(p): h for low, high in zip(opt.fp16_groups, opt.fp32_groups) for p, h in zip(low, high)}
    elif isinstance(opt, FP16_Optimizer):
        for low, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            stage0.update({id(p): h for p, h in zip(low, _unflatten_dense_tensors(flat, low))})
    params = dict(engine.module.named_parameters(remove_duplicate=False))
    masters = {}
    for name, param in params.items():  # the same order on every rank: each call may be a collective
        master = stage0.get(id(param))
        if master is None:
            master = safe_get_full_fp32_param(param)
        masters[name] = master.reshape(getattr(param, "ds_shape", param.shape)).detach().float().cpu().clone()
    return masters


def _train(rank, world_size, overrides):
    from dime_ds.engine import loop
    from dime_ds.training import run_training

    live = {}
    train = loop.Trainer.train

    def train_and_keep_masters(trainer):
        summary = train(trainer)
        live.update(_live_fp32_masters(trainer.engine))
        return summary

    loop.Trainer.train = train_and_keep_masters
    try:
        return run_training(load_config(overrides)), live
    finally:
        loop.Trainer.train = train


def _bf16_config(tmp_path, stage: str) -> str:
    """The shipped `stage` JSON with bf16 on whatever the CPU (these layouts are what is tested);
    zero1_fp32_accum adds fp32 gradient accumulation: DeepSpeed's BF16_Optimizer, another layout."""
    shipped = stage.removesuffix("_fp32_accum")
    cfg = json.loads(ds_config_path(shipped).read_text())
    cfg["bf16"] = {"enabled": True}
    if stage.endswith("_fp32_accum"):
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    (tmp_path / f"{stage}_bf16.json").write_text(json.dumps(cfg))
    return str(tmp_path / f"{stage}_bf16.json")


# student.text=own covers its [1]-shaped logit scale, partitioned under ZeRO-3.
@pytest.mark.parametrize("ds_config, text", [("zero0", "teacher"), ("zero1", "own"), ("zero1_fp32_accum", "teacher"),
                                             ("zero2", "teacher"), ("zero3", "own")])
def test_consolidated_fp32_equals_the_masters_gathered_in_training(tmp_path, tiny_world, tiny_teacher_dir,
                                                                   ds_config, text):
    ds_json = _bf16_config(tmp_path, ds_config)
    overrides = engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"dist.ds_config={ds_json}",
                                 f"student.text={text}")
    results = run_ranks(_train, 2, overrides, timeout=300)
    assert [s["status"] for s, _ in results] == ["completed", "completed"]
    run_dir = tmp_path / "runs" / "demo"
    masters = results[0][1]
    assert masters and results[1][1].keys() == masters.keys()
    final = load_file(str(run_dir / "final" / "student.safetensors"))
    state = fp32_state_dict(run_dir / "checkpoints")
    assert state.keys() == final.keys() and set(masters) <= set(state)  # buffers come from the module
    for key, value in masters.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key
        assert torch.equal(final[key], value), key
    # bf16 weights cast to fp32 are bf16-representable; trained fp32 masters are not.
    representable = [k for k, v in masters.items() if torch.equal(v, v.bfloat16().float())]
    assert len(representable) < len(masters) / 10, representable
    # and they are the masters of the weights the module trained with (unpartitioned below ZeRO-3)
    if ds_config != "zero3":
        states = torch.load(run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)  # written by this test's own run
        for key, value in states["module"].items():
            assert value.dtype == torch.bfloat16 and torch.equal(final[key].bfloat16(), value), key

    student, cfg = load_student(run_dir)
    assert cfg.dist.ds_config == ds_json and student.text_mode == text
    for key, value in student.state_dict().items():
        assert torch.equal(value, final[key]), key
    if text == "own":
        assert student.logit_scale.shape == (1,)
