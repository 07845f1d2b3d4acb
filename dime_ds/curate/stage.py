"""The curation stage: `run_curate_stage(cfg)` (`python -m dime_ds.curate stage=metaclip`) curates
the raw sentence pool, or with curate.input=grounded the grounded corpus (data/text_pool.py), with
MetaCLIP's matching and balancing (metaclip.py) on every rank of the job, into `curate.out_dir`:

- `matches/`        per input shard, its matched sentences (matches.py; reused by a rerun or resume);
- `corpus/`         the curated pool: input shard i's kept sentences, every field as in the pool,
                    under the pool's keys, in `curated-{i:06d}-000000.tar` (no file when none is
                    kept); with match.pool=curated the embed and match stages read it;
- `entry_counts.npy`, `entry_counts_kept.npy`  int64 per metadata entry, before and after;
- `report.json`, `report.md`, `entry_counts.png`  (report.py); `curate.json` last: the run is complete.

Ranks: rank r matches the input shards i with i % R == r; the per-entry counts are summed over ranks
in one all-reduce of integers; t is then the same on every rank (given; from the tail share; or
bisected on the expected size, each rank summing its sentences' keep probabilities as exact
integers, one all-reduce per step); each rank writes its shards' kept sentences; rank 0 swaps the
corpus in and writes the report. A sentence's keep draw hashes (curate.seed, its key), so the
curated corpus is the same for every world size, rerun and resume (tested)."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from dime_ds import atomic
from dime_ds.curate import metaclip
from dime_ds.curate.matches import ShardMatches, concat, match_shard
from dime_ds.curate.metadata import Metadata, load_metadata
from dime_ds.data.text_pool import DONE, curation_input
from dime_ds.data.pipelines import iter_tar_samples
from dime_ds.data.shards import ShardWriter, list_shards
from dime_ds.distributed import collectives as C
from dime_ds.distributed.stage import agreed, gather_to_main, on_main, stage
from dime_ds.errors import UserError

if TYPE_CHECKING:
    from dime_ds.config.schema import CurateConfig, RootConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ONE_SHARD = 1 << 62  # ShardWriter maxcount: one output shard per input shard


class CurationError(UserError, ValueError):
    """A curation that cannot give a corpus (nothing matched, an unreachable target size)."""


def _sum_over_ranks(values: np.ndarray) -> np.ndarray:
    return C.all_reduce_sum(torch.from_numpy(np.ascontiguousarray(values, np.int64))).numpy()


def _match_rank(meta: Metadata, urls: list[str], mine: list[int], directory: Path, progress: bool
                ) -> tuple[list[ShardMatches], int]:
    matcher, digest = metaclip.Matcher(meta.entries), metadata_digest(meta)
    parts, computed = [], 0
    for i in tqdm(mine, desc="curate: matching", unit="shard", disable=not progress):
        part, now = match_shard(matcher, directory, i, urls[i], digest)
        parts.append(part)
        computed += now
    return parts, computed


def metadata_digest(meta: Metadata) -> str:
    """What the match records depend on: the normalised entries (not the file's bytes)."""
    return hashlib.sha256("\n".join(meta.entries).encode("utf-8")).hexdigest()


def resolve_t(c: CurateConfig, counts: np.ndarray, csr: tuple[np.ndarray, np.ndarray], n_matched: int
              ) -> tuple[float, str]:
    """(t, how it was chosen). Collective for target_size (one all-reduce per bisection step)."""
    if c.t is not None:
        return float(c.t), "given (curate.t)"
    if c.tail_share is not None:
        return metaclip.p_to_t(counts, c.tail_share), f"tail share p(t) = {c.tail_share} (curate.tail_share)"
    if c.target_size > n_matched:
        raise CurationError(f"curate.target_size={c.target_size} exceeds the {n_matched} sentences that match "
                            "any entry (the most balancing can keep)")

    def expected_fixed(t: float) -> int:
        local = metaclip.expected_size_fixed(metaclip.keep_probability(csr, counts, t))
        return int(_sum_over_ranks(np.array([local]))[0])

    t = metaclip.solve_t(expected_fixed, c.target_size, float(counts.max()))
    return t, f"solved for an expected size of {c.target_size} (curate.target_size)"


def _prepare(out: Path) -> None:  # rank 0, before anyone writes
    (out / DONE).unlink(missing_ok=True)
    shutil.rmtree(out / "corpus.tmp", ignore_errors=True)
    (out / "corpus.tmp").mkdir(parents=True)


def _write_rank_corpus(parts: list[ShardMatches], counts: np.ndarray, t: float, seed: int, staging: Path,
                       n_entries: int, progress: bool) -> tuple[list[dict], np.ndarray]:
    """Each of this rank's shards: its kept sentences into the staging corpus. Returns the shard
    records and the per-entry counts over the kept sentences."""
    records, kept_counts = [], np.zeros(n_entries, np.int64)
    for part in tqdm(parts, desc="curate: writing", unit="shard", disable=not progress):
        keep = metaclip.keep_mask(part.keys, (part.offsets, part.entries), counts, t, seed)
        kept_keys = {k for k, kept in zip(part.keys, keep) if kept}
        for j in np.flatnonzero(keep):
            kept_counts[part.entries[part.offsets[j]:part.offsets[j + 1]]] += 1
        writer = ShardWriter(staging, prefix=f"curated-{part.index:06d}", maxcount=ONE_SHARD)
        written = 0
        try:
            for raw in iter_tar_samples([part.source]):
                if raw.get("__key__") in kept_keys:
                    writer.write(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
                    written += 1
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if written != len(kept_keys):
            raise RuntimeError(f"{part.source}: {len(kept_keys)} sentences kept but {written} written: the shard "
                               "changed during curation")
        records.append({"index": part.index, "source": part.source, "sentences": part.record["sentences"],
                        "matched": len(part.keys), "kept": written, "skipped": part.record["skipped"],
                        "shard": Path(writer.paths[0]).name if writer.paths else None})
    return records, kept_counts


def _finish(cfg: RootConfig, meta: Metadata, source: str, urls: list[str], gathered: list[list[dict]],
            counts: np.ndarray, kept_counts: np.ndarray, t: float, how: str, expected: float, computed: int) -> dict:
    """Rank 0: the corpus swapped in, counts, report, and the completion record last."""
    from dime_ds.curate.report import build_report, write_report

    out = Path(cfg.curate.out_dir)
    atomic.replace_dir(out / "corpus.tmp", out / "corpus")
    for name, array in (("entry_counts.npy", counts), ("entry_counts_kept.npy", kept_counts)):
        atomic.write_bytes(out / name, lambda f, a=array: np.save(f, a, allow_pickle=False))
    shards = sorted((r for rank in gathered for r in rank), key=lambda r: r["index"])
    report = build_report(cfg.curate, meta, source, shards, counts, kept_counts, t, how, expected,
                          matched_now=computed)
    write_report(out, report)
    done = {"format_version": FORMAT_VERSION, "pool": source, "input": cfg.curate.input, "sources": urls,
            "metadata": meta.path, "metadata_sha256": meta.sha256, "t": t, "seed": int(cfg.curate.seed),
            "corpus": str(out / "corpus"), "shards": [{k: r[k] for k in ("index", "source", "shard", "kept")}
                                                       for r in shards]}
    atomic.write_json(out / DONE, done)
    return report


def run_curate_stage(cfg: RootConfig) -> dict:
    """Curate the raw sentence pool on every rank of the job (see the module docstring); a failure
    on any rank is raised on every rank. Returns rank 0's report on every rank."""
    from dime_ds.config import ConfigError, require

    c = cfg.curate
    require(cfg, "curate.metadata")
    if c.t is None and c.target_size is None and c.tail_share is None:
        raise ConfigError("the curation stage needs one of curate.t=<threshold>, curate.target_size=<sentences> "
                          "or curate.tail_share=<p> (MetaCLIP: t=20000 for a 1.6B-text pool)")
    out = Path(c.out_dir)
    with stage(cfg.dist, cfg.device) as ctx:
        progress = bool(cfg.log.progress) and ctx.is_main
        source = agreed(curation_input, cfg, what="finding the sentences to curate")
        urls = agreed(list_shards, source, what="listing the sentence pool")
        meta = agreed(load_metadata, c.metadata, what="reading the metadata")
        if ctx.is_main:
            log.info("curating %d shard(s) of %s against %d entries (%s) on %d rank(s)", len(urls), source,
                     len(meta.entries), meta.path, ctx.world_size)
            for note in meta.notes:
                log.info("metadata %s: %s", meta.path, note)
        mine = [i for i in range(len(urls)) if i % ctx.world_size == ctx.rank]
        parts, computed = agreed(_match_rank, meta, urls, mine, out / "matches", progress, what="matching")
        csr = concat(parts)
        n = len(meta.entries)
        local = np.concatenate([metaclip.entry_counts(csr, n),
                                [sum(p.record["sentences"] for p in parts), len(csr[0]) - 1, computed]])
        total = _sum_over_ranks(local)  # the one all-reduce of the counts
        counts, (n_sentences, n_matched, computed) = total[:n], total[n:].tolist()
        if n_matched == 0:
            raise CurationError(f"none of the {n_sentences} sentences of {source} matches an entry of "
                                f"{meta.path}: nothing to keep")
        t, how = resolve_t(c, counts, csr, n_matched)
        expected = metaclip.from_fixed(int(_sum_over_ranks(np.array(
            [metaclip.expected_size_fixed(metaclip.keep_probability(csr, counts, t))]))[0]))
        if ctx.is_main:
            log.info("t = %.6g (%s): %d of %d sentences match; expected to keep %.1f", t, how, n_matched,
                     n_sentences, expected)
        on_main(_prepare, out, what="preparing the curated corpus")
        records, kept_counts = agreed(_write_rank_corpus, parts, counts, t, int(c.seed), out / "corpus.tmp", n,
                                      progress, what="writing the curated corpus")
        kept_counts = _sum_over_ranks(kept_counts)
        gathered = gather_to_main(records)
        report = on_main(_finish, cfg, meta, source, urls, gathered, counts, kept_counts, t, how, expected, computed,
                         what="writing the curation report")
    if ctx.is_main:
        log.info("curated pool: %d of %d sentences kept (%.1f %%) -> %s", report["sentences_kept"],
                 report["sentences"], 100 * report["kept_share"], report["corpus"])
        if c.input == "grounded":
            log.info("train on it: data.texts=%s", report["corpus"])
    return report
