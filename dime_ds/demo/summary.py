"""The demo's and the study's short summaries: the headline metrics of every model (one value, or
mean ± sd over seeds), as a console/markdown table and as a PNG a person can look at."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from dime_ds import atomic

# (row label, dataset, metric key) of the synthetic suite's results
METRICS = (("shape zero-shot top-1", "shape", "top1"), ("colour zero-shot top-1", "colour", "top1"),
           ("captions image->text R@1", "captions", "image_to_text_R@1"),
           ("captions text->image R@1", "captions", "text_to_image_R@1"),
           ("shape linear probe top-1", "shape_probe", "top1"))
SPEED = "train samples/s"


def metric(result: Mapping[str, dict], dataset: str, key: str) -> float:
    return float(result[dataset][key])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """One value, or `mean ± sd` of several (sample sd, n - 1)."""
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    m, sd = mean_sd(v)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def rows(results: Mapping[str, Sequence[Mapping[str, dict]]], speeds: Mapping[str, Sequence[float]]) -> list[list[str]]:
    """Rows (metric, then one cell per model) of `results` {model: [per-seed results]}; speeds
    {model: [samples/s per seed]} (a model without one shows `-`)."""
    out = [[label, *[cell([metric(r, ds, key) for r in results[m]]) for m in results]] for label, ds, key in METRICS]
    out.append([SPEED, *[cell(speeds[m], 1.0, 0) if speeds.get(m) else "-" for m in results]])
    return out


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("--:" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def bar_chart(path: str | os.PathLike, results: Mapping[str, Sequence[Mapping[str, dict]]],
              speeds: Mapping[str, Sequence[float]], title: str, notes: Sequence[str] = ()) -> Path:
    """Grouped bars of the headline metrics per model (error bars: sd over seeds where a model has
    several), and training samples/s beside them. Written atomically."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    models = list(results)
    fig = Figure(figsize=(12, 5.6), dpi=100, layout="constrained")
    grid = fig.add_gridspec(1, 4)
    ax, sx = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3])
    width = 0.8 / len(models)
    # the default cycle has 10 colours; a study can show more models than that
    colours = ([f"C{i}" for i in range(len(models))] if len(models) <= 10
               else [matplotlib.colormaps["tab20"](i % 20) for i in range(len(models))])
    for i, m in enumerate(models):
        stats = [mean_sd([100 * metric(r, ds, key) for r in results[m]]) for _, ds, key in METRICS]
        x = [j + (i - (len(models) - 1) / 2) * width for j in range(len(METRICS))]
        bars = ax.bar(x, [s[0] for s in stats], width, yerr=[s[1] for s in stats] if len(results[m]) > 1 else None,
                      label=f"{i + 1}. {m}" + (f" ({len(results[m])} seeds)" if len(results[m]) > 1 else ""),
                      color=colours[i],
                      capsize=2)
        ax.bar_label(bars, labels=[f"{s[0]:.0f}" for s in stats], fontsize=7, padding=2)
    ax.set_xticks(range(len(METRICS)), [label.replace(" ", "\n", 1) for label, _, _ in METRICS], fontsize=8)
    ax.set(ylabel="%", ylim=(0, 105))
    with_speed = [m for m in models if speeds.get(m)]
    stats = [mean_sd(list(speeds[m])) for m in with_speed]
    bars = sx.bar(range(len(with_speed)), [s[0] for s in stats], 0.7,
                  yerr=[s[1] for s in stats] if any(len(speeds[m]) > 1 for m in with_speed) else None,
                  color=[colours[models.index(m)] for m in with_speed], capsize=2)
    sx.bar_label(bars, labels=[f"{s[0]:.0f}" for s in stats], fontsize=7, padding=2)
    sx.set_xticks(range(len(with_speed)), [str(models.index(m) + 1) for m in with_speed])
    sx.set(title=SPEED, xlabel="model (legend order)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(3, len(models)), fontsize=8)
    fig.suptitle(title + "".join(f"\n{n}" for n in notes), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
