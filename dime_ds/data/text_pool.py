"""Which sentences a stage reads: the raw pool (data.corpus, else data.texts), or, with
match.pool=curated, the curated pool the curation stage wrote into <curate.out_dir>/corpus; and what the
curation stage itself balances (curate.input).

Pipeline shape (curate.input=pool, the default): curate -> embed -> match -> distill. Curation reads
only the sentences, so it runs before the teacher sees them: the embed stage embeds only the kept
share (about a third of a web pool in MetaCLIP's setting), Algorithm 1 searches only it, and embed
and match need no notion of curation at all (the curated shards are an ordinary corpus with the
pool's own keys and fields). The price: a different t or seed means re-embedding the changed shards
(a keep list applied after embedding would reuse them); curation is cheap next to grounding, and the
saving at 10^9 sentences is the larger one.

With curate.input=grounded the stage balances Algorithm 1's output instead (embed -> match -> curate
-> distill, `data.texts=<curate.out_dir>/corpus`). Algorithm 1 gives every image one sentence, so
balancing the pool before it cannot raise a tail concept's share of the grounded corpus: an image
whose head sentence was dropped takes its next nearest sentence, often one describing nothing.
Balancing the grounded corpus shrinks the head's share of the text stream the student trains on."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dime_ds.errors import UserError

if TYPE_CHECKING:
    from dime_ds.config.schema import RootConfig

DONE = "curate.json"  # written last by the curation stage: the curated pool is complete


class CuratedPoolError(UserError, FileNotFoundError):
    """A sentence pool that is not there: none configured, or match.pool=curated naming a curated pool
    that the curation stage has not (completely) written."""


def raw_pool(cfg: RootConfig) -> str:
    """The uncurated sentence pool: data.corpus, else data.texts."""
    from omegaconf import OmegaConf

    if cfg.data.get("corpus", None):
        return cfg.data.corpus
    if OmegaConf.is_missing(cfg.data, "texts") or not cfg.data.texts:
        raise CuratedPoolError("no sentence pool: set data.corpus=<sentence shards> (or data.texts)")
    return cfg.data.texts


def curation_input(cfg: RootConfig) -> str:
    """The sentences the curation stage balances: the raw pool (curate.input=pool), or Algorithm 1's
    grounded corpus <match.out_dir>/corpus (curate.input=grounded), which must be written already."""
    if cfg.curate.input != "grounded":
        source = raw_pool(cfg)
    else:
        source = str(Path(cfg.match.out_dir) / "corpus")
        if not Path(source).is_dir() or not any(Path(source).glob("*.tar")):
            raise CuratedPoolError(f"curate.input=grounded balances the grounded corpus {source}, which the match "
                                   "stage has not written: run `python -m dime_ds.match stage=all` (same "
                                   "overrides) first")
    if Path(source).resolve() == curated_dir(cfg).resolve():
        raise CuratedPoolError(f"curate.out_dir={cfg.curate.out_dir} would write the curated corpus over its own "
                               f"input {source}: choose another curate.out_dir")
    return source


def curated_dir(cfg: RootConfig) -> Path:
    return Path(cfg.curate.out_dir) / "corpus"


def text_pool(cfg: RootConfig) -> str:
    """The sentence shards the embed stage embeds and the match stage grounds."""
    if cfg.match.pool != "curated":
        return raw_pool(cfg)
    if not (Path(cfg.curate.out_dir) / DONE).is_file():
        raise CuratedPoolError(f"match.pool=curated but {cfg.curate.out_dir} holds no finished curation "
                               f"({DONE}): run `python -m dime_ds.curate stage=metaclip` (same overrides) first")
    return str(curated_dir(cfg))
