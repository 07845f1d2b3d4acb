"""Sample decoding and image transforms shared by every stream. Decoding is an explicit
whitelist (images, text, json, class labels): no pickle decoder ever runs on shard content."""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import unicodedata
import warnings
from typing import Any, Callable, Iterator, Mapping

from PIL import Image, ImageOps
from torchvision import transforms as T

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SampleError(ValueError):
    """A sample that cannot be decoded (corrupt image, empty sentence, bad label)."""


class DamagedShardError(SampleError):
    """The marker a damaged shard (cut short, garbled, unopenable, unreadable) ends with. `key` is the
    sample it was cut in (None when no sample was begun), `samples` how many were read before it."""

    def __init__(self, message: str, url: str | None = None, reason: str = "", samples: int = 0,
                 key: str | None = None):
        super().__init__(message)
        self.url, self.reason, self.samples, self.key = url, reason, samples, key


# The keys of a raw sample that are not members: every reader that filters members keeps these.
SAMPLE_META = ("__key__", "__url__", "__truncated__", "__damaged__", "__samples__")

# Decompression bombs: PIL warns above this many pixels and raises above twice it. Both are refused
# (the warning is raised as an error below) before any pixel is allocated. 64 MP is far above any
# training image and far below what would exhaust a loader worker.
MAX_IMAGE_PIXELS = 64 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def damage_record(err: DamagedShardError) -> dict:
    """What a stage reports of a damaged shard: {"shard", "reason", "samples" read before the damage}."""
    return {"shard": str(err.url), "reason": err.reason, "samples": err.samples}


def decode_image(data: bytes) -> Image.Image:
    """RGB, upright: any mode PIL reads (CMYK, 16-bit, palette, alpha, grayscale) converted, the EXIF
    orientation applied as `ImageOps.exif_transpose` does. A file over MAX_IMAGE_PIXELS is refused
    from its header, before it is decoded."""
    if not data:
        raise SampleError("zero-byte image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image = ImageOps.exif_transpose(image)  # loads the pixels (after the size check in open)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise SampleError(f"decompression bomb refused (limit {MAX_IMAGE_PIXELS} pixels): {err}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, not over whatever colour they happen to hold.
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
        return image
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit: scaled down, not clipped
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def decode_text(data: bytes) -> str:
    """A sentence: UTF-8, stripped; empty or control characters only is a bad sample."""
    text = data.decode("utf-8").strip()
    if not text:
        raise SampleError("empty sentence")
    if all(unicodedata.category(ch)[0] in "CZ" for ch in text):  # control, format, separators only
        raise SampleError(f"sentence of control characters only ({text[:20]!r})")
    return text


def decode_sample(sample: Mapping[str, Any]) -> dict:
    """Raw webdataset sample -> {key, url, image (PIL RGB), text, json, cls} with what it has."""
    out = {"key": sample.get("__key__"), "url": sample.get("__url__")}
    if "__damaged__" in sample:
        reason, read = sample["__damaged__"], int(sample.get("__samples__", 0))
        where = f"sample {out['key']} in {out['url']}" if out["key"] is not None else f"shard {out['url']}"
        raise DamagedShardError(f"{where}: the shard is damaged ({reason}) after {read} readable samples"
                                + ("; this sample may be incomplete" if out["key"] is not None else ""),
                                out["url"], reason, read, out["key"])
    try:
        for ext in IMAGE_EXTS:
            if ext in sample:
                out["image"] = decode_image(sample[ext])
                break
        if "txt" in sample:
            out["text"] = decode_text(sample["txt"])
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
    """Raw samples of the given shards, in order, grouped by key as webdataset groups them. A damaged
    shard (cut short mid-header, mid-data or between members; a garbled header; a file that cannot be
    opened or read) yields its readable samples, then a marker `{__key__, __url__, __damaged__:
    reason, __samples__: samples read}` (plus `__truncated__: byte` when cut short), which
    `decode_sample` refuses with DamagedShardError. `__key__` is the sample the damage hit (None when
    none was begun): it may lack members, so it is counted as skipped instead of read whole or lost
    unseen; the shard itself is counted as damaged."""
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
    """The shard's files as webdataset's tar_file_iterator yields them; where the tar is damaged,
    `end["reason"]` says how (and `end["byte"]` where a cut-short file ends). tarfile ends quietly at a
    short or garbled header block and raises inside a member or a first header, so all are looked at."""
    from webdataset.gopen import gopen

    try:
        raw = gopen(url)
    except OSError as err:  # missing since it was listed, permission denied
        end["reason"] = f"cannot be opened: {type(err).__name__}: {err.strerror or err}"
        return
    with raw:
        fileobj = _Counted(raw)
        try:
            stream = tarfile.open(fileobj=fileobj, mode="r|*")
            for info in stream:
                if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
                    end["member"] = info.name  # the one being read, should it be cut
                    yield {"fname": info.name, "data": stream.extractfile(info).read(), "__url__": url}
        except tarfile.ReadError as err:
            if str(err).startswith(_TRUNCATED):
                end["byte"] = fileobj.bytes
                end["reason"] = f"truncated at byte {fileobj.bytes}"
            else:
                end["reason"] = f"garbled at byte {fileobj.bytes}: {err}"
            return
        except OSError as err:  # a read error (EIO, a network file system gone)
            end["reason"] = f"read error at byte {fileobj.bytes}: {type(err).__name__}: {err.strerror or err}"
            return
        # A complete tar ends with a zero block; fewer than 512 bytes where a header belongs: cut short.
        if stream.fileobj.tell() - stream.offset < tarfile.BLOCKSIZE:
            end["byte"] = fileobj.bytes
            end["reason"] = f"truncated at byte {fileobj.bytes}"
        elif getattr(stream.fileobj, "comptype", "") == "tar" and _garbled_tail(raw, stream.offset):
            end["reason"] = f"garbled header at byte {stream.offset}"


def _garbled_tail(raw, offset: int) -> bool:
    """tarfile also stops quietly at a header that fails its checksum: in a local file, anything but
    zeros after the last member read means the rest of the shard was lost behind a garbled header."""
    if not (hasattr(raw, "seekable") and raw.seekable()):
        return False  # a pipe or a stream: what follows cannot be looked at again
    raw.seek(offset)
    while block := raw.read(1 << 20):
        if block.strip(b"\0"):
            return True
    return False


def _shard_samples(url: str) -> Iterator[dict]:
    from webdataset.tariterators import base_plus_ext, group_by_keys

    end: dict = {}
    last, read = None, 0
    for sample in group_by_keys(_tar_files(url, end)):  # one sample held back: it may be the damaged one
        if last is not None:
            yield last
            read += 1
        last = sample
    if "reason" in end:
        key = base_plus_ext(end["member"])[0] if "member" in end else None  # the last member begun's
        if last is not None and last["__key__"] != key:  # a later sample's member was cut: last is whole
            yield last
            read += 1
        hit = f"its last sample ({key}) is skipped, and any samples after it are lost" if key is not None \
            else "none of its samples could be read"
        log.warning("shard %s is damaged: %s; %d samples read, %s", url, end["reason"], read, hit)
        last = {"__key__": key, "__url__": url, "__damaged__": end["reason"], "__samples__": read}
        if "byte" in end:
            last["__truncated__"] = end["byte"]
    if last is not None:
        yield last
