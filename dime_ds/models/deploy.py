"""Deployment form of a model: towers that train with parallel branches and BatchNorm (MobileOne,
FastViT / MobileCLIP's MCi, RepViT, ...) fold them into single convolutions for inference, with
timm's own helper (`timm.utils.reparameterize_model`: each submodule's `fuse()`, `reparameterize()`
or `switch_to_deploy()`), as MobileCLIP does before it exports. Any other tower (ViT, OpenCLIP's
ResNet, ConvNeXt, ...) has no deploy form and is returned as it is.

The folded model computes what the trained form computes in eval mode (BatchNorm from its running
statistics), up to float rounding; it cannot be trained on or saved as an OpenCLIP model directory
(open_clip rebuilds the training form from the config), so exported directories keep the training
form and only the ONNX files (models/onnx_export.py) are folded."""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

# The methods timm's helper calls; a module with one of them has a deploy form.
DEPLOY_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


class Deployed(NamedTuple):
    model: nn.Module
    folded: list[str]  # names of the submodules that were folded; [] when the model has no deploy form
    kinds: list[str]  # their classes (MobileOneBlock, RepMixer, ...), each once


def foldable_modules(model: nn.Module) -> list[str]:
    """Names of the submodules timm's helper would fold (the root itself is never folded)."""
    return [name for name, module in model.named_modules()
            if name and any(callable(getattr(module, m, None)) for m in DEPLOY_METHODS)]


def deploy_form(model: nn.Module) -> Deployed:
    """The deploy form of `model` (an OpenCLIP model, an image tower, a Student): a folded copy in
    eval mode, `model` left untouched; or `model` itself, mode unchanged, when nothing folds (no
    copy of a large tower that has no deploy form)."""
    folded = foldable_modules(model)
    if not folded:
        return Deployed(model, [], [])
    from timm.utils import reparameterize_model

    modules = dict(model.named_modules())
    kinds = sorted({type(modules[name]).__name__ for name in folded})
    return Deployed(reparameterize_model(model, inplace=False).eval(), folded, kinds)
