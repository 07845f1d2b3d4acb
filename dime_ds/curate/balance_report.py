"""The semantic-balance report: `report.json`, `report.md`, `component_sizes.png` (how many groups
of each size, log-binned) and `removed_groups.png`, a contact sheet of the largest groups: the kept
image first, then the removed ones, read from the data.images shards by key (left out, with a note,
when data.images is not set or lacks them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dime_ds import atomic

REPORT_VERSION = 1
SHEET_COLUMNS = 8  # images a group row shows: the kept one and up to 7 removed


def _groups(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group labels, their sizes), largest first, then by label."""
    roots, sizes = np.unique(labels, return_counts=True)
    order = np.lexsort((roots, -sizes))
    return roots[order], sizes[order]


def build_report(cfg, cache, labels: np.ndarray, kept: np.ndarray, stats: dict, *, seconds: float, world: int) -> dict:
    c = cfg.balance
    n = len(labels)
    roots, sizes = _groups(labels)
    histogram = np.bincount(sizes)
    return {
        "format_version": REPORT_VERSION, "embeddings": str(cache.directory), "model": cache.model, "dim": cache.dim,
        "images": n, "kept": int(len(kept)), "removed": int(n - len(kept)),
        "removed_share": (n - len(kept)) / max(n, 1),
        "beta": float(c.beta), "k": int(c.k), "max_k": int(c.max_k), "buckets": int(c.buckets),
        "exact": not c.buckets, "groups": int(len(roots)), "groups_of_two_or_more": int((sizes > 1).sum()),
        "largest_group": int(sizes[0]) if len(sizes) else 0,
        "group_sizes": {str(s): int(histogram[s]) for s in np.flatnonzero(histogram)},
        "search": {"joined_pairs": int(stats.get("joined_pairs", 0)), "researched": int(stats.get("researched", 0)),
                   "range_searched": int(stats.get("range_searched", 0)),
                   **({"largest_bucket": int(stats["bucket_sizes_max"])} if "bucket_sizes_max" in stats else {})},
        "ranks": world, "seconds": round(seconds, 3), "keep": str(Path(c.out_dir) / "keep.txt"),
    }


def _markdown(r: dict, sheet_note: str) -> str:
    how = "flat search: exact" if r["exact"] else f"{r['buckets']} k-means buckets: approximate"
    lines = [
        "# Semantic balance of the image pool (CLIP-CID)", "",
        f"- embeddings: `{r['embeddings']}` ({r['model']}, {r['dim']}-d): {r['images']} images",
        f"- beta = {r['beta']:g} (joined when 1 - cos < beta); kNN k = {r['k']} doubled up to {r['max_k']}, then "
        f"range search; {how}",
        f"- kept: {r['kept']}; removed: {r['removed']} ({100 * r['removed_share']:.1f} %)",
        f"- groups: {r['groups']}, {r['groups_of_two_or_more']} of two or more images; the largest holds "
        f"{r['largest_group']}",
        f"- search: {r['search']['joined_pairs']} joined pairs; {r['search']['researched']} queries re-searched with a "
        f"larger k, {r['search']['range_searched']} by range search; {r['ranks']} rank(s), {r['seconds']:.1f} s",
        f"- keep list: `{r['keep']}` (`data.keep=` this directory)", "",
        "![component sizes](component_sizes.png)", "",
        "## Removed groups", "", sheet_note, "",
        "## Group sizes", "", "| images in the group | groups |", "|---:|---:|",
    ]
    lines += [f"| {size} | {count} |" for size, count in r["group_sizes"].items()]
    return "\n".join(lines) + "\n"


def sizes_png(labels: np.ndarray, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    _, sizes = _groups(labels)
    fig = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    edges = np.unique(np.geomspace(1, max(2, sizes.max() + 1), 30).astype(int))
    ax.hist(sizes, bins=edges, color=(70 / 255, 110 / 255, 200 / 255), log=True)
    ax.set(xscale="log", title="semantic balance: groups by size", xlabel="images in the group (1: alone, kept)",
           ylabel="groups")
    fig.savefig(path, format="png")


def _images_by_key(spec: str, wanted: set[str]) -> dict:
    from dime_ds.data.pipelines import SampleError, decode_sample, iter_tar_samples
    from dime_ds.data.shards import list_shards

    found = {}
    for raw in iter_tar_samples(list_shards(spec)):
        if raw.get("__key__") in wanted:
            try:
                found[raw["__key__"]] = decode_sample(raw)["image"]
            except (SampleError, KeyError):
                continue
            if len(found) == len(wanted):
                break
    return found


def _keys_of(cache, rows: set[int]) -> dict[int, str]:
    found = {}
    for start, keys in cache.shard_keys():
        found.update((r, keys[r - start]) for r in rows if start <= r < start + len(keys))
    return found


def contact_sheet(cfg, cache, labels: np.ndarray, kept: np.ndarray, path: Path) -> str:
    """Draw the largest removed groups (kept image first); returns the report's note."""
    roots, sizes = _groups(labels)
    shown = roots[sizes > 1][:int(cfg.balance.groups_shown)]
    if not len(shown):
        return "No image was removed: no contact sheet."
    if OmegaConf.is_missing(cfg.data, "images") or not cfg.data.images:
        return "data.images is not set: no contact sheet (give the image shards to draw the removed groups)."
    is_kept = np.zeros(len(labels), bool)
    is_kept[kept] = True
    rows = []
    for root in shown.tolist():
        members = np.flatnonzero(labels == root)
        members = np.r_[members[is_kept[members]], members[~is_kept[members]]][:SHEET_COLUMNS]
        rows.append(members)
    keys = _keys_of(cache, {int(i) for r in rows for i in r})
    try:
        images = _images_by_key(cfg.data.images, set(keys.values()))
    except (OSError, ValueError) as err:
        return f"could not read data.images={cfg.data.images} for the contact sheet: {err}"
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.4 * SHEET_COLUMNS, 1.55 * len(rows)), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), SHEET_COLUMNS, squeeze=False)
    for r, members in enumerate(rows):
        for col in range(SHEET_COLUMNS):
            ax = axes[r][col]
            ax.set_xticks([]), ax.set_yticks([])
            if col >= len(members):
                ax.axis("off")
                continue
            key = keys[members[col]]
            if key in images:
                ax.imshow(images[key])
            ax.set_title(("kept " if col == 0 else "") + key[-14:], fontsize=7, color="green" if col == 0 else "red")
    fig.suptitle("largest removed groups: the kept image (first) and removed ones")
    fig.savefig(path, format="png")
    missing = sum(keys[i] not in images for r in rows for i in r)
    return ("![removed groups](removed_groups.png)" + (f"\n\n{missing} image(s) not found in data.images, left blank."
                                                       if missing else ""))


def write_report(out: Path, report: dict, cfg, cache, labels: np.ndarray, kept: np.ndarray) -> None:
    sizes_png(labels, out / "component_sizes.png")
    note = contact_sheet(cfg, cache, labels, kept, out / "removed_groups.png")
    report["contact_sheet"] = note
    atomic.write_json(out / "report.json", report)
    atomic.write_text(out / "report.md", _markdown(report, note))
