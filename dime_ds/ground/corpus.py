"""The match stage's outputs: the grounded text corpus, the image -> sentence assignment and a report.

`run_match_stage(cfg)` reads the embed stage's caches `<match.embed_dir>/images` and `/texts`, runs
Algorithm 1 (algorithm1.ground) and writes into `match.out_dir`:

- `corpus/grounded-NNNNNN.tar`  webdataset text shards (`txt` + `json`), one sample per kept
  sentence, in the order of the source corpus, under the sentence's *source key* (so a teacher
  text cache keyed by the source corpus still serves it). json: {"source_key", "image_key",
  "similarity", "source_shard", "meta": the source sample's json, if it had one}. The distill
  stage reads it directly: `data.texts=<match.out_dir>/corpus`.
- `assignment.npy`   int64 [n_images]: per image row of the image cache (manifest shard order,
  keys.txt order), the text cache row of its sentence, -1 when unmatched.
- `assignment.json`  {image key: sentence key} for matched images, and the cache directories.
- `report.json`, `report.md`, `similarity_hist.png`: images matched, rounds, per-round counts,
  sentences kept, similarity statistics and histogram, 10 examples; `kinds` counts the source
  json's "kind" field (the synthetic world labels its sentences) over the corpus and the kept set.
- `tensorboard/`     the same scalars, the histogram and the examples.

The corpus is written into a staging directory and swapped in at the end, so an interrupted run
never leaves a mix of old and new shards.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError
from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import ShardWriter, sha256_file

log = logging.getLogger(__name__)

REPORT_VERSION = 1
N_EXAMPLES = 10
HIST_BINS = 40


class CorpusSourceError(RuntimeError):
    """The source text shards no longer match the text embedding cache."""


def cache_keys(cache: EmbeddingCache) -> list[str]:
    """All keys of an embedding cache in row order (manifest shards, then keys.txt lines)."""
    keys: list[str] = []
    for record in cache.manifest["shards"]:
        keys.extend((cache.directory / f"{record['name']}.keys.txt").read_text(encoding="utf-8").splitlines())
    if len(keys) != len(cache):
        raise EmbeddingCacheError(f"embedding cache {cache.directory}: {len(keys)} keys for {len(cache)} rows")
    return keys


def write_grounded_corpus(text_cache: EmbeddingCache, assignment: np.ndarray, image_keys: Sequence[str],
                          similarities: np.ndarray, out_dir: str | os.PathLike, *, shard_size: int = 10000,
                          wanted_texts: Sequence[int] = (), progress: bool = True) -> dict:
    """Stream the text cache's source shards and write every assigned sentence into
    `out_dir/corpus`. Returns {"dir", "shards", "counts", "texts": {row: sentence} for
    `wanted_texts`, "kinds": {"corpus": Counter, "kept": Counter}}."""
    out_dir = Path(out_dir)
    n_txt = len(text_cache)
    image_of = np.full(n_txt, -1, dtype=np.int64)
    matched = np.flatnonzero(assignment >= 0)
    image_of[assignment[matched]] = matched
    wanted = set(int(w) for w in wanted_texts)
    texts: dict[int, str] = {}
    kinds_all, kinds_kept = Counter(), Counter()
    final, staging = out_dir / "corpus", out_dir / "corpus.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    written, start = 0, 0
    writer = ShardWriter(staging, prefix="grounded", maxcount=shard_size)
    try:
        records = text_cache.manifest["shards"]
        for record in tqdm(records, desc="grounded corpus", disable=not progress):
            rows = {key: start + i for i, key in enumerate(
                (text_cache.directory / f"{record['name']}.keys.txt").read_text(encoding="utf-8").splitlines())}
            start += record["count"]
            source = record["source"]
            if sha256_file(source) != record["source_sha256"]:
                raise CorpusSourceError(f"{source} changed since it was embedded (sha256 differs from "
                                        f"{text_cache.directory}/manifest.json): run stage=embed again")
            for raw in iter_tar_samples([source]):
                row = rows.get(raw.get("__key__"))
                if row is None:  # skipped at embed time
                    continue
                image = int(image_of[row])
                meta = None
                if "json" in raw:
                    try:
                        meta = json.loads(raw["json"])
                    except ValueError:
                        meta = None
                kind = meta.get("kind") if isinstance(meta, dict) else None
                if kind is not None:
                    kinds_all[kind] += 1
                if image < 0 and row not in wanted:
                    continue
                try:
                    text = decode_sample({k: v for k, v in raw.items() if k in ("__key__", "__url__", "txt")})["text"]
                except (SampleError, KeyError) as err:
                    raise CorpusSourceError(f"{source}: sentence {raw.get('__key__')} was embedded but no longer "
                                            f"decodes: {err}") from None
                if row in wanted:
                    texts[row] = text
                if image < 0:
                    continue
                if kind is not None:
                    kinds_kept[kind] += 1
                info = {"source_key": raw["__key__"], "image_key": image_keys[image],
                        "similarity": round(float(similarities[image]), 6), "source_shard": str(source)}
                if meta is not None:
                    info["meta"] = meta
                writer.write(raw["__key__"], {"txt": text, "json": json.dumps(info, sort_keys=True)})
                written += 1
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if written != len(matched):
        shutil.rmtree(staging, ignore_errors=True)
        raise CorpusSourceError(f"{len(matched)} sentences were assigned but only {written} were found in the "
                                "source shards of the text cache: the shards changed; run stage=embed again")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    shards = [str(final / Path(p).name) for p in writer.paths]
    return {"dir": str(final), "shards": shards, "counts": list(writer.counts), "texts": texts,
            "kinds": {"corpus": dict(kinds_all), "kept": dict(kinds_kept)}}


def histogram_png(counts: Sequence[int], edges: Sequence[float], path: str | os.PathLike,
                  title: str = "cosine similarity of kept pairs") -> Path:
    """A bar chart of a histogram, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 720, 420, 60, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 12), title, fill="black", font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    peak = max(max(counts), 1) if len(counts) else 1
    bar_w = plot_w / max(len(counts), 1)
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        x0 = left + i * bar_w
        draw.rectangle([x0 + 1, top + plot_h - h, x0 + bar_w - 1, top + plot_h], fill=(70, 110, 200))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + frac * plot_w
        value = edges[0] + frac * (edges[-1] - edges[0]) if len(edges) else 0.0
        draw.line([x, top + plot_h, x, top + plot_h + 5], fill="black")
        draw.text((x - 14, top + plot_h + 8), f"{value:.3f}", fill="black", font=font)
    draw.text((4, top - 4), str(peak), fill="black", font=font)
    draw.text((4, top + plot_h - 10), "0", fill="black", font=font)
    draw.text((left + plot_w // 2 - 40, height - 18), "cosine similarity", fill="black", font=font)
    path = Path(path)
    image.save(path, format="PNG")
    return path


def _similarity_stats(sims: np.ndarray) -> dict:
    if len(sims) == 0:
        return {"count": 0, "histogram": {"counts": [], "edges": []}}
    lo, hi = float(sims.min()), float(sims.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(sims, bins=HIST_BINS, range=(lo, hi))
    q = np.percentile(sims, [1, 5, 25, 50, 75, 95, 99])
    return {"count": int(len(sims)), "mean": float(sims.mean()), "std": float(sims.std()), "min": lo,
            "max": float(sims.max()), "percentiles": {str(p): float(v) for p, v in zip((1, 5, 25, 50, 75, 95, 99), q)},
            "histogram": {"counts": counts.tolist(), "edges": [float(e) for e in edges]}}


def example_rows(assignment: np.ndarray, n: int = N_EXAMPLES) -> np.ndarray:
    """Up to n matched images, evenly spread over the image order (deterministic)."""
    matched = np.flatnonzero(assignment >= 0)
    if len(matched) <= n:
        return matched
    return matched[np.linspace(0, len(matched) - 1, n).round().astype(int)]


def _markdown(report: dict) -> str:
    r = report
    lines = [
        "# Grounded text corpus (DIME-FM Algorithm 1)", "",
        f"- images: {r['images']}, sentences in the corpus: {r['sentences']}",
        f"- images matched (= sentences kept): {r['images_matched']} ({100 * r['match_rate']:.1f} % of the images)",
        f"- rounds: {r['rounds']} (stop_ratio {r['settings']['stop_ratio']}), re-queried images: {r['requeried']}",
        f"- search: index={r['settings']['index']} topk={r['settings']['topk']} "
        f"block_size={r['settings']['block_size']} ({'exact' if r['exact'] else 'approximate'})",
        f"- corpus: {len(r['corpus']['shards'])} shard(s) in `{r['corpus']['dir']}`",
        f"- time: {r['seconds']['algorithm1']:.1f} s matching, {r['seconds']['total']:.1f} s in all", "",
        "## Rounds", "", "| round | images before | matched | share |", "|---:|---:|---:|---:|",
    ]
    for row in r["per_round"]:
        lines.append(f"| {row['round']} | {row['remaining_before']} | {row['matched']} | "
                     f"{100 * row['matched'] / max(row['remaining_before'], 1):.1f} % |")
    s = r["similarity"]
    lines += ["", "## Similarity of kept pairs", ""]
    if s["count"]:
        lines += [f"mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.4f}, median "
                  f"{s['percentiles']['50']:.4f}, max {s['max']:.4f}", "", "![histogram](similarity_hist.png)"]
    if r.get("kinds", {}).get("corpus"):
        lines += ["", "## Sentence kinds (source json \"kind\")", "", "| kind | in corpus | kept |", "|---|---:|---:|"]
        for kind, total in sorted(r["kinds"]["corpus"].items()):
            lines.append(f"| {kind} | {total} | {r['kinds']['kept'].get(kind, 0)} |")
    lines += ["", "## Examples", "", "| image | sentence key | similarity | sentence |", "|---|---|---:|---|"]
    for e in r["examples"]:
        text = e["text"].replace("|", "\\|")
        lines.append(f"| {e['image_key']} | {e['sentence_key']} | {e['similarity']:.4f} | {text} |")
    return "\n".join(lines) + "\n"


def _tensorboard(log_dir: Path, report: dict, sims: np.ndarray, png: Path | None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag in ("images_matched", "sentences_kept", "rounds", "match_rate", "requeried"):
            writer.add_scalar(f"match/{tag}", report[tag], 0)
        for row in report["per_round"]:
            writer.add_scalar("match/round_matched", row["matched"], row["round"])
            writer.add_scalar("match/round_remaining_before", row["remaining_before"], row["round"])
        if len(sims):
            writer.add_histogram("match/similarity", sims, 0)
            writer.add_scalar("match/similarity_mean", float(sims.mean()), 0)
        if png is not None:
            from PIL import Image

            writer.add_image("match/similarity_histogram", np.asarray(Image.open(png).convert("RGB")), 0,
                             dataformats="HWC")
        writer.add_text("match/examples", "\n".join(
            f"{e['image_key']} -> {e['sentence_key']} ({e['similarity']:.3f}): {e['text']}  " for e in report["examples"]), 0)
    finally:
        writer.close()


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(out_dir: str | os.PathLike, result, image_cache: EmbeddingCache, text_cache: EmbeddingCache,
                  settings: dict, *, shard_size: int = 10000, tensorboard: bool = True, progress: bool = True,
                  started: float | None = None) -> dict:
    """Corpus, assignment and report for a GroundingResult over the two caches; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_keys, text_keys = cache_keys(image_cache), cache_keys(text_cache)
    assignment = result.assignment
    sims = result.similarities
    examples = example_rows(assignment)
    corpus = write_grounded_corpus(text_cache, assignment, image_keys, sims, out_dir, shard_size=shard_size,
                                   wanted_texts=assignment[examples], progress=progress)

    tmp = out_dir / "assignment.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, assignment.astype(np.int64), allow_pickle=False)
    os.replace(tmp, out_dir / "assignment.npy")
    matched = np.flatnonzero(assignment >= 0)
    _atomic_text(out_dir / "assignment.json", json.dumps({
        "format_version": REPORT_VERSION, "images_embed_dir": str(image_cache.directory),
        "texts_embed_dir": str(text_cache.directory), "images": len(image_keys), "matched": len(matched),
        "assignment": {image_keys[i]: text_keys[assignment[i]] for i in matched.tolist()}}, indent=1) + "\n")

    kept_sims = sims[matched].astype(np.float64) if len(matched) else np.empty(0)
    stats = _similarity_stats(kept_sims)
    png = None
    if stats["count"]:
        png = histogram_png(stats["histogram"]["counts"], stats["histogram"]["edges"], out_dir / "similarity_hist.png")
    report = {
        "format_version": REPORT_VERSION,
        "images": len(image_keys), "sentences": len(text_keys),
        "images_matched": result.images_matched, "sentences_kept": result.sentences_kept,
        "match_rate": result.images_matched / max(len(image_keys), 1),
        "rounds": result.rounds, "requeried": result.requeried, "exact": result.exact,
        "per_round": [{"round": i + 1, "remaining_before": b, "matched": m}
                      for i, (b, m) in enumerate(zip(result.remaining_before, result.per_round))],
        "similarity": stats,
        "kinds": corpus["kinds"],
        "examples": [{"image_key": image_keys[i], "sentence_key": text_keys[assignment[i]],
                      "similarity": float(sims[i]), "text": corpus["texts"].get(int(assignment[i]), "")}
                     for i in examples.tolist()],
        "corpus": {"dir": corpus["dir"], "shards": corpus["shards"], "counts": corpus["counts"]},
        "inputs": {"images": str(image_cache.directory), "texts": str(text_cache.directory),
                   "model": image_cache.model},
        "settings": settings,
        "seconds": {"algorithm1": result.seconds,
                    "total": (time.perf_counter() - started) if started is not None else result.seconds},
    }
    if tensorboard:
        _tensorboard(out_dir / "tensorboard", report, kept_sims, png)
    _atomic_text(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    _atomic_text(out_dir / "report.md", _markdown(report))
    return report


def open_caches(embed_dir: str | os.PathLike) -> tuple[EmbeddingCache, EmbeddingCache]:
    from dime_ds.config import ConfigError

    embed_dir = Path(embed_dir)
    caches = []
    for modality in ("images", "texts"):
        try:
            cache = EmbeddingCache(embed_dir / modality)
        except EmbeddingCacheError as err:
            raise ConfigError(f"match.embed_dir={embed_dir}: {err}\nRun `python -m dime_ds.match stage=embed` "
                              "(same overrides) first.") from None
        if cache.manifest["modality"] != modality:
            raise ConfigError(f"{cache.directory} holds {cache.manifest['modality']} embeddings, not {modality}")
        caches.append(cache)
    images, texts = caches
    if images.model != texts.model:
        raise ConfigError(f"image embeddings come from {images.model!r}, text embeddings from {texts.model!r}: "
                          "Algorithm 1 needs one teacher for both; re-run stage=embed")
    return images, texts


IMAGE_CHUNK = 65536  # images searched at once by a rank's partial top-k (bounds memory)


def rank_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of text rows [start, stop) that rank `rank` of `world` searches."""
    return rank * n // world, (rank + 1) * n // world


def _raw_rows(shards: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Raw rows [start, stop) of a list of (memory-mapped) shards, stacked."""
    pieces, base = [], 0
    for part in shards:
        lo, hi = max(start, base), min(stop, base + len(part))
        if lo < hi:
            pieces.append(np.asarray(part[lo - base:hi - base]))
        base += len(part)
    if not pieces:
        return np.empty((0, shards[0].shape[1]), np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def rank_partial_topk(images: EmbeddingCache, texts: EmbeddingCache, start: int, stop: int, k: int, *,
                      text_map=None, block_size: int | None = None, image_chunk: int = IMAGE_CHUNK,
                      use_gpu: bool | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (global ids) of every image among text rows [start, stop): the rows are read in
    blocks of `block_size`, the images in chunks of `image_chunk`, and the parts merged (search.py's
    multi-node plan, one node's share)."""
    from dime_ds.ground.search import merge_topk, partial_topk

    n_img = len(images)
    best_s = np.full((n_img, k), -np.inf, np.float32)
    best_i = np.full((n_img, k), -1, np.int64)
    block = max(1, int(block_size)) if block_size else max(stop - start, 1)
    image_chunk = max(1, int(image_chunk))
    n_blocks = -(-(stop - start) // block)
    bar = tqdm(total=n_blocks * -(-n_img // image_chunk), desc="partial top-k", disable=not progress, leave=False)
    for lo in range(start, stop, block):
        txt = _raw_rows(texts.shards, lo, min(lo + block, stop))
        for q in range(0, n_img, image_chunk):
            img = _raw_rows(images.shards, q, min(q + image_chunk, n_img))
            part = partial_topk(img, txt, lo, k, text_map=text_map, use_gpu=use_gpu)
            best_s[q:q + len(img)], best_i[q:q + len(img)] = merge_topk(
                [(best_s[q:q + len(img)], best_i[q:q + len(img)]), part], k)
            bar.update()
    bar.close()
    return best_s, best_i


def run_match_stage(cfg: Any) -> dict:
    """`python -m dime_ds.match stage=match`: Algorithm 1 over the embed stage's caches.

    On several ranks (torchrun, srun, submitit; a process group is made when the world has several
    ranks and none exists) the exact index runs search.py's multi-node plan: rank r of R computes
    the top-k of all images among its contiguous text rows [r*N/R, (r+1)*N/R), rank 0 gathers and
    merges the lists (identical to one search over the whole corpus), runs the greedy rounds and
    the re-queries over the shared memory-mapped caches, and writes the outputs; every rank returns
    rank 0's report. index=ivf (approximate) runs on rank 0 alone."""
    from dime_ds.config import ConfigError
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.env import backend_for, device_for, init_distributed, world_info
    from dime_ds.ground.algorithm1 import ground

    started = time.perf_counter()
    m = cfg.match
    info = world_info()
    if not C.is_distributed() and info.world_size > 1:
        init_distributed(info, backend_for(device_for(info, cfg.device), cfg.dist.backend), cfg.dist.timeout_min)
    rank, world = C.rank(), C.world_size()
    images, texts = open_caches(m.embed_dir)
    text_map = None
    if m.text_map:
        try:
            text_map = np.load(m.text_map, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"match.text_map={m.text_map}: cannot read a .npy array: {err}") from None
        if text_map.ndim != 2 or text_map.shape != (images.dim, texts.dim):
            raise ConfigError(f"match.text_map={m.text_map} has shape {text_map.shape}, expected "
                              f"({images.dim}, {texts.dim}) (image dim x text dim)")
    elif images.dim != texts.dim:
        raise ConfigError(f"image embeddings are {images.dim}-d, text embeddings {texts.dim}-d: set match.text_map")
    progress = bool(cfg.log.progress) and rank == 0
    use_gpu = False if cfg.device == "cpu" else None
    settings = {k: m[k] for k in ("stop_ratio", "topk", "block_size", "index", "nlist", "nprobe", "text_map")}

    def ground_and_write(candidates=None) -> dict:
        result = ground(images.shards, texts.shards, stop_ratio=m.stop_ratio, text_map=text_map, topk=m.topk,
                        block_size=m.block_size, index=m.index, nlist=m.nlist, nprobe=m.nprobe,
                        use_gpu=use_gpu, candidates=candidates, progress=progress)
        return write_outputs(m.out_dir, result, images, texts, settings,
                             shard_size=int(getattr(m, "shard_size", 10000)), tensorboard=bool(cfg.log.tensorboard),
                             progress=progress, started=started)

    if world == 1:
        log.info("algorithm 1: %d images x %d sentences (%s, topk=%d, block_size=%d)", len(images), len(texts),
                 m.index, m.topk, m.block_size)
        report = ground_and_write()
    else:
        report = _run_distributed(m, images, texts, text_map, rank, world, use_gpu, progress, ground_and_write)
    if rank == 0:
        log.info("grounded corpus: %d of %d images matched in %d rounds, %d sentences kept -> %s",
                 report["images_matched"], report["images"], report["rounds"], report["sentences_kept"],
                 report["corpus"]["dir"])
    return report


def _run_distributed(m: Any, images: EmbeddingCache, texts: EmbeddingCache, text_map, rank: int, world: int,
                     use_gpu: bool | None, progress: bool, ground_and_write) -> dict:
    """The multi-rank match stage (see run_match_stage): partial top-k per rank, merge + Algorithm 1 +
    outputs on rank 0, its report (or its error) broadcast to every rank."""
    from dime_ds.distributed import collectives as C
    from dime_ds.ground.search import merge_topk

    n_img, n_txt = len(images), len(texts)
    plan = m.index == "flat" and n_img > 0 and n_txt > 0
    part, error = None, None
    if plan:
        k = min(int(m.topk), n_txt)
        start, stop = rank_rows(n_txt, rank, world)
        if rank == 0:
            log.info("algorithm 1 on %d ranks: %d images x %d sentences (topk=%d, block_size=%d), "
                     "~%d sentences per rank", world, n_img, n_txt, m.topk, m.block_size, n_txt // world)
        t0 = time.perf_counter()
        try:
            part = rank_partial_topk(images, texts, start, stop, max(k, 1), text_map=text_map,
                                     block_size=m.block_size, image_chunk=IMAGE_CHUNK, use_gpu=use_gpu,
                                     progress=progress)
            log.info("rank %d: partial top-%d over sentences [%d, %d) in %.1f s", rank, k, start, stop,
                     time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"rank {rank}: {type(err).__name__}: {err}"
            log.exception("rank %d: partial top-k failed", rank)
            part = None
    elif rank == 0:
        log.info("algorithm 1 (%s) on rank 0 of %d: %d images x %d sentences", m.index, world, n_img, n_txt)
    gathered = C.gather_object_to_main((error, part)) if plan else None
    report = None
    if rank == 0:
        try:
            if plan:
                errors = [e for e, _ in gathered if e]
                if errors:
                    raise RuntimeError(f"partial top-k failed on {len(errors)} rank(s):\n" + "\n".join(errors))
                merged = merge_topk([p for _, p in gathered], min(int(m.topk), n_txt))
                del gathered
                report = ground_and_write(candidates=merged)
            else:
                report = ground_and_write()
            error = None
        except Exception as err:  # noqa: BLE001 - re-raised here, reported on the others
            error = f"rank 0: {type(err).__name__}: {err}"
            report, error = C.broadcast_object((None, error))
            raise
    report, error = C.broadcast_object((report, error))  # the other ranks wait here for rank 0
    if error:
        raise RuntimeError(f"the match stage failed: {error}")
    return report
