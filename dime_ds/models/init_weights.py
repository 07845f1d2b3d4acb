"""A student's image tower started from a local weights file: a timm state dict (the tower's
`trunk.`), an OpenCLIP one (`visual.`), or the tower's own keys. The key layout that matches the most
tensors of the right shape is used; what matched, what the tower kept at random and what the file
had besides are logged, and a file that matches nothing is refused."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dime_ds.errors import UserError

log = logging.getLogger(__name__)

# file key -> tower key; None: not the tower's
LAYOUTS: dict[str, Callable[[str], str | None]] = {
    "tower": lambda k: k,
    "OpenCLIP model (visual.)": lambda k: k[len("visual."):] if k.startswith("visual.") else None,
    "timm model (trunk.)": lambda k: f"trunk.{k}",
}
WRAPPERS = ("state_dict", "model", "module")  # checkpoint dicts that hold the state dict under a key
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class InitWeightsError(UserError, ValueError):
    """A student.init_image file that cannot start the image tower."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InitWeightsError(f"student.init_image={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle a foreign file
    except Exception as err:  # noqa: BLE001 - any reader's failure is the file's
        raise InitWeightsError(f"student.init_image={path}: not a weights file ({type(err).__name__}: {err})") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in WRAPPERS:
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitWeightsError(f"student.init_image={path}: holds no state dict of tensors")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_image_tower(visual: nn.Module, path: str | Path) -> dict:
    """Copy the matching tensors of `path` into `visual`; returns the report that is logged."""
    state = read_state_dict(path)
    own = visual.state_dict()
    best = None
    for layout, to_tower in LAYOUTS.items():
        mapped = {t: v for k, v in state.items() if (t := to_tower(k)) is not None}
        matched = {t: v for t, v in mapped.items() if t in own and own[t].shape == v.shape}
        if best is None or len(matched) > len(best[1]):
            best = (layout, matched, mapped)
    layout, matched, mapped = best
    if not matched:
        raise InitWeightsError(f"student.init_image={path}: none of its {len(state)} tensors fits the image tower "
                               f"({type(visual).__name__}; file keys like {sorted(state)[:3]}, tower keys like "
                               f"{sorted(own)[:3]})")
    visual.load_state_dict(matched, strict=False)
    report = {"file": str(path), "layout": layout, "matched": len(matched), "tower_tensors": len(own),
              "random": sorted(set(own) - set(matched)),
              "shape_mismatch": sorted(t for t in mapped if t in own and own[t].shape != mapped[t].shape),
              "unused": sorted(set(mapped) - set(own))}
    log.info("student.init_image: %d of %d image-tower tensors from %s (%s layout); %d left random%s; "
             "%d of the file's unused%s", report["matched"], report["tower_tensors"], path, layout,
             len(report["random"]), f" ({', '.join(report['random'][:5])}...)" if report["random"] else "",
             len(report["unused"]) + len(report["shape_mismatch"]),
             f" (shape differs: {', '.join(report['shape_mismatch'][:5])})" if report["shape_mismatch"] else "")
    return report
