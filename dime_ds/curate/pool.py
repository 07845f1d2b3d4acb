"""Which sentence pool a stage reads: the raw pool (data.corpus, else data.texts), or, with
curate.enabled, the curated pool the curation stage wrote into <curate.out_dir>/corpus.

Pipeline shape: curate -> embed -> match -> distill. Curation reads only the sentences, so it runs
before the teacher sees them: the embed stage embeds only the kept share (about a third of a web
pool in MetaCLIP's setting), Algorithm 1 searches only it, and embed and match need no notion of
curation at all (the curated shards are an ordinary corpus with the pool's own keys and fields).
The price: a different t or seed means re-embedding the changed shards (a keep list applied after
embedding would reuse them); curation is cheap next to grounding, and the saving at 10^9 sentences is
the larger one."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dime_ds.errors import UserError

if TYPE_CHECKING:
    from dime_ds.config.schema import RootConfig

DONE = "curate.json"  # written last by the curation stage: the curated pool is complete


class CuratedPoolError(UserError, FileNotFoundError):
    """A sentence pool that is not there: none configured, or curate.enabled naming a curated pool
    that the curation stage has not (completely) written."""


def raw_pool(cfg: RootConfig) -> str:
    """The uncurated sentence pool: data.corpus, else data.texts."""
    from omegaconf import OmegaConf

    if cfg.data.get("corpus", None):
        return cfg.data.corpus
    if OmegaConf.is_missing(cfg.data, "texts") or not cfg.data.texts:
        raise CuratedPoolError("no sentence pool: set data.corpus=<sentence shards> (or data.texts)")
    return cfg.data.texts


def curated_dir(cfg: RootConfig) -> Path:
    return Path(cfg.curate.out_dir) / "corpus"


def text_pool(cfg: RootConfig) -> str:
    """The sentence shards the embed stage embeds and the match stage grounds."""
    if not cfg.curate.enabled:
        return raw_pool(cfg)
    if not (Path(cfg.curate.out_dir) / DONE).is_file():
        raise CuratedPoolError(f"curate.enabled=true but {cfg.curate.out_dir} holds no finished curation "
                               f"({DONE}): run `python -m dime_ds.curate stage=metaclip` (same overrides) first")
    return str(curated_dir(cfg))
