"""Embed stage core: the teacher encodes every sample of a set of shards, one fp16 embedding shard
per input shard (the format of dime_ds.data.embeddings, also the distill engine's teacher cache).
Unaugmented images at the teacher's preprocessing, or with embed.views=K > 1 the K views of each
image that dime_ds.data.views draws from (embed.seed, key, view), each embedded and stored with its
crop/flip parameters; a bad sample is skipped and listed in the manifest.

Multi-rank and resumable. Input shards are listed in sorted order; shard i is embedded by rank
i % world_size into `shard-{i:06d}` (the same name whatever the world size). Beside its `.npy` and
`.keys.txt`, each finished shard gets a sidecar `shard-{i:06d}.record.json` ({"modality", "model",
"shard": the write_embedding_shard record, "skipped": its bad samples}), written atomically after
the shard's files: a shard whose sidecar names the same model and the same source checksum is not
recomputed, with or without a manifest (a killed run's finished shards survive). A damaged input
shard (see `iter_tar_samples`) is embedded as far as it can be read and its record marked
`"partial": true` with `"damaged": {"reason", "samples"}`: it never counts as finished, so every
later run reads it again (and a repaired one, a new checksum, is embedded whole). When every rank is
done, rank 0 gathers the sidecars in shard order and writes manifest.json last."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dime_ds import atomic
from dime_ds.data.embeddings import MANIFEST, write_embedding_shard, write_manifest
from dime_ds.data.pipelines import DamagedShardError, SampleError, decode_sample, image_transform, iter_tar_samples
from dime_ds.data.shards import sha256_file
from dime_ds.data.views import ViewRecipe, apply_view
from dime_ds.distributed.stage import StageContext, agreed, on_main, stage
from dime_ds.models import Teacher
from dime_ds.models.teacher import teacher_name

if TYPE_CHECKING:
    from dime_ds.config.schema import MatchConfig, RootConfig

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".record.json"
MODALITIES = ("images", "texts")


def shard_name(index: int) -> str:
    """The embedding shard name of the `index`-th input shard (sorted order)."""
    return f"shard-{index:06d}"


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{RECORD_SUFFIX}"


def _files_ok(out_dir: Path, name: str, count: int) -> bool:
    """The shard's arrays and keys exist and the array has `count` rows (the manifest checks the rest)."""
    if not (out_dir / f"{name}.keys.txt").is_file():
        return False
    try:
        return np.load(out_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False).shape[0] == count
    except (OSError, ValueError):
        return False


def views_record(views: ViewRecipe | None) -> dict | None:
    """What a sidecar and the manifest record of the views: K, the recipe, the seed (None: plain)."""
    return None if views is None else {"views": views.views, "recipe": views.recipe(), "view_seed": views.seed}


def finished_record(out_dir: str | Path, name: str, url: str, checksum: str, modality: str,
                    model_name: str, views: ViewRecipe | None = None) -> dict | None:
    """The sidecar record of shard `name` if it is finished from this very source, model and views,
    else None."""
    out_dir = Path(out_dir)
    try:
        record = json.loads(_record_path(out_dir, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    shard = record.get("shard") or {}
    made = (record.get("modality"), record.get("model"), shard.get("name"), shard.get("source_sha256"),
            record.get("views"))
    if shard.get("partial") or made != (modality, str(model_name), name, checksum, views_record(views)) \
            or not _files_ok(out_dir, name, int(shard.get("count", -1))) \
            or (views is not None and not (out_dir / f"{name}.views.npy").is_file()):
        return None
    if shard.get("source") != str(url):  # the same bytes, moved: keep the embeddings, name the new place
        shard = dict(shard, source=str(url))
        record = dict(record, shard=shard, skipped=[dict(s, source=str(url)) for s in record.get("skipped", [])])
        atomic.write_json(_record_path(out_dir, name), record)
    return record


def embed_shard(teacher: Teacher, url: str, out_dir: str | Path, name: str, modality: str, model_name: str,
                batch_size: int = 256, transform=None, views: ViewRecipe | None = None) -> tuple[dict, bool]:
    """Embed one input shard into `out_dir/name.*` unless it is already finished. Returns (its sidecar
    record, whether it was computed now). `views`: K views per image (images only); `batch_size`
    then counts views."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be images or texts, not {modality!r}")
    if views is not None and modality != "images":
        raise ValueError("views are of images only")
    out_dir = Path(out_dir)
    try:
        checksum = sha256_file(url)
    except OSError:  # missing since it was listed, unreadable: the reader below says how, as a damaged shard
        checksum = None
    done = finished_record(out_dir, name, url, checksum, modality, model_name, views)
    if done is not None:
        return done, False
    out_dir.mkdir(parents=True, exist_ok=True)
    # From here on the directory does not read as complete, and this shard not as finished.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    _record_path(out_dir, name).unlink(missing_ok=True)
    if transform is None and modality == "images":
        transform = image_transform(teacher.preprocess_cfg, train=False)
    per_item = views.views if views is not None else 1  # teacher inputs per sample
    keys, chunks, batch, skipped, params, damaged = [], [], [], [], [], None
    for raw in iter_tar_samples([url]):
        try:
            sample = decode_sample(raw)
            if views is not None:  # the K views' parameters, and their inputs at the teacher's preprocessing
                params.append(views.params(sample["key"], *sample["image"].size))
                item = torch.stack([apply_view(sample["image"], p, teacher.preprocess_cfg) for p in params[-1]])
            else:
                item = transform(sample["image"]) if modality == "images" else sample["text"]
        except (SampleError, KeyError) as err:
            if isinstance(err, DamagedShardError):
                damaged = {"reason": err.reason, "samples": err.samples}
            if raw.get("__key__") is not None:  # None: an unreadable shard, no sample of it begun
                skipped.append({"key": raw.get("__key__"), "source": str(url), "reason": str(err)})
            continue
        keys.append(sample["key"])
        batch.append(item)
        if len(batch) * per_item >= batch_size:
            chunks.append(_encode(teacher, modality, batch))
            batch = []
    if batch:
        chunks.append(_encode(teacher, modality, batch))
    if not keys and damaged is None:
        raise RuntimeError(f"{url}: no {modality[:-1]} could be decoded")
    width = (views.views, teacher.embed_dim) if views is not None else (teacher.embed_dim,)
    embedded = np.concatenate(chunks) if chunks else np.zeros((0, *width), np.float32)
    view_params = None
    if views is not None:
        view_params = np.stack(params) if params else np.zeros((0, views.views, 5), np.int32)
    shard = write_embedding_shard(out_dir, name, keys, embedded, url, checksum, view_params)
    if damaged is not None:  # what was read is used; the shard is read again by the next run
        shard.update(partial=True, damaged=damaged)
        log.warning("embedding %s: the shard is damaged (%s): %d %s embedded, marked partial", url,
                    damaged["reason"], len(keys), modality)
    record = {"modality": modality, "model": str(model_name), "shard": shard, "skipped": skipped,
              "views": views_record(views)}
    atomic.write_json(_record_path(out_dir, name), record)  # last: the shard is finished
    return record, True


def _embed_rank_shards(teacher: Teacher, urls: Sequence[str], out_dir: Path, modality: str, model_name: str,
                       batch_size: int, rank: int, world: int, progress: bool,
                       views: ViewRecipe | None = None) -> dict:
    """Embed the input shards i with i % world == rank; returns counts for the log."""
    mine = [i for i in range(len(urls)) if i % world == rank]
    transform = image_transform(teacher.preprocess_cfg, train=False) if modality == "images" else None
    stats = {"shards": len(mine), "computed": 0, "samples": 0, "damaged": 0}
    bar = tqdm(mine, desc=f"rank {rank} embed {modality}", position=rank, disable=not progress, leave=True,
               unit="shard")
    for i in bar:
        record, computed = embed_shard(teacher, urls[i], out_dir, shard_name(i), modality, model_name, batch_size,
                                       transform, views)
        stats["computed"] += computed
        stats["samples"] += record["shard"]["count"]
        stats["damaged"] += bool(record["shard"].get("partial"))
        bar.set_postfix(samples=stats["samples"], refresh=False)
    bar.close()
    return stats


def _write_stage_manifest(urls: Sequence[str], out_dir: Path, modality: str, model_name: str,
                          views: ViewRecipe | None = None) -> dict:
    """Gather the sidecars of every input shard, in shard order, into manifest.json (rank 0)."""
    records, skipped = [], []
    for i, url in enumerate(urls):
        path = _record_path(out_dir, shard_name(i))
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError) as err:
            raise RuntimeError(f"embedding cache {out_dir}: shard {shard_name(i)} of {url} has no valid "
                               f"{path.name} after every rank finished ({err})") from None
        if record["shard"]["source"] != str(url) or record["model"] != str(model_name) \
                or record.get("views") != views_record(views):
            raise RuntimeError(f"embedding cache {out_dir}: {path.name} describes {record['shard']['source']} "
                               f"({record['model']}, views {record.get('views')}), expected {url} ({model_name}, "
                               f"views {views_record(views)})")
        records.append(record["shard"])
        skipped += record.get("skipped", [])
    return write_manifest(out_dir, modality=modality, model=model_name, shards=records, skipped=skipped,
                          **(views_record(views) or {}))


def embed_shards(teacher: Teacher, urls: Sequence[str], out_dir: str | Path, modality: str,
                 model_name: str, batch_size: int = 256, progress: bool = True,
                 views: ViewRecipe | None = None) -> dict:
    """Embed `urls` (images or texts) into `out_dir` in this one process (finished shards are skipped);
    returns the manifest written."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be images or texts, not {modality!r}")
    out_dir = Path(out_dir)
    _embed_rank_shards(teacher, list(urls), out_dir, modality, model_name, batch_size, 0, 1, progress, views)
    return _write_stage_manifest(list(urls), out_dir, modality, model_name, views)


@torch.no_grad()
def _encode(teacher: Teacher, modality: str, batch: list) -> np.ndarray:
    if modality == "images":
        if batch[0].ndim == 4:  # [K, 3, H, W] per image: K views, one forward for all
            out = teacher.encode_image(torch.cat(batch)).cpu().numpy()
            return out.reshape(len(batch), batch[0].shape[0], -1)
        return teacher.encode_image(torch.stack(batch)).cpu().numpy()
    return teacher.encode_text(teacher.tokenizer(batch)).cpu().numpy()


def _embed_modality(ctx: StageContext, teacher: Teacher, model: str, spec: str, modality: str,
                    match_cfg: MatchConfig, progress: bool, views: ViewRecipe | None = None,
                    embed_dir: str | None = None) -> dict:
    """One modality on every rank: each rank its shards, then (once all agree they succeeded) rank 0
    the manifest, which every rank returns. `embed_dir`: where (default match.embed_dir)."""
    from dime_ds.data.shards import list_shards

    urls = agreed(list_shards, spec, what=f"listing the {modality} shards")
    out_dir = Path(embed_dir or match_cfg.embed_dir) / modality
    if ctx.is_main:
        log.info("embedding %d %s shard(s) of %s into %s on %d rank(s)", len(urls), modality, spec, out_dir,
                 ctx.world_size)
    stats = agreed(_embed_rank_shards, teacher, urls, out_dir, modality, model, match_cfg.batch_size, ctx.rank,
                   ctx.world_size, progress, views, what=f"embedding {modality}")
    log.info("rank %d: %s: %d shard(s), %d computed, %d skipped as finished, %d embeddings, %d damaged", ctx.rank,
             modality, stats["shards"], stats["computed"], stats["shards"] - stats["computed"], stats["samples"],
             stats["damaged"])
    manifest = on_main(_write_stage_manifest, urls, out_dir, modality, model, views,
                       what=f"writing the {modality} manifest")
    if ctx.is_main:
        damaged = [s for s in manifest["shards"] if s.get("partial")]
        log.info("%s: %d embeddings, %d skipped, %d damaged shard(s)%s", modality, manifest["count"],
                 len(manifest["skipped"]), len(damaged),
                 "".join(f"\n  {s['source']}: {s['damaged']['reason']}" for s in damaged))
    return manifest


def run_embed_stage(cfg: RootConfig) -> dict:
    """`python -m dime_ds.match stage=embed`: the configured teacher embeds data.images and data.corpus
    (data.texts when null; with match.pool=curated the curated pool <curate.out_dir>/corpus) into
    `<match.embed_dir>/images` and `/texts` (embed.views=K > 1: K views per image, see
    dime_ds.data.views), on every rank of the job (a process group is made when the world has several
    ranks and none exists). Each rank embeds input shards i % world == rank; finished shards from
    unchanged sources are skipped; rank 0 writes each manifest once all ranks are done. A failure on
    any rank is raised on every rank. An ensemble's further teachers follow, one at a time, each into
    its own directory (config.teachers.teacher_embed_dir), with the same views: view parameters come
    from (embed.seed, key, view) alone. Returns {modality: manifest} of `teacher` on every rank, with
    the further teachers' under "ensemble" (a list) when there are any."""
    from dime_ds.config.teachers import teacher_embed_dir, teacher_list
    from dime_ds.data.text_pool import text_pool
    from dime_ds.models import load_teacher

    with stage(cfg.dist, cfg.device) as ctx:
        texts = agreed(text_pool, cfg, what="finding the sentence pool")  # the pool the match stage grounds
        views = ViewRecipe.from_config(cfg)
        results = []
        for i, teacher_cfg in enumerate(teacher_list(cfg)):
            teacher = agreed(load_teacher, teacher_cfg, ctx.device, what=f"loading teacher {i}")
            model, embed_dir = teacher_name(teacher_cfg), teacher_embed_dir(cfg, i)
            if ctx.is_main and i > 0:
                log.info("ensemble teacher %d (%s) -> %s", i, model, embed_dir)
            results.append({modality: _embed_modality(ctx, teacher, model, spec, modality, cfg.match,
                                                      bool(cfg.log.progress), views if modality == "images" else None,
                                                      embed_dir)
                            for modality, spec in (("images", cfg.data.images), ("texts", texts))})
            del teacher  # one teacher in memory at a time
        return {**results[0], "ensemble": results[1:]} if len(results) > 1 else results[0]
