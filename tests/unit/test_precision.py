"""The one precision policy: every role's `auto` from one table, on CPUs and (simulated) GPUs."""
from __future__ import annotations

import pytest
import torch

from dime_ds.models.precision import precision_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_on_cpu():
    assert precision_for("teacher", CPU).dtype == torch.bfloat16  # fp16 matmuls are slow or missing on CPUs
    assert precision_for("student", CPU).name == "bf16"
    assert precision_for("eval", CPU).dtype == torch.float32


@pytest.mark.parametrize("bf16_ok, student", [(True, "bf16"), (False, "fp16")])
def test_auto_on_gpus(monkeypatch, bf16_ok, student):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert precision_for("teacher", CUDA).name == "fp16"
    assert precision_for("eval", CUDA).name == "fp16"
    assert precision_for("student", CUDA).name == student


def test_explicit_values_win_and_typos_are_named():
    assert precision_for("eval", CUDA, "fp32").dtype == torch.float32
    assert precision_for("teacher", CPU, "fp16").dtype == torch.float16
    with pytest.raises(ValueError, match="'fp61'"):
        precision_for("teacher", CPU, "fp61")
    with pytest.raises(ValueError, match="'trainer'"):
        precision_for("trainer", CPU)
