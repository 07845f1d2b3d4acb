"""Evaluation data: one split of a dataset directory, read as webdataset shards (`cls` labels or
`txt` captions, several captions one per line) or as an ImageFolder tree (one directory per class).
Samples carry an order key, (shard, position) or (file,), so features extracted by any number of
ranks and loader workers are put back in the order one process would read them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from dime_ds.data.pipelines import (IMAGE_EXTS, DamagedShardError, SampleError, decode_image, decode_sample,
                                    iter_tar_samples)
from dime_ds.data.shards import list_shards
from dime_ds.errors import UserError

log = logging.getLogger(__name__)
FILE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
SPLIT_NAMES = ("train", "val", "validation", "test")


class EvalDataError(FileNotFoundError):
    """A dataset directory that holds neither shards nor an ImageFolder tree."""


class LabelError(UserError, ValueError):
    """Labels that do not fit the class names: scoring them would report a wrong accuracy."""


@dataclass
class EvalSplit:
    """One split of an evaluation dataset; `meta_dir` holds classnames.txt / templates files."""

    name: str
    data_dir: Path
    meta_dir: Path
    format: str  # webdataset | imagefolder
    shards: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)  # imagefolder: (path, label)
    folder_classes: list[str] = field(default_factory=list)
    num_classes: int | None = None  # set: a `cls` label outside [0, num_classes) is a LabelError

    def __len__(self) -> int:  # ImageFolder only: webdataset counts are learnt by reading
        return len(self.files)


def has_split(path: str | Path, split: str) -> bool:
    return (Path(path).expanduser() / split).is_dir()


def _folder_order(name: str) -> tuple:
    """Numbered class folders (ImageNet-V2's 0..999) sort as numbers, others as text."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def open_split(path: str | Path, split: str, classes: list[str] | None = None) -> EvalSplit:
    """`<path>/<split>` when it exists, else `<path>` itself; shards win over an ImageFolder tree.
    `classes`: an ImageFolder's folder names to label by (a train split's), so that a test split
    lacking a class keeps the train split's labels."""
    root = Path(path).expanduser()
    data_dir = root / split if (root / split).is_dir() else root
    if not data_dir.is_dir():
        raise EvalDataError(f"{data_dir}: no such dataset directory")
    others = sorted(d for d in SPLIT_NAMES if (root / d).is_dir())
    if data_dir == root and others:  # never read a train/ directory as one class of an ImageFolder
        raise EvalDataError(f"{root} has no {split}/ split (it has {', '.join(others)}/): set the dataset's "
                            f"split (eval.datasets.<name>.split=...)")
    if any(data_dir.glob("*.tar")):
        return EvalSplit(split, data_dir, root, "webdataset", shards=list_shards(str(data_dir)))
    found = sorted((d.name for d in data_dir.iterdir() if d.is_dir()), key=_folder_order)
    if classes is not None and set(found) - set(classes):
        raise EvalDataError(f"{data_dir}: class folders {sorted(set(found) - set(classes))[:5]} are not among "
                            f"the training split's classes")
    classes = list(classes) if classes is not None else found
    files = [(str(f), classes.index(c)) for c in found
             for f in sorted((data_dir / c).rglob("*")) if f.suffix.lower() in FILE_SUFFIXES]
    if not files:
        raise EvalDataError(f"{data_dir}: neither *.tar shards nor an ImageFolder tree "
                            f"(class subdirectories with {', '.join(IMAGE_EXTS)} images)")
    return EvalSplit(split, data_dir, root, "imagefolder", files=files, folder_classes=classes)


def _class_name_of(folder: str, names: dict[str, list[int]]) -> str | None:
    """The class name a folder is named after (as is, or with underscores as spaces), if any."""
    return next((n for n in (folder, folder.replace("_", " ")) if n in names), None)


def with_class_names(split: EvalSplit, classnames: list[str]) -> EvalSplit:
    """The split with labels that index `classnames`. Shards: their `cls` labels are checked against
    the count as they are read. ImageFolder: if every folder is named after a class (folder "dog",
    or "golden_retriever" for "golden retriever"), each folder takes its name's index, whatever the
    order of classnames.txt; if none is (ImageNet's n01440764, ImageNet-V2's 0..999, "00_red"),
    folders in sorted order are labels 0, 1, ... (classnames.txt lists the classes in that order);
    if some are and some are not, the split is refused, naming the first folder that is not."""
    if split.format != "imagefolder":
        return replace(split, num_classes=len(classnames))
    names: dict[str, list[int]] = {}
    for i, name in enumerate(classnames):
        names.setdefault(name, []).append(i)
    folders = split.folder_classes
    named = [_class_name_of(f, names) for f in folders]
    if not any(named):  # folder ids: labelled in sorted folder order, which must cover every class
        if len(folders) != len(classnames):
            raise LabelError(f"{split.data_dir}: {len(folders)} class folders but {len(classnames)} class "
                             "names; an ImageFolder needs one folder per class name, in label order")
        return replace(split, num_classes=len(classnames))
    if not all(named):
        bad = folders[named.index(None)]
        good = folders[next(i for i, n in enumerate(named) if n)]
        raise LabelError(f"{split.data_dir}: class folder {bad!r} is not a class name, but {good!r} is; "
                         "name every folder after its class (labels are taken by name) or none of them "
                         "(labels follow the sorted folder order)")
    twice = next((n for n in named if len(names[n]) > 1), None)
    if twice is not None:
        raise LabelError(f"{split.data_dir}: folder {twice!r} matches class names {names[twice]} alike; "
                         "labels by name need distinct class names")
    label_of = [names[n][0] for n in named]
    return replace(split, files=[(path, label_of[old]) for path, old in split.files], num_classes=len(classnames))


# How a damaged shard shows among a split's skip messages (one per shard and reader).
DAMAGED_SHARD = "damaged shard "


def count_skips(messages: list[str]) -> tuple[int, list[str]]:
    """(samples skipped, the damaged shards' messages, one per shard) of a split's skip messages."""
    damaged = sorted({m for m in messages if m.startswith(DAMAGED_SHARD)})
    return sum(not m.startswith(DAMAGED_SHARD) for m in messages), damaged


def iter_samples(split: EvalSplit, shard_mine: Callable[[int], bool], sample_mine: Callable[[int], bool],
                 skipped: list) -> Iterator[dict]:
    """Decoded samples {key, image, label?, captions?} of the shards `shard_mine(shard index)` keeps
    (ImageFolder: one pseudo-shard) whose running count over those shards `sample_mine` keeps.
    Undecodable samples are appended to `skipped` (with the reason) and left out."""
    if split.format == "imagefolder":
        for i, (path, label) in enumerate(split.files):
            if not sample_mine(i):
                continue
            try:
                image = decode_image(Path(path).read_bytes())  # bombs refused, any mode RGB, EXIF upright
            except Exception as err:  # a corrupt file is one skipped sample, not a failed evaluation
                skipped.append(f"{path}: {type(err).__name__}: {err}")
                continue
            yield {"key": (i,), "image": image, "label": label}
        return
    counter = 0
    for s, url in enumerate(split.shards):
        if not shard_mine(s):
            continue
        for pos, raw in enumerate(iter_tar_samples([url])):
            mine = sample_mine(counter)
            counter += 1
            if not mine:
                continue
            try:
                sample = decode_sample(raw)
                if "image" not in sample:
                    raise SampleError(f"sample {raw.get('__key__')} in {url}: no image")
            except DamagedShardError as err:
                skipped.append(f"{DAMAGED_SHARD}{url}: {err.reason} ({err.samples} samples read)")
                if err.key is not None:  # the sample the damage hit is lost too
                    skipped.append(str(err))
                continue
            except SampleError as err:
                skipped.append(str(err))
                continue
            out = {"key": (s, pos), "image": sample["image"]}
            if "cls" in sample:
                out["label"] = _checked_label(split, sample["cls"], raw.get("__key__"), url)
            if "text" in sample:
                out["captions"] = [c.strip() for c in sample["text"].splitlines() if c.strip()]
            yield out


def _checked_label(split: EvalSplit, label: int, key: str | None, url: str) -> int:
    n = split.num_classes
    if n is not None and not 0 <= label < n:  # refused, not skipped: the shards and names disagree
        raise LabelError(f"sample {key} in {url}: label {label}, but there are {n} class names "
                         f"(labels 0..{n - 1}); check the dataset's classnames")
    return label


class Reader(torch.utils.data.IterableDataset):
    """This rank's samples of a split, further divided among DataLoader workers. With at least as
    many shards as ranks, each rank reads only its own shards; otherwise every rank reads all of
    them and decodes every world-th sample."""

    def __init__(self, split: EvalSplit, transform: Callable, rank: int, world: int, need: str | None = None):
        self.split, self.transform, self.rank, self.world, self.need = split, transform, rank, world, need

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.split.format == "webdataset" and len(self.split.shards) >= self.world:
            shard_mine = lambda s: s % self.world == self.rank  # noqa: E731
            sample_mine = lambda i: i % workers == worker  # noqa: E731
        else:
            shard_mine = lambda s: True  # noqa: E731
            sample_mine = lambda i: i % (self.world * workers) == self.rank * workers + worker  # noqa: E731
        skipped: list[str] = []
        for sample in iter_samples(self.split, shard_mine, sample_mine, skipped):
            if self.need and not sample.get(self.need):  # a retrieval image without captions, say
                skipped.append(f"sample {sample['key']} of {self.split.data_dir}: no {self.need}")
                continue
            sample["image"] = self.transform(sample["image"])
            # A copy, and the same list emptied: iter_samples keeps appending to the list it was given.
            sample["skipped"] = skipped[:]
            skipped.clear()
            yield sample
        if skipped:
            yield {"skipped": skipped}


def collate(samples: list[dict]) -> dict:
    """Samples -> {keys, images, labels?, captions?, skipped}; entries that only report skips merge in."""
    real = [s for s in samples if "image" in s]
    out = {"keys": [s["key"] for s in real], "skipped": [m for s in samples for m in s.get("skipped", [])]}
    if real:
        out["images"] = torch.stack([s["image"] for s in real])
        out["labels"] = torch.tensor([s.get("label", -1) for s in real])
        out["captions"] = [s.get("captions", []) for s in real]
    return out
