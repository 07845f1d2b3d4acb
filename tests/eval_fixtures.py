"""Evaluation test data: colour-coded retrieval shards whose correct answers are known by
construction, ImageFolder copies of labelled shards, and an Encoder over an OpenCLIP model dir."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SOLID_PREPROCESS = {"size": 8, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                    "resize_mode": "shortest"}


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(int(c) for c in rgb)).save(buf, format="PNG")
    return buf.getvalue()


def solid_colours(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3))


def write_retrieval_shards(out: Path, colours: np.ndarray, shard_size: int, decoys: bool = True) -> Path:
    """Sample i: a solid PNG of colour i and captions "rgb r g b" — its own colour, then (with decoys)
    the colour of sample i+1. Under `colour_encoder` image i's own caption is an exact match."""
    from dime_ds.data.shards import ShardWriter

    n = len(colours)
    with ShardWriter(out, prefix="shard", maxcount=shard_size) as writer:
        for i, rgb in enumerate(colours):
            caps = [f"rgb {rgb[0]} {rgb[1]} {rgb[2]}"]
            if decoys:
                nxt = colours[(i + 1) % n]
                caps.append(f"rgb {nxt[0]} {nxt[1]} {nxt[2]}")
            writer.write(f"s{i:05d}", {"png": _png(rgb), "txt": "\n".join(caps).encode(), "cls": str(i % 3).encode()})
    return out


def colour_encoder():
    """Images -> their mean normalised colour; "rgb r g b" -> the same vector computed from the numbers."""
    from dime_ds.models.encoder import Encoder

    mean, std = torch.tensor(MEAN), torch.tensor(STD)

    def tokenize(texts):
        rgb = torch.tensor([[float(v) for v in t.split()[1:]] if t.startswith("rgb ") else [127.5] * 3
                            for t in texts])
        return (rgb / 255.0 - mean) / std

    return Encoder("colour", lambda x: x.mean(dim=(2, 3)), lambda t: t, tokenize, SOLID_PREPROCESS)


def shards_to_imagefolder(shard_dir: Path, out: Path, classnames: list[str], by_name: bool = False) -> Path:
    """Every labelled sample of `shard_dir` as out/<NN_class>/<key>.png (lossless, so pixels match);
    `by_name`: folders named after their classes, out/<class>/<key>.png."""
    for tar_path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            samples: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, s in samples.items():
            label = int(s["cls"])
            folder = out / (classnames[label] if by_name else f"{label:02d}_{classnames[label]}")
            folder.mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(s["jpg"])).convert("RGB").save(folder / f"{key}.png")
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    return out


def openclip_encoder(model_dir: Path):
    from dime_ds.eval.models import openclip_encoder as load

    return load(str(model_dir), None, "fp32", torch.device("cpu"), "tiny")
