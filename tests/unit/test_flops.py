"""The FLOP count behind perf/model_tflops_per_device and perf/mfu: exact on a matrix product, and
on a ViT what the architecture's shapes say, forward and backward."""
from __future__ import annotations

import torch

from dime_ds.config import load_config
from dime_ds.models.flops import ModelFlops, count_flops, student_flops, teacher_flops
from dime_ds.models.student import build_student, student_model_cfg


def test_a_linear_layer_counts_two_flops_per_multiply_add():
    layer, x = torch.nn.Linear(64, 32, bias=False), torch.zeros(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32


def test_a_vit_forward_counts_its_linear_layers_and_the_backward_about_twice_that():
    cfg = load_config(["experiment=demo"])
    model_cfg = student_model_cfg(cfg.student)
    student = build_student(cfg.student)
    vision = model_cfg["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    linear = sum(m.weight.numel() for m in student.visual.transformer.modules() if isinstance(m, torch.nn.Linear))
    in_proj = sum(b.attn.in_proj_weight.numel() for b in student.visual.transformer.resblocks)
    lower = 2 * tokens * (linear + in_proj)  # every token through every projection and MLP matrix

    images = torch.zeros(2, 3, vision["image_size"], vision["image_size"])
    forward = count_flops(lambda: student.encode_image(images)) // 2
    assert lower <= forward <= 1.3 * lower, (lower, forward)  # + patch embedding, attention, head
    both = student_flops(lambda: build_student(cfg.student), with_text=False)
    # backward: twice a matrix product forward, 2.5x for attention (its recomputation); the patch conv
    # takes no input gradient
    assert 2.5 * forward <= both <= 3.2 * forward, (forward, both)


def test_a_teacher_counts_its_forward_only_and_mfu_divides_by_the_peak():
    cfg = load_config(["experiment=demo_teacher"])
    model_cfg = student_model_cfg(cfg.student)
    forward = teacher_flops(model_cfg)
    assert forward > 0
    flops = ModelFlops(student=3 * forward, teacher=forward)
    out = flops.readout(samples_per_s_per_device=1e6, peak_tflops=2 * flops.per_sample / 1e6)
    assert out["perf/model_tflops_per_device"] == flops.per_sample / 1e6
    assert out["perf/mfu"] == 0.5
    assert "perf/mfu" not in flops.readout(1.0, None)
