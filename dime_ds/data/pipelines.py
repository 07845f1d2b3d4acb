"""Sample decoding and image transforms shared by every stream. Decoding is an explicit
whitelist (images, text, json, class labels): no pickle decoder ever runs on shard content."""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from typing import Any, Callable, Iterator, Mapping

from PIL import Image
from torchvision import transforms as T

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SampleError(ValueError):
    """A sample that cannot be decoded (corrupt image, empty sentence, bad label)."""


def decode_sample(sample: Mapping[str, Any]) -> dict:
    """Raw webdataset sample -> {key, url, image (PIL RGB), text, json, cls} with what it has."""
    out = {"key": sample.get("__key__"), "url": sample.get("__url__")}
    if "__truncated__" in sample:
        raise SampleError(f"sample {out['key']} in {out['url']}: the shard is truncated at byte "
                          f"{sample['__truncated__']}; its last sample may be incomplete")
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


def interpolation(preprocess_cfg: Mapping[str, Any]) -> T.InterpolationMode:
    """The resampling filter of an OpenCLIP preprocess config (bicubic unless it says otherwise)."""
    return T.InterpolationMode.BICUBIC if preprocess_cfg.get("interpolation", "bicubic") == "bicubic" \
        else T.InterpolationMode.BILINEAR


def image_transform(preprocess_cfg: Mapping[str, Any], train: bool, crop_scale_min: float = 0.5) -> Callable:
    """The model's preprocessing; in training, the paper's augmentation (random resized crop, flip)."""
    size = preprocess_size(preprocess_cfg)
    interp = interpolation(preprocess_cfg)
    normalize = T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"])
    if train:
        geometry = [T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=interp),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(size[0], interpolation=interp), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), normalize])


def iter_tar_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples of the given shards, in order, grouped by key as webdataset groups them. A shard
    that ends early (cut mid-header, mid-data or between members) yields its samples before the last
    one, then the last as `{__key__, __url__, __truncated__: byte}`, which `decode_sample` refuses:
    it may lack members, so it is counted as skipped instead of read whole or lost unseen."""
    for url in urls:
        yield from _shard_samples(url)


# tarfile's own messages for a stream that stops inside a member or a first header.
_TRUNCATED = ("unexpected end of data", "truncated header", "empty file")


class _Counted:
    """A read-only stream that counts the bytes read from it: where a cut-short file ends."""

    def __init__(self, fileobj):
        self.fileobj, self.bytes = fileobj, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.bytes += len(data)
        return data


def _tar_files(url: str, end: dict) -> Iterator[dict]:
    """The shard's files as webdataset's tar_file_iterator yields them; where the tar stops early,
    `end["byte"]` is set to the byte its file ends at. tarfile ends quietly at a short header block
    and raises inside a member or a first header, so both are looked at."""
    from webdataset.gopen import gopen

    with gopen(url) as raw:
        fileobj = _Counted(raw)
        try:
            stream = tarfile.open(fileobj=fileobj, mode="r|*")
            for info in stream:
                if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
                    end["member"] = info.name  # the one being read, should it be cut
                    yield {"fname": info.name, "data": stream.extractfile(info).read(), "__url__": url}
        except tarfile.ReadError as err:
            if not str(err).startswith(_TRUNCATED):
                raise  # a garbled tar is not a truncated one
            end["byte"] = fileobj.bytes
            return
        # A complete tar ends with a zero block; fewer than 512 bytes where a header belongs: cut short.
        if stream.fileobj.tell() - stream.offset < tarfile.BLOCKSIZE:
            end["byte"] = fileobj.bytes


def _shard_samples(url: str) -> Iterator[dict]:
    from webdataset.tariterators import base_plus_ext, group_by_keys

    end: dict = {}
    last = None
    for sample in group_by_keys(_tar_files(url, end)):  # one sample held back: it may be the cut one
        if last is not None:
            yield last
        last = sample
    if "byte" in end:
        key = base_plus_ext(end.get("member", ""))[0]  # the sample of the last member begun
        if last is not None and last["__key__"] != key:  # a later sample's member was cut: last is whole
            yield last
        log.warning("shard %s is truncated at byte %d: its last sample (%s) is skipped, and any samples "
                    "after it are lost", url, end["byte"], key)
        last = {"__key__": key, "__url__": url, "__truncated__": end["byte"]}
    if last is not None:
        yield last
