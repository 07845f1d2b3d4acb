"""What curation does to the demo's sentences: per concept, how many sentences of a pool name it
(MetaCLIP's matching rule), before and after curation and grounding, beside the students' zero-shot
accuracy per shape class."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from dime_ds.curate.metaclip import match
from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import list_shards
from dime_ds.log.table import format_table


def pool_sentences(spec: str) -> list[str]:
    """The readable sentences of the shards at `spec` (a bad sample is left out, as every stage does)."""
    texts = []
    for raw in iter_tar_samples(list_shards(spec)):
        try:
            texts.append(decode_sample(raw)["text"])
        except (SampleError, KeyError):
            continue
    return texts


def concept_counts(texts: Sequence[str], entries: Sequence[str]) -> dict[str, int]:
    """entry -> number of `texts` that name it."""
    counts = Counter(i for matched in match(list(texts), list(entries)) for i in matched)
    return {e: counts.get(i, 0) for i, e in enumerate(entries)}


def coverage_table(pools: dict[str, Sequence[str]], classes: Sequence[str],
                   zero_shot: dict[str, Sequence]) -> tuple[str, dict]:
    """Rows: one per class; columns: sentences naming it in each pool (share of that pool), then each
    model's zero-shot top-1 on that class. Returns (console table, the same as a dict)."""
    counts = {name: concept_counts(texts, classes) for name, texts in pools.items()}
    header = ["class", *[f"{name} (n={len(pools[name])})" for name in pools], *[f"zero-shot {m}" for m in zero_shot]]
    rows = []
    for c, cls in enumerate(classes):
        cells = [f"{counts[name][cls]} ({100 * counts[name][cls] / max(1, len(pools[name])):.1f} %)" for name in pools]
        accs = [f"{100 * per_class[c]:.1f}" if per_class[c] is not None else "-" for per_class in zero_shot.values()]
        rows.append([cls, *cells, *accs])
    return format_table(header, rows), {"sizes": {n: len(t) for n, t in pools.items()}, "counts": counts,
                                        "zero_shot_per_class": {m: list(v) for m, v in zero_shot.items()}}
