"""Embed stage core: the teacher encodes every sample of a set of shards, one fp16 embedding shard
per input shard (the format of dime_ds.data.embeddings, also the distill engine's teacher cache).
Unaugmented images at the teacher's preprocessing; a bad sample is skipped and listed in the
manifest. A shard whose output exists with a matching source checksum is not recomputed."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from dime_ds.data.embeddings import read_manifest, write_embedding_shard, write_manifest
from dime_ds.data.pipelines import SampleError, decode_sample, image_transform, iter_tar_samples
from dime_ds.data.shards import sha256_file
from dime_ds.models import Teacher

log = logging.getLogger(__name__)


def _existing(out_dir: Path) -> tuple[dict, list]:
    """Shard records and skip records of an earlier (possibly interrupted) run's manifest."""
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return {}, []
    return {r["source"]: r for r in manifest["shards"]}, list(manifest.get("skipped", []))


def embed_shards(teacher: Teacher, urls: Sequence[str], out_dir: str | Path, modality: str,
                 model_name: str, batch_size: int = 256, progress: bool = True) -> dict:
    """Embed `urls` (images or texts) into `out_dir`; returns the manifest written."""
    if modality not in ("images", "texts"):
        raise ValueError(f"modality must be images or texts, not {modality!r}")
    out_dir = Path(out_dir)
    done, done_skips = _existing(out_dir)
    transform = image_transform(teacher.preprocess_cfg, train=False)
    records, skipped = [], []
    for index, url in enumerate(tqdm(urls, desc=f"embed {modality}", disable=not progress)):
        checksum = sha256_file(url)
        name = f"shard-{index:06d}"
        previous = done.get(str(url))
        if previous and previous["source_sha256"] == checksum and (out_dir / f"{name}.npy").is_file():
            records.append(previous)
            skipped += [s for s in done_skips if s["source"] == str(url)]
            continue
        keys, chunks, batch = [], [], []
        for raw in iter_tar_samples([url]):
            try:
                sample = decode_sample(raw)
                item = transform(sample["image"]) if modality == "images" else sample["text"]
            except (SampleError, KeyError) as err:
                skipped.append({"key": raw.get("__key__"), "source": str(url), "reason": str(err)})
                continue
            keys.append(sample["key"])
            batch.append(item)
            if len(batch) == batch_size:
                chunks.append(_encode(teacher, modality, batch))
                batch = []
        if batch:
            chunks.append(_encode(teacher, modality, batch))
        if not keys:
            raise RuntimeError(f"{url}: no {modality[:-1]} could be decoded")
        records.append(write_embedding_shard(out_dir, name, keys, np.concatenate(chunks), url, checksum))
    return write_manifest(out_dir, modality=modality, model=model_name, shards=records, skipped=skipped)


@torch.no_grad()
def _encode(teacher: Teacher, modality: str, batch: list) -> np.ndarray:
    if modality == "images":
        return teacher.encode_image(torch.stack(batch)).cpu().numpy()
    return teacher.encode_text(teacher.tokenizer(batch)).cpu().numpy()
