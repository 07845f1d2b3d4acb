"""The one precision policy: which dtype each role computes in on which device, and the names that
dtype goes by (config strings, open_clip's `precision=`, DeepSpeed's config section). Every
`precision: auto` in the configs is resolved here, from one table, so the answers cannot drift.

Why the table says what it says:
- teacher: frozen and only run forward, so half precision where the hardware computes it: fp16 on
  GPUs, bf16 on CPUs with native bf16 (AVX512-BF16, AMX, Arm's BF16), fp16 matmuls being slow or
  missing on CPUs.
- student: trained, so bf16 where the hardware has it (such CPUs, Ampere and later GPUs: no loss
  scaling); fp16 on older GPUs, which DeepSpeed then loss-scales.
- eval: fp16 on GPUs; fp32 on CPUs, where bf16 gains nothing and rounds the features.
- A CPU without native bf16 (AVX2-only x86, most laptops) emulates it, an order of magnitude
  slower than fp32 (docs/performance.md#precision), so every role runs fp32 there.
An explicit value (a config's `precision`, a DeepSpeed JSON's bf16/fp16 `enabled`) always wins."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16: the config string, DeepSpeed's section name and open_clip's precision=
    dtype: torch.dtype

    @property
    def half(self) -> bool:
        return self.dtype != torch.float32


PRECISIONS = {p.name: p for p in (Precision("fp32", torch.float32), Precision("bf16", torch.bfloat16),
                                  Precision("fp16", torch.float16))}
ROLES = ("teacher", "student", "eval")
# role -> (on CUDA, on a CPU with native bf16, on any other CPU)
AUTO = {"teacher": ("fp16", "bf16", "fp32"), "student": ("bf16", "bf16", "fp32"), "eval": ("fp16", "fp32", "fp32")}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo: x86 AVX512-BF16 and AMX, Arm BF16


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (torch's own probe, else the kernel's flags)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def precision_for(role: str, device: torch.device, precision: str = "auto") -> Precision:
    """The precision a role computes in on `device`; `precision` is a config value (auto or a name)."""
    if role not in AUTO:
        raise ValueError(f"unknown precision role {role!r}; one of {', '.join(ROLES)}")
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of auto, {', '.join(PRECISIONS)}")
        return PRECISIONS[precision]
    column = 0 if device.type == "cuda" else (1 if cpu_has_native_bf16() else 2)
    name = AUTO[role][column]
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = "fp16"  # pre-Ampere GPUs
    return PRECISIONS[name]


def lift_scalar_parameters(module: torch.nn.Module) -> int:
    """Give 0-dim parameters (open_clip's logit_scale/logit_bias) shape [1]: DeepSpeed broadcasts
    parameters as byte views, which 0-dim tensors cannot take. Broadcasting semantics in the model's
    own arithmetic are unchanged. Returns how many were lifted."""
    lifted = 0
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, torch.nn.Parameter(param.detach().reshape(1),
                                                        requires_grad=param.requires_grad))
                lifted += 1
    return lifted


class _Fp32Norm:
    """Mixed into a BatchNorm module's class: the layer computes in fp32 (its input, weight and bias
    cast up, its fp32 running statistics updated in fp32) and returns the input's dtype. DeepSpeed's
    half-precision engine casts parameters, not buffers: a BatchNorm with bf16 weights and fp32
    statistics is refused by torch, and statistics kept in bf16 would stall their running averages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        saved = {k: params[k] for k in ("weight", "bias") if params.get(k) is not None}
        try:
            for key, p in saved.items():
                params[key] = p.float()  # a view in the graph: the gradient reaches the half parameter
            return super().forward(x.float()).to(x.dtype)
        finally:
            params.update(saved)


@functools.cache
def _fp32_class(cls: type) -> type:
    return type(f"Fp32{cls.__name__}", (_Fp32Norm, cls), {})


def batchnorm_in_fp32(module: torch.nn.Module) -> int:
    """Make every BatchNorm layer of `module` (torch's and timm's BatchNormAct) compute in fp32, its
    running statistics fp32 buffers, whatever dtype the parameters train in. State-dict keys and
    isinstance checks are unchanged. Returns how many layers."""
    count = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, _Fp32Norm):
            m.__class__ = _fp32_class(type(m))
            if m.running_mean is not None:
                m.running_mean.data, m.running_var.data = m.running_mean.float(), m.running_var.float()
            count += 1
    return count
