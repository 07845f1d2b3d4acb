"""The match stage: `run_match_stage(cfg)` reads the embed stage's caches `<match.embed_dir>/images`
and `/texts`, runs Algorithm 1 (algorithm1.ground) and writes into `match.out_dir`:

- `corpus/`          the grounded text corpus (match/corpus.py);
- `assignment.npy`   int64 [n_images]: per image row of the image cache (manifest shard order,
  keys.txt order), the text cache row of its sentence, -1 when unmatched;
- `assignment.json`  {image key: sentence key} for matched images, and the cache directories;
- `report.json`, `report.md`, `similarity_hist.png`, `tensorboard/`  the report (match/report.py);
  `timing.json` its wall-clock seconds.

Every output is written under a temporary name (the corpus and tensorboard/ as staged directories)
and renamed, report.json last, after removing the old one first: a directory with a report.json is
complete. A run killed anywhere and run again writes the same bytes as a run never interrupted
(every output but timing.json and tensorboard's event file, which carry wall times), and leaves
nothing of the killed run (tests/multirank/test_stage_soak.py).

On several ranks the exact index runs search.py's multi-node plan: rank r of R computes the top-k
of all images among its contiguous text rows [r*N/R, (r+1)*N/R), rank 0 gathers and merges the
lists (identical to one search over the whole corpus), runs the greedy rounds and the re-queries
over the shared memory-mapped caches, and writes the outputs; every rank returns rank 0's report.
index=ivf (approximate) runs on rank 0 alone."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from dime_ds import atomic
from dime_ds.data.embeddings import EmbeddingCache, open_image_text_caches
from dime_ds.distributed.stage import StageContext, agreed, gather_to_main, on_main, stage
from dime_ds.match.corpus import write_grounded_corpus
from dime_ds.match.report import (REPORT_VERSION, build_report, damaged_shards, example_rows, kept_similarities,
                                   write_report)

if TYPE_CHECKING:
    from dime_ds.config.schema import MatchConfig, RootConfig

log = logging.getLogger(__name__)

IMAGE_CHUNK = 65536  # images searched at once by a rank's partial top-k (bounds memory)
SETTINGS = ("stop_ratio", "topk", "block_size", "index", "nlist", "nprobe", "text_map")  # recorded in the report


def rank_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of text rows [start, stop) that rank `rank` of `world` searches."""
    return rank * n // world, (rank + 1) * n // world


def rank_partial_topk(images: EmbeddingCache, texts: EmbeddingCache, start: int, stop: int, k: int, *,
                      text_map=None, block_size: int | None = None, image_chunk: int = IMAGE_CHUNK,
                      use_gpu: bool | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (global ids) of every image among text rows [start, stop): the rows are read in
    blocks of `block_size`, the images in chunks of `image_chunk`, and the parts merged (search.py's
    multi-node plan, one node's share)."""
    from dime_ds.knn.search import merge_topk, partial_topk

    n_img = len(images)
    best_s = np.full((n_img, k), -np.inf, np.float32)
    best_i = np.full((n_img, k), -1, np.int64)
    block = max(1, int(block_size)) if block_size else max(stop - start, 1)
    image_chunk = max(1, int(image_chunk))
    n_blocks = -(-(stop - start) // block)
    bar = tqdm(total=n_blocks * -(-n_img // image_chunk), desc="partial top-k", disable=not progress, leave=False)
    for lo in range(start, stop, block):
        txt = texts.rows(lo, min(lo + block, stop))
        for q in range(0, n_img, image_chunk):
            img = images.rows(q, min(q + image_chunk, n_img))
            part = partial_topk(img, txt, lo, k, text_map=text_map, use_gpu=use_gpu)
            best_s[q:q + len(img)], best_i[q:q + len(img)] = merge_topk(
                [(best_s[q:q + len(img)], best_i[q:q + len(img)]), part], k)
            bar.update()
    bar.close()
    return best_s, best_i


def centre_views(cache: EmbeddingCache) -> list:
    """A cache's shards, one row per sample: view 0 (the centre view) of a K-view image cache."""
    return [s[:, 0] if s.ndim == 3 else s for s in cache.shards]


def load_text_map(match_cfg: MatchConfig, images: EmbeddingCache, texts: EmbeddingCache) -> np.ndarray | None:
    """match.text_map, checked to map the text embeddings into the image space (None: none is
    needed, the dims agree)."""
    from dime_ds.config import ConfigError

    if not match_cfg.text_map:
        if images.dim != texts.dim:
            raise ConfigError(f"image embeddings are {images.dim}-d, text embeddings {texts.dim}-d: set match.text_map")
        return None
    try:
        text_map = np.load(match_cfg.text_map, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"match.text_map={match_cfg.text_map}: cannot read a .npy array: {err}") from None
    if text_map.ndim != 2 or text_map.shape != (images.dim, texts.dim):
        raise ConfigError(f"match.text_map={match_cfg.text_map} has shape {text_map.shape}, expected "
                          f"({images.dim}, {texts.dim}) (image dim x text dim)")
    return text_map


def _write_assignment(out_dir: Path, assignment: np.ndarray, image_cache: EmbeddingCache,
                      text_cache: EmbeddingCache, image_keys: list[str], text_keys: list[str]) -> None:
    assignment = assignment.astype(np.int64)
    atomic.write_bytes(out_dir / "assignment.npy", lambda f: np.save(f, assignment, allow_pickle=False))
    matched = np.flatnonzero(assignment >= 0)
    atomic.write_json(out_dir / "assignment.json", {
        "format_version": REPORT_VERSION, "images_embed_dir": str(image_cache.directory),
        "texts_embed_dir": str(text_cache.directory), "images": len(image_keys), "matched": len(matched),
        "assignment": {image_keys[i]: text_keys[assignment[i]] for i in matched.tolist()}})


def write_outputs(out_dir: str | os.PathLike, result, image_cache: EmbeddingCache, text_cache: EmbeddingCache,
                  settings: dict, *, shard_size: int = 10000, tensorboard: bool = True, progress: bool = True,
                  started: float | None = None) -> dict:
    """Corpus, assignment and report for a GroundingResult over the two caches; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # From here on the directory does not read as complete: an earlier run's report would describe
    # outputs that this one, if it is killed, leaves half replaced.
    (out_dir / "report.json").unlink(missing_ok=True)
    image_keys, text_keys = image_cache.keys(), text_cache.keys()
    assignment = result.assignment
    corpus = write_grounded_corpus(text_cache, assignment, image_keys, result.similarities, out_dir,
                                   shard_size=shard_size, wanted_texts=assignment[example_rows(assignment)],
                                   progress=progress)
    _write_assignment(out_dir, assignment, image_cache, text_cache, image_keys, text_keys)
    report = build_report(result, image_keys, text_keys, corpus, settings=settings,
                          inputs={"images": str(image_cache.directory), "texts": str(text_cache.directory),
                                  "model": image_cache.model},
                          total_seconds=(time.perf_counter() - started) if started is not None else result.seconds)
    report["damaged_shards"] = {name: damaged_shards(cache.manifest) for name, cache in
                                (("images", image_cache), ("texts", text_cache))}
    write_report(out_dir, report, kept_similarities(result), tensorboard=tensorboard)
    return report


def _open_inputs(cfg: RootConfig) -> tuple[EmbeddingCache, EmbeddingCache, np.ndarray | None]:
    """The image and text caches Algorithm 1 reads: the teacher's; with an ensemble, match.teacher's,
    or (match.teacher null) all teachers' combined by ensemble.weights (match/ensemble.py)."""
    from dime_ds.config.teachers import ensemble_weights, teacher_embed_dir

    n = 1 + len(cfg.ensemble.teachers)
    chosen = [cfg.match.teacher] if cfg.match.teacher is not None else list(range(n))
    opened = [open_image_text_caches(teacher_embed_dir(cfg, i)) for i in chosen]
    for _, texts in opened:
        check_pool(cfg, texts)
    if len(opened) == 1:
        images, texts = opened[0]
        return images, texts, load_text_map(cfg.match, images, texts)
    from dime_ds.config import ConfigError
    from dime_ds.match.ensemble import CombinedCache

    if cfg.match.text_map:
        raise ConfigError("match.text_map maps one teacher's text space: with an ensemble, choose the teacher "
                          "it belongs to with match.teacher=<index>")
    for images, texts in opened:
        load_text_map(cfg.match, images, texts)  # every teacher embeds both modalities in one space
    weights = ensemble_weights(cfg)
    log.info("algorithm 1 scores pairs by the weighted mean of %d teachers' cosine similarities (weights %s)",
             n, ", ".join(f"{w:.3g}" for w in weights))
    return (CombinedCache([i for i, _ in opened], weights), CombinedCache([t for _, t in opened], weights), None)


def check_pool(cfg: RootConfig, texts: EmbeddingCache) -> None:
    """With match.pool=curated the text cache must hold the curated pool: one embedded before curation
    would ground the raw pool."""
    from dime_ds.data.text_pool import CuratedPoolError, curated_dir, text_pool

    if cfg.match.pool != "curated":
        return
    pool = Path(text_pool(cfg)).resolve()
    stray = [r["source"] for r in texts.manifest["shards"] if Path(r["source"]).resolve().parent != pool]
    if stray:
        raise CuratedPoolError(f"match.pool=curated but the text embeddings in {texts.directory} are of "
                               f"{stray[0]}, not of the curated pool {curated_dir(cfg)}: run stage=embed again")


def _candidates(ctx: StageContext, m: MatchConfig, images: EmbeddingCache, texts: EmbeddingCache, text_map,
                use_gpu: bool | None, progress: bool):
    """The multi-node plan (index=flat on several ranks): every rank's partial top-k over its text
    rows, on rank 0 the gathered parts (None elsewhere). None everywhere when rank 0 searches alone."""
    n_img, n_txt = len(images), len(texts)
    if ctx.world_size == 1 or m.index != "flat" or n_img == 0 or n_txt == 0:
        if ctx.world_size > 1 and ctx.is_main:
            log.info("algorithm 1 (%s) on rank 0 of %d: %d images x %d sentences", m.index, ctx.world_size,
                     n_img, n_txt)
        return None
    k = min(int(m.topk), n_txt)
    start, stop = rank_rows(n_txt, ctx.rank, ctx.world_size)
    if ctx.is_main:
        log.info("algorithm 1 on %d ranks: %d images x %d sentences (topk=%d, block_size=%d), ~%d sentences "
                 "per rank", ctx.world_size, n_img, n_txt, m.topk, m.block_size, n_txt // ctx.world_size)
    t0 = time.perf_counter()
    part = agreed(rank_partial_topk, images, texts, start, stop, max(k, 1), text_map=text_map,
                  block_size=m.block_size, image_chunk=IMAGE_CHUNK, use_gpu=use_gpu, progress=progress,
                  what="partial top-k")
    log.info("rank %d: partial top-%d over sentences [%d, %d) in %.1f s", ctx.rank, k, start, stop,
             time.perf_counter() - t0)
    return gather_to_main(part)


def run_match_stage(cfg: RootConfig) -> dict:
    """`python -m dime_ds.match stage=match`: Algorithm 1 over the embed stage's caches, on every rank
    of the job (see the module docstring; a process group is made when the world has several ranks
    and none exists). A failure on any rank is raised on every rank. Returns rank 0's report."""
    from dime_ds.match.algorithm1 import ground
    from dime_ds.knn.search import merge_topk

    started = time.perf_counter()
    m = cfg.match
    with stage(cfg.dist, cfg.device) as ctx:
        images, texts, text_map = agreed(_open_inputs, cfg, what="opening the embedding caches")
        progress = bool(cfg.log.progress) and ctx.is_main
        use_gpu = False if cfg.device == "cpu" else None
        if ctx.world_size == 1:
            log.info("algorithm 1: %d images x %d sentences (%s, topk=%d, block_size=%d)", len(images), len(texts),
                     m.index, m.topk, m.block_size)
        # A list that rank 0 empties when it merges: the gathered parts are freed before the rounds run.
        gathered = [_candidates(ctx, m, images, texts, text_map, use_gpu, progress)]

        def ground_and_write() -> dict:  # rank 0
            parts = gathered.pop()
            candidates = None if parts is None else merge_topk(parts, min(int(m.topk), len(texts)))
            del parts
            result = ground(centre_views(images), texts.shards, stop_ratio=m.stop_ratio, text_map=text_map, topk=m.topk,
                            block_size=m.block_size, index=m.index, nlist=m.nlist, nprobe=m.nprobe,
                            use_gpu=use_gpu, candidates=candidates, progress=progress)
            return write_outputs(m.out_dir, result, images, texts, {k: m[k] for k in SETTINGS},
                                 shard_size=int(m.shard_size), tensorboard=bool(cfg.log.tensorboard),
                                 progress=progress, started=started)

        report = on_main(ground_and_write, what="the match stage")
    if ctx.is_main:
        log.info("grounded corpus: %d of %d images matched in %d rounds, %d sentences kept -> %s",
                 report["images_matched"], report["images"], report["rounds"], report["sentences_kept"],
                 report["corpus"]["dir"])
    return report
