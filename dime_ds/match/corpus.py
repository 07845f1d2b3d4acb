"""The grounded text corpus: the sentences Algorithm 1 kept, streamed from the text cache's source
shards into webdataset shards `<out>/corpus/grounded-NNNNNN.tar` (`txt` + `json`), one sample per
kept sentence, in the order of the source corpus, under the sentence's *source key* (so a teacher
text cache keyed by the source corpus still serves it). json: {"source_key", "image_key",
"similarity", "source_shard", "meta": the source sample's json, if it had one}. The distill stage
reads it directly: `data.texts=<match.out_dir>/corpus`.

The corpus is written into a staging directory and swapped in at the end, so an interrupted run
never leaves a mix of old and new shards.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from dime_ds import atomic
from dime_ds.data.embeddings import EmbeddingCache
from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import ShardWriter, sha256_file


class CorpusSourceError(RuntimeError):
    """The source text shards no longer match the text embedding cache."""


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
    final = out_dir / "corpus"
    written, start = 0, 0
    keys = text_cache.keys()
    with atomic.staged_dir(final) as staging, ShardWriter(staging, prefix="grounded", maxcount=shard_size) as writer:
        records = text_cache.manifest["shards"]
        for record in tqdm(records, desc="grounded corpus", disable=not progress):
            rows = {key: start + i for i, key in enumerate(keys[start:start + record["count"]])}
            start += record["count"]
            source = record["source"]
            if record["count"] == 0:  # a damaged shard nothing could be read from (it may not even open)
                continue
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
        if written != len(matched):
            raise CorpusSourceError(f"{len(matched)} sentences were assigned but only {written} were found in the "
                                    "source shards of the text cache: the shards changed; run stage=embed again")
    shards = [str(final / Path(p).name) for p in writer.paths]
    return {"dir": str(final), "shards": shards, "counts": list(writer.counts), "texts": texts,
            "kinds": {"corpus": dict(kinds_all), "kept": dict(kinds_kept)}}
