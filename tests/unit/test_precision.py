"""The one precision policy: every role's `auto` from one table, on CPUs with and without native
bf16 and on (simulated) GPUs; and the DeepSpeed JSON's explicit choice winning over it."""
from __future__ import annotations

import json

import pytest
import torch

from dime_ds.models import precision as P
from dime_ds.models.precision import precision_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool):
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: value)
    return set_native


def test_auto_on_cpus_with_native_bf16(native_bf16):
    native_bf16(True)
    assert precision_for("teacher", CPU).dtype == torch.bfloat16  # fp16 matmuls are slow or missing on CPUs
    assert precision_for("student", CPU).name == "bf16"
    assert precision_for("eval", CPU).dtype == torch.float32


def test_auto_on_cpus_that_emulate_bf16_is_fp32(native_bf16):
    native_bf16(False)
    assert {precision_for(role, CPU).name for role in P.ROLES} == {"fp32"}


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


def test_native_bf16_probe_reads_the_cpu_flags(monkeypatch, tmp_path):
    """Without torch's own probes, /proc/cpuinfo's flags decide (x86 avx512_bf16 / amx_bf16, Arm bf16)."""
    import builtins

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    real_open = builtins.open
    for flags, want in (("fpu sse avx2", False), ("fpu avx2 avx512f avx512_bf16", True), ("fp asimd bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open",
                            lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k))
        P.cpu_has_native_bf16.cache_clear()
        assert P.cpu_has_native_bf16() is want, flags
    P.cpu_has_native_bf16.cache_clear()


def test_a_deepspeed_json_that_enables_bf16_wins(tmp_path):
    from dime_ds.config.schema import OptimConfig
    from dime_ds.engine.ds_config import build_ds_config, ds_config_path, engine_precision

    optim = OptimConfig(global_batch_size=8)
    assert engine_precision(build_ds_config("zero1", optim, 1, "fp32")) == "fp32"  # "auto": the policy's
    assert engine_precision(build_ds_config("zero1", optim, 1, "bf16")) == "bf16"
    cfg = json.loads(ds_config_path("zero1").read_text())
    cfg["bf16"] = {"enabled": True}
    (tmp_path / "bf16.json").write_text(json.dumps(cfg))
    assert engine_precision(build_ds_config(str(tmp_path / "bf16.json"), optim, 1, "fp32")) == "bf16"
