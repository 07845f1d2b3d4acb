"""K fixed augmented views per image, the idea of MobileCLIP's reinforced datasets: the embed stage
stores, per image, K views' parameters and the teacher's embedding of each; distillation picks one
view per (image, epoch) and re-applies exactly its parameters for the student, so a cached teacher
sees the very crop the student sees.

Recipe `rrc_flip` version 1: a view is a random-resized-crop box in ORIGINAL-image pixels (x0, y0,
w, h) with area share in [data.crop_scale_min, 1] and aspect ratio in [3/4, 4/3] (as training's
RandomResizedCrop), and a horizontal flip (0/1). View 0 is the plain centre view: the centred square
of side min(width, height), unflipped (what the eval transform's resize + centre crop shows for a
square model input, resampled once instead of twice). A view's parameters come from (seed, image
key, view index) alone, through a hash-seeded generator: no global RNG state, so every rank, restart
and shard split draws the same views. Re-applying a view = crop the box, resize to the model's input
size (its own filter), flip, normalise: `apply_view`, used by the embed stage at the teacher's
preprocessing and by the image stream at the student's.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torchvision.transforms import functional as TF

from dime_ds.data.pipelines import SampleError, interpolation, preprocess_size

RECIPE = "rrc_flip"
RECIPE_VERSION = 1
PARAMS = ("x0", "y0", "w", "h", "flip")  # the columns of a view-parameter array (int32)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10  # boxes drawn before falling back to the largest fitting one (RandomResizedCrop's rule)
CHOICES = ("random", "round_robin")


def _key_words(key: str) -> list[int]:
    """Two 32-bit words of blake2b(key): a stable, well-mixed stand-in for the key in a seed."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _random_box(rng: np.random.Generator, width: int, height: int, scale_min: float) -> tuple[int, int, int, int]:
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(_ATTEMPTS):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # No box fitted: the whole image, cut to the nearest allowed aspect ratio, centred.
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ViewRecipe:
    """How a K-view cache was (or is to be) made: K, the crop scale and the seed of the parameters."""

    views: int
    scale_min: float
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ViewRecipe | None":
        """The run's request (embed.views, data.crop_scale_min, embed.seed); None for K=1: no views."""
        if int(cfg.embed.views) <= 1:
            return None
        return cls(int(cfg.embed.views), float(cfg.data.crop_scale_min), int(cfg.embed.seed))

    def recipe(self) -> dict:
        """What the manifest records and a run must match: name, version and the recipe's knobs."""
        return {"name": RECIPE, "version": RECIPE_VERSION, "scale_min": self.scale_min, "ratio": list(RATIO)}

    def params(self, key: str, width: int, height: int) -> np.ndarray:
        """int32[views, 5] (x0, y0, w, h, flip) of image `key`, `width` x `height` pixels."""
        out = np.empty((self.views, len(PARAMS)), dtype=np.int32)
        out[0] = (*centre_box(width, height), 0)
        words = _key_words(key)
        for v in range(1, self.views):
            rng = np.random.default_rng([self.seed, *words, v])
            box = _random_box(rng, width, height, self.scale_min)
            out[v] = (*box, int(rng.random() < 0.5))
        return out


def check_cache_views(cache, wanted: "ViewRecipe | None", key: str = "teacher.cache_dir") -> None:
    """Refuse an image cache whose views (K, recipe) are not what the run requests, naming both."""
    have = (int(cache.views), cache.recipe)
    want = (1, None) if wanted is None else (wanted.views, wanted.recipe())
    if have != want:
        from dime_ds.data.embeddings import EmbeddingCacheError

        def say(k, r):
            return "1 unaugmented view per image" if k == 1 else \
                f"{k} views, recipe {r['name']} v{r['version']} (scale_min={r['scale_min']}, ratio={r['ratio']})"
        raise EmbeddingCacheError(
            f"{key}: {cache.directory} holds {say(*have)}, the run requests {say(*want)} (embed.views, "
            "data.crop_scale_min): re-run `python -m dime_ds.match stage=embed` with the run's embed.views and "
            "data.crop_scale_min, or set them to the cache's")


def choose_view(key: str, epoch: int, views: int, *, seed: int, choice: str) -> int:
    """The view image `key` shows in `epoch`: derived from the stream position alone, so a resumed
    stream picks the same. round_robin: each view once per `views` epochs, from a per-key offset."""
    if views <= 1:
        return 0
    if choice == "round_robin":
        return (np.random.default_rng([seed, *_key_words(key)]).integers(views) + epoch) % views
    if choice == "random":
        return int(np.random.default_rng([seed, *_key_words(key), int(epoch)]).integers(views))
    raise ValueError(f"view choice must be one of {', '.join(CHOICES)}, not {choice!r}")


def apply_view(image, params, preprocess_cfg: Mapping[str, Any]) -> torch.Tensor:
    """The model input of one view: crop the box of the original PIL image, resize to the model's
    size with its filter, flip, normalise. FloatTensor[3, H, W]."""
    x0, y0, w, h, flip = (int(p) for p in params)
    out = TF.resized_crop(image, top=y0, left=x0, height=h, width=w, size=list(preprocess_size(preprocess_cfg)),
                          interpolation=interpolation(preprocess_cfg), antialias=True)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), preprocess_cfg["mean"], preprocess_cfg["std"])


class ViewSampler:
    """The image stream's per-sample process for a K-view recipe: choose the view of (key, epoch),
    take its parameters (from the cache when one is given, else drawn from the recipe: the same by
    construction) and apply them at `preprocess_cfg`. With augment=False every image shows view 0.
    Returns {"images", "keys", "views", "view_params"}."""

    def __init__(self, recipe: ViewRecipe, preprocess_cfg: Mapping[str, Any], *, seed: int, choice: str,
                 augment: bool = True, cache=None):
        if choice not in CHOICES:
            raise ValueError(f"view choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        self.recipe, self.preprocess_cfg = recipe, dict(preprocess_cfg)
        self.seed, self.choice, self.augment, self.cache = seed, choice, augment, cache

    def __call__(self, sample: dict) -> dict:
        if "image" not in sample:
            raise SampleError(f"sample {sample['key']} in {sample['url']} has no image member")
        key, image = sample["key"], sample["image"]
        view = choose_view(key, sample["epoch"], self.recipe.views, seed=self.seed, choice=self.choice) \
            if self.augment else 0
        if self.cache is not None:
            params = self.cache.view_params([key], [view])[0]
            if params[0] + params[2] > image.size[0] or params[1] + params[3] > image.size[1]:
                raise SampleError(f"sample {key}: cached view {view} box {params[:4].tolist()} lies outside "
                                  f"the {image.size[0]}x{image.size[1]} image: the cache is of other images")
        else:
            params = self.recipe.params(key, *image.size)[view]
        return {"images": apply_view(image, params, self.preprocess_cfg), "keys": key,
                "views": torch.tensor(view, dtype=torch.long), "view_params": torch.as_tensor(params)}
