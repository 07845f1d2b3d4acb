"""Batched feature extraction for evaluation: every rank encodes its share of a split (see
sources.Reader), the shares are all-gathered and put back in single-process order. Features are
L2-normalised fp32; captions (retrieval) are encoded on the rank that read their image."""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from dime_ds.data.pipelines import SampleError, image_transform, preprocess_size
from dime_ds.distributed import collectives as C
from dime_ds.distributed.stage import gather_to_main, raise_agreed
from dime_ds.eval.sources import EvalDataError, EvalSplit, Reader, collate
from dime_ds.models.encoder import Encoder

log = logging.getLogger(__name__)
# What reading a dataset can raise that is the data's fault (unreadable tar, I/O, bad file), not a bug.
READ_ERRORS = (OSError, ValueError, tarfile.TarError, SampleError)


@dataclass
class Features:
    image: torch.Tensor  # (N, D), rows in reading order
    labels: torch.Tensor  # (N,), -1 where a sample has no label
    text: torch.Tensor | None = None  # (M, D) caption embeddings
    text_owner: torch.Tensor | None = None  # (M,) row of `image` each caption belongs to
    skipped: list[str] = field(default_factory=list)


def _has_more(batch, lockstep: bool) -> bool:
    """Under ZeRO-3 every forward is collective: all ranks loop until the last one is done."""
    mine = batch is not None
    return C.reduce_scalar(1.0 if mine else 0.0, op="max") > 0 if lockstep else mine


@torch.no_grad()
def extract(split: EvalSplit, encoder: Encoder, *, captions: bool = False, batch_size: int = 256,
            workers: int = 0, lockstep: bool = False, progress: bool = True, desc: str = "") -> Features | None:
    """Features of every sample of `split`, identical (up to float rounding) for any rank count; on
    rank 0 (other ranks get None: only rank 0 holds the gathered set). A read error on any rank is
    raised on every rank, after all ranks have finished their collective calls."""
    rank, world = C.rank(), C.world_size()
    transform = image_transform(encoder.preprocess_cfg, train=False)
    reader = Reader(split, transform, rank, world, need="captions" if captions else None)
    loader = torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    total = len(split) // world if split.format == "imagefolder" else None
    bar = tqdm(total=total, desc=desc or f"{encoder.name}: {split.data_dir.name}", unit="img",
               disable=rank != 0 or not progress, dynamic_ncols=True, leave=False)
    keys, image, labels, text, owner, skipped = [], [], [], [], [], []
    dummy_image = torch.zeros(1, 3, *preprocess_size(encoder.preprocess_cfg))
    dummy_text = ["a photo."]
    batches, error = iter(loader), None
    while True:
        try:
            batch = next(batches, None)
            while batch is not None and "images" not in batch:  # a worker's report of skipped samples only
                skipped += batch["skipped"]
                batch = next(batches, None)
        except READ_ERRORS as err:  # this rank stops reading, but keeps step with the others
            error = EvalDataError(f"{split.data_dir}: {type(err).__name__}: {err}")
            batch, batches = None, iter(())
        if not _has_more(batch, lockstep):
            break
        if batch is None:  # lockstep: this rank is done, others are not; forward a dummy, keep nothing
            encoder.images(dummy_image)
            if captions:
                encoder.texts(dummy_text)
            continue
        skipped += batch["skipped"]
        image.append(encoder.images(batch["images"]))
        labels.append(batch["labels"])
        if captions:
            flat = [c for caps in batch["captions"] for c in caps]
            dummy_text = flat[:1]
            owner += [len(keys) + i for i, caps in enumerate(batch["captions"]) for _ in caps]
            text.append(encoder.texts(flat))
        keys += batch["keys"]
        bar.update(len(batch["keys"]))
    bar.close()
    # Agree before gathering: every rank raises the same error, and none waits for a rank that left.
    raise_agreed(error, f"reading {split.data_dir}", keep=(EvalDataError,))
    if C.reduce_scalar(float(len(keys))) == 0:
        raise EvalDataError(f"{split.data_dir}: no samples (every sample was skipped, or the split is empty)")
    local = {"keys": keys, "image": _np(image), "labels": _np(labels, np.int64),
             "text": _np(text) if captions else None, "owner": np.asarray(owner, np.int64), "skipped": skipped}
    parts = gather_to_main(local)
    return _merge(parts, captions) if parts is not None else None


def _np(parts: list[torch.Tensor], dtype=np.float32) -> np.ndarray:
    return torch.cat(parts).cpu().numpy().astype(dtype) if parts else np.zeros((0,), dtype)


def _merge(parts: list[dict], captions: bool) -> Features:
    """Rank shares -> one set of rows sorted by order key, caption owners renumbered to match."""
    keys = [k for p in parts for k in p["keys"]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    new_row = np.empty(len(keys), np.int64)
    new_row[order] = np.arange(len(keys))
    image = np.concatenate([p["image"] for p in parts if len(p["keys"])])[order]
    labels = np.concatenate([p["labels"] for p in parts if len(p["keys"])])[order]
    out = Features(torch.from_numpy(image), torch.from_numpy(labels),
                   skipped=[m for p in parts for m in p["skipped"]])
    if captions:
        offsets = np.cumsum([0] + [len(p["keys"]) for p in parts])[:-1]
        owner = np.concatenate([new_row[p["owner"] + off] for p, off in zip(parts, offsets)])
        text = np.concatenate([p["text"] for p in parts if len(p["keys"])])
        by_owner = np.argsort(owner, kind="stable")  # captions grouped in image order, as read
        out.text, out.text_owner = torch.from_numpy(text[by_owner]), torch.from_numpy(owner[by_owner])
    return out
