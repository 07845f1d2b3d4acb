"""Sample decoding and image transforms shared by every stream. Decoding is an explicit
whitelist (images, text, json, class labels): no pickle decoder ever runs on shard content."""
from __future__ import annotations

import io
import json
from typing import Any, Callable, Iterator, Mapping

import torch
from PIL import Image
from torchvision import transforms as T

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SampleError(ValueError):
    """A sample that cannot be decoded (corrupt image, empty sentence, bad label)."""


def decode_sample(sample: Mapping[str, Any]) -> dict:
    """Raw webdataset sample -> {key, url, image (PIL RGB), text, json, cls} with what it has."""
    out = {"key": sample.get("__key__"), "url": sample.get("__url__")}
    try:
        for ext in IMAGE_EXTS:
            if ext in sample:
                image = Image.open(io.BytesIO(sample[ext]))
                image.load()
                out["image"] = image.convert("RGB")
                break
        if "txt" in sample:
            text = sample["txt"].decode("utf-8").strip()
            if not text:
                raise SampleError("empty sentence")
            out["text"] = text
        if "json" in sample:
            out["json"] = json.loads(sample["json"])
        if "cls" in sample:
            out["cls"] = int(sample["cls"].decode("ascii").strip())
    except SampleError as err:
        raise SampleError(f"sample {out['key']} in {out['url']}: {err}") from None
    except Exception as err:  # PIL, unicode and json errors all mean one thing: a bad sample
        raise SampleError(f"sample {out['key']} in {out['url']}: {type(err).__name__}: {err}") from None
    return out


def preprocess_size(preprocess_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of an OpenCLIP preprocess config, whose `size` is an int or a pair."""
    size = preprocess_cfg.get("size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def image_transform(preprocess_cfg: Mapping[str, Any], train: bool, crop_scale_min: float = 0.5) -> Callable:
    """The model's preprocessing; in training, the paper's augmentation (random resized crop, flip)."""
    size = preprocess_size(preprocess_cfg)
    interp = T.InterpolationMode.BICUBIC if preprocess_cfg.get("interpolation", "bicubic") == "bicubic" \
        else T.InterpolationMode.BILINEAR
    normalize = T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"])
    if train:
        geometry = [T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=interp),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(size[0], interpolation=interp), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), normalize])


def iter_tar_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples of the given shards, in order (webdataset's tar reader, no splitting or shuffle)."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False)
    yield from dataset


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images, dim=0)
