"""The match stage's report: `report.json`, `report.md`, `similarity_hist.png` (drawn with
matplotlib) and TensorBoard scalars, histogram and examples. Images matched, rounds, per-round
counts, sentences kept, similarity statistics and histogram, 10 examples; `kinds` counts the source
json's "kind" field (the synthetic world labels its sentences) over the corpus and the kept set.

report.json, report.md and the histogram are functions of the inputs and settings alone, so a rerun
(after a kill, say) writes them byte for byte again; the wall-clock seconds, which differ every run,
are in `timing.json` beside them (and in the report the stage returns). TensorBoard's event files
carry wall times and the host name by nature: `tensorboard/` is written into a staging directory and
swapped in whole, so it holds the last complete run's one event file, never a killed run's beside it.
Every file is written under a temporary name and renamed; report.json last."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dime_ds import atomic

REPORT_VERSION = 1
TIMING = "timing.json"  # the run's wall-clock seconds: everything else of the report is reproducible
N_EXAMPLES = 10
HIST_BINS = 40


def histogram_png(counts: Sequence[int], edges: Sequence[float], path: str | os.PathLike,
                  title: str = "cosine similarity of kept pairs") -> Path:
    """A bar chart of a histogram (`counts` over bins `edges`), 720 x 420 pixels."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    fig = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color=(70 / 255, 110 / 255, 200 / 255))
    ax.set(title=title, xlabel="cosine similarity", ylabel="pairs")
    path = Path(path)
    fig.savefig(path, format="png")
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
        f"- time: see `{TIMING}` (wall-clock, differs every run)", "",
        "## Rounds", "", "| round | images before | matched | share |", "|---:|---:|---:|---:|",
    ]
    damaged = [(m, d) for m, shards in r.get("damaged_shards", {}).items() for d in shards]
    if damaged:  # before the rounds: what the match could not see
        at = lines.index("## Rounds")
        lines[at:at] = ["## Damaged input shards (used as far as readable)", "",
                        *[f"- {m}: `{d['source']}`: {d['reason']}, {d['samples']} samples read"
                          for m, d in damaged], ""]
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
            f"{e['image_key']} -> {e['sentence_key']} ({e['similarity']:.3f}): {e['text']}  "
            for e in report["examples"]), 0)
    finally:
        writer.close()


def damaged_shards(manifest: dict) -> list[dict]:
    """The input shards an embedding cache marks partial: {"source", "reason", "samples" read}."""
    return [{"source": r["source"], **r["damaged"]} for r in manifest["shards"] if r.get("partial")]


def build_report(result, image_keys: Sequence[str], text_keys: Sequence[str], corpus: dict, *, inputs: dict,
                 settings: dict, total_seconds: float) -> dict:
    """The report of a GroundingResult (algorithm1.ground) over caches with these keys, `corpus`
    as write_grounded_corpus returned it (asked for the texts of `example_rows`)."""
    assignment, sims = result.assignment, result.similarities
    return {
        "format_version": REPORT_VERSION,
        "images": len(image_keys), "sentences": len(text_keys),
        "images_matched": result.images_matched, "sentences_kept": result.sentences_kept,
        "match_rate": result.images_matched / max(len(image_keys), 1),
        "rounds": result.rounds, "requeried": result.requeried, "exact": result.exact,
        "per_round": [{"round": i + 1, "remaining_before": b, "matched": m}
                      for i, (b, m) in enumerate(zip(result.remaining_before, result.per_round))],
        "similarity": _similarity_stats(kept_similarities(result)),
        "kinds": corpus["kinds"],
        "examples": [{"image_key": image_keys[i], "sentence_key": text_keys[assignment[i]],
                      "similarity": float(sims[i]), "text": corpus["texts"].get(int(assignment[i]), "")}
                     for i in example_rows(assignment).tolist()],
        "corpus": {"dir": corpus["dir"], "shards": corpus["shards"], "counts": corpus["counts"]},
        "inputs": inputs,
        "settings": settings,
        "seconds": {"algorithm1": result.seconds, "total": total_seconds},
    }


def kept_similarities(result) -> np.ndarray:
    """float64 similarities of the matched images' pairs, in image order."""
    matched = np.flatnonzero(result.assignment >= 0)
    return result.similarities[matched].astype(np.float64) if len(matched) else np.empty(0)


def write_report(out_dir: str | os.PathLike, report: dict, kept_sims: np.ndarray, *, tensorboard: bool = True) -> None:
    """similarity_hist.png (when a pair was kept), `out_dir/tensorboard` if asked, timing.json
    (report["seconds"]), report.md, and last report.json (the report less its seconds)."""
    out_dir = Path(out_dir)
    png = out_dir / "similarity_hist.png"
    if report["similarity"]["count"]:
        hist = report["similarity"]["histogram"]
        with atomic.replacing(png) as tmp:
            histogram_png(hist["counts"], hist["edges"], tmp)
    else:  # nothing kept: no histogram, not an earlier run's
        png.unlink(missing_ok=True)
        png = None
    if tensorboard:  # staged: a killed run's event file never stays beside this run's
        with atomic.staged_dir(out_dir / "tensorboard") as staging:
            _tensorboard(staging, report, kept_sims, png)
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    atomic.fsync_path(path)
    reproducible = {k: v for k, v in report.items() if k != "seconds"}
    atomic.write_json(out_dir / TIMING, {"format_version": REPORT_VERSION, "seconds": report.get("seconds")})
    atomic.write_text(out_dir / "report.md", _markdown(reproducible))
    atomic.write_json(out_dir / "report.json", reproducible)
