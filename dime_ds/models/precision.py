"""Which device and which half precision: fp16 on GPUs, bf16 on CPUs (fp16 matmuls are slow or
missing there). The same code path runs on both; only these two answers differ."""
from __future__ import annotations

import torch

OPEN_CLIP_PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for, but torch sees no CUDA device; use device=cpu")
    return torch.device(device)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and bf16 elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


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
