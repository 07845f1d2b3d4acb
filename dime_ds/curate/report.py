"""The curation report: `report.json`, `report.md` and `entry_counts.png` (matplotlib): sentences
matched and kept, the threshold t and its tail share p(t), head and tail entries and their matches
before and after balancing, the largest entries, and the entry-count distribution before and after."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dime_ds import atomic
from dime_ds.curate.metaclip import t_to_p

REPORT_VERSION = 1


def build_report(c, meta, pool: str, shards: list[dict], counts: np.ndarray, kept_counts: np.ndarray, t: float,
                 how: str, expected: float, *, matched_now: int) -> dict:
    sentences = sum(r["sentences"] for r in shards)
    matched = sum(r["matched"] for r in shards)
    kept = sum(r["kept"] for r in shards)
    head = counts >= t
    order = np.lexsort((np.arange(len(counts)), -counts))[:int(c.top_entries)]  # by count, then entry index
    return {
        "format_version": REPORT_VERSION, "pool": pool, "input": c.input,
        "metadata": {"path": meta.path, "sha256": meta.sha256, "entries": len(meta.entries), "notes": meta.notes},
        "t": t, "t_chosen": how, "tail_share": t_to_p(counts, t), "seed": int(c.seed),
        "sentences": sentences, "skipped": sum(len(r["skipped"]) for r in shards),
        "sentences_matched": matched, "unmatched_dropped": sentences - matched,
        "sentences_kept": kept, "expected_kept": expected,
        "kept_share": kept / max(sentences, 1), "kept_share_of_matched": kept / max(matched, 1),
        "entries": {"total": int(len(counts)), "matched_before": int((counts > 0).sum()),
                    "matched_after": int((kept_counts > 0).sum()), "head": int(head.sum()),
                    "tail_matched": int(((counts > 0) & ~head).sum())},
        "matches": {"head_before": int(counts[head].sum()), "head_after": int(kept_counts[head].sum()),
                    "tail_before": int(counts[~head].sum()), "tail_after": int(kept_counts[~head].sum())},
        "largest": [{"entry": meta.entries[i], "count": int(counts[i]), "kept": int(kept_counts[i])}
                    for i in order.tolist() if counts[i] > 0],
        "corpus": str(Path(c.out_dir) / "corpus"),
        "shards": [{k: r[k] for k in ("index", "source", "shard", "sentences", "matched", "kept")} for r in shards],
        "shards_matched_now": matched_now,
    }


def _markdown(r: dict) -> str:
    e, m = r["entries"], r["matches"]
    lines = [
        "# Curated sentence pool (MetaCLIP metadata balancing)", "",
        f"- {'grounded corpus' if r['input'] == 'grounded' else 'pool'}: `{r['pool']}`: {r['sentences']} "
        f"sentences ({r['skipped']} more undecodable, skipped)",
        f"- metadata: `{r['metadata']['path']}`, {r['metadata']['entries']} entries"
        + "".join(f"; {n}" for n in r["metadata"]["notes"]),
        f"- matched an entry: {r['sentences_matched']} sentences ({r['unmatched_dropped']} matching nothing, dropped)",
        f"- t = {r['t']:.6g} ({r['t_chosen']}); tail share p(t) = {r['tail_share']:.4f}; seed {r['seed']}",
        f"- kept: {r['sentences_kept']} sentences (expected {r['expected_kept']:.1f}): "
        f"{100 * r['kept_share']:.1f} % of the pool, {100 * r['kept_share_of_matched']:.1f} % of the matched",
        f"- corpus: `{r['corpus']}`, {sum(1 for s in r['shards'] if s['shard'])} shard(s)", "",
        "## Entries", "", "| | before | after |", "|---|---:|---:|",
        f"| entries matched (of {e['total']}) | {e['matched_before']} | {e['matched_after']} |",
        f"| head entries (count >= t) | {e['head']} | |",
        f"| tail entries matched (0 < count < t) | {e['tail_matched']} | |",
        f"| matches on head entries | {m['head_before']} | {m['head_after']} |",
        f"| matches on tail entries | {m['tail_before']} | {m['tail_after']} |", "",
        "![entry counts](entry_counts.png)", "",
        "## Largest entries", "", "| entry | sentences before | after |", "|---|---:|---:|",
    ]
    lines += [f"| {x['entry'].replace('|', chr(92) + '|')} | {x['count']} | {x['kept']} |" for x in r["largest"]]
    return "\n".join(lines) + "\n"


def counts_png(counts: np.ndarray, kept_counts: np.ndarray, t: float, path: str | os.PathLike) -> Path:
    """Entry counts sorted by size (rank-frequency, log-log), before and after balancing, and t."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    fig = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for values, label, colour in ((counts, "before", (0.6, 0.6, 0.6)),
                                  (kept_counts, "after", (70 / 255, 110 / 255, 200 / 255))):
        v = np.sort(values[values > 0])[::-1]
        if len(v):
            ax.step(np.arange(1, len(v) + 1), v, where="post", label=f"{label} ({len(v)} entries)", color=colour)
    ax.axhline(t, color=(0.8, 0.3, 0.2), linestyle="--", label=f"t = {t:.4g}")
    ax.set(xscale="log", yscale="log", title="sentences per metadata entry", xlabel="entry rank (by count)",
           ylabel="sentences matching it")
    ax.legend()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_report(out_dir: str | os.PathLike, report: dict) -> None:
    out_dir = Path(out_dir)
    counts = np.load(out_dir / "entry_counts.npy", allow_pickle=False)
    kept = np.load(out_dir / "entry_counts_kept.npy", allow_pickle=False)
    counts_png(counts, kept, report["t"], out_dir / "entry_counts.png")
    atomic.write_json(out_dir / "report.json", report)
    atomic.write_text(out_dir / "report.md", _markdown(report))
