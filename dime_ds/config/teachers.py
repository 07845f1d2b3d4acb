"""The run's teachers as one list: `teacher` first, then `ensemble.teachers`, with the normalised
weights, the logit scales and the cache directories every stage reads them by."""
from __future__ import annotations

from typing import Any

ENSEMBLE_SUBDIR = "teacher{index}"  # under match.embed_dir: where a further teacher's caches go by default


def teacher_list(cfg: Any) -> list:
    """[teacher, *ensemble.teachers]: index 0 is `teacher`, whose text tower and space the student keeps."""
    return [cfg.teacher, *cfg.ensemble.teachers]


def ensemble_weights(cfg: Any) -> list[float]:
    """One weight per teacher, summing to 1 (equal when ensemble.weights is null)."""
    n = 1 + len(cfg.ensemble.teachers)
    given = cfg.ensemble.weights
    raw = [1.0] * n if given is None else [float(w) for w in given]
    total = sum(raw)
    return [w / total for w in raw]


def teacher_scale(cfg: Any, index: int) -> float:
    """Teacher `index`'s logit scale in the DIME-FM targets (null: loss.scale)."""
    scale = teacher_list(cfg)[index].scale
    return float(cfg.loss.scale if scale is None else scale)


def teacher_embed_dir(cfg: Any, index: int) -> str:
    """Where the embed stage writes teacher `index`'s `images/` and `texts/` caches: match.embed_dir for
    `teacher`, else the teacher's cache_dir, by default <match.embed_dir>/teacher<index>."""
    if index == 0:
        return str(cfg.match.embed_dir)
    return str(teacher_list(cfg)[index].cache_dir or f"{cfg.match.embed_dir}/{ENSEMBLE_SUBDIR.format(index=index)}")


def teacher_cache_dir(cfg: Any, index: int) -> str | None:
    """The cache a cached teacher `index` reads in distillation (`teacher` names its own)."""
    return cfg.teacher.cache_dir if index == 0 else teacher_embed_dir(cfg, index)
