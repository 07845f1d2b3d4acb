"""CLIP-CID speed (dime_ds.curate.semantic): semantic balance and the cluster stage's k-means on
random embeddings with planted near-duplicates, in this process on the CPU (faiss-cpu, all the
cores it is given). Prints a table, writes JSON, and projects both to 4*10^8 images.

    .venv/bin/python bench/semantic_balance_speed.py            # ~10 minutes on 2 cores
    .venv/bin/python bench/semantic_balance_speed.py --flat 10000,30000 --bucketed 100000,1000000 --kmeans 1000000

Measured: the flat (exact) path at small n, where its O(n^2 d) search is affordable; the bucketed
path (SemDeDup-style spherical k-means buckets of about --bucket-rows rows, pairs searched within a
bucket: O(n * bucket_rows * d)); k-means training (seconds per iteration, at --k centres) and the
assignment of every row to its centre. Projected (stated as such in the output): the flat path
quadratically and the bucketed path linearly from the largest measured n, and both to 4*10^8 from
the measured multiply-add rate, as core-hours (the stage splits the queries over ranks)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 4 * 10 ** 8
SEMDEDUP_BUCKETS = 50_000  # SemDeDup's k-means clusters for LAION-440M


def planted(n: int, d: int, seed: int, duplicate_share: float = 0.4, noise: float = 0.1):
    """n rows: originals and jittered copies (cos ~0.99 to their original), float16 as the cache holds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_dup = int(n * duplicate_share)
    base = rng.standard_normal((n - n_dup, d), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[rng.integers(0, len(base), n_dup)] + (noise / np.sqrt(d)) * rng.standard_normal((n_dup, d),
                                                                                                    dtype=np.float32)
    x = np.concatenate([base, copies])
    return x[rng.permutation(n)].astype(np.float16)  # any prefix holds originals and copies alike


def _flat(x, beta: float) -> dict:
    from dime_ds.curate import semantic_balance

    t0 = time.perf_counter()
    kept = semantic_balance(x, beta)
    s = time.perf_counter() - t0
    n, d = x.shape
    return {"path": "flat (exact)", "n": n, "d": d, "seconds": s, "images_per_s": n / s,
            "macs_per_s": n * n * d / s, "removed_share": 1 - len(kept) / n}


def _bucketed(x, beta: float, bucket_rows: int, seed: int) -> dict:
    import numpy as np

    from dime_ds.curate import semantic as S

    rows = S.Rows(x)
    n, d = x.shape
    buckets = max(1, n // bucket_rows)
    t0 = time.perf_counter()
    centroids = S.train_buckets(rows, buckets, seed)
    bucket = S.bucket_of(rows, centroids)
    t_buckets = time.perf_counter() - t0
    stats: dict = {}
    pairs = S.pairs_in_buckets(rows, bucket, len(centroids), range(len(centroids)), beta, stats=stats)
    sizes = np.bincount(bucket, minlength=len(centroids))
    macs = int((sizes.astype(np.int64) ** 2).sum()) * d
    labels = S.labels_from_forest(n, pairs)
    kept = S.nearest_to_centroid(rows, labels)
    s = time.perf_counter() - t0
    total = bucketed_macs(n, d, len(centroids), search=macs)
    return {"path": f"bucketed ({buckets} buckets)", "n": n, "d": d, "seconds": s, "bucket_seconds": t_buckets,
            "images_per_s": n / s, "macs_per_s": total / s, "buckets": buckets,
            "largest_bucket": int(sizes.max()), "macs": total, "removed_share": 1 - len(kept) / n}


def bucketed_macs(n: int, d: int, buckets: int, search: float | None = None) -> float:
    """Multiply-adds of the bucketed path (semantic.py's docstring): the search within buckets (even
    buckets unless measured), the assignment to buckets and the bucket k-means (20 iterations)."""
    from dime_ds.curate.semantic import BUCKET_TRAIN_MAX, BUCKET_TRAIN_PER_CENTRE

    search = n * (n / buckets) * d if search is None else search
    train = 20 * min(n, BUCKET_TRAIN_PER_CENTRE * buckets, BUCKET_TRAIN_MAX) * buckets * d
    return search + n * buckets * d + train


def _kmeans(x, k: int, niter: int, seed: int) -> dict:
    from dime_ds.curate.cluster_stage import cluster_images
    from dime_ds.knn.search import Rows

    import numpy as np

    n, d = x.shape
    labels, _, facts = cluster_images(Rows(x), np.arange(n), k=k, niter=niter, seed=seed)
    assign = facts["seconds"] - facts["train_seconds"]
    return {"path": f"k-means k={k}", "n": n, "d": d, "seconds": facts["seconds"], "trained_on": facts["trained_on"],
            "seconds_per_iteration": facts["train_seconds"] / niter, "assign_per_s": n / assign,
            "images_per_s": n / facts["seconds"], "labels_used": int(len(np.unique(labels)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flat", default="10000,20000", help="n measured on the exact path")
    p.add_argument("--bucketed", default="100000,300000", help="n measured on the bucketed path")
    p.add_argument("--kmeans", default="100000,300000", help="n measured for k-means")
    p.add_argument("--dims", default="512,768")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--bucket-rows", type=int, default=2000, help="rows a k-means bucket holds on average")
    p.add_argument("--k", type=int, default=1000, help="k-means centres")
    p.add_argument("--niter", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/semantic_balance_speed.json"))
    args = p.parse_args(argv)

    import faiss

    sizes = {name: [int(v) for v in getattr(args, name).split(",") if v] for name in ("flat", "bucketed", "kmeans")}
    results = []
    for d in (int(v) for v in args.dims.split(",")):
        biggest = max(max(v) for v in sizes.values() if v)
        data = planted(biggest, d, args.seed)
        for n in sizes["flat"]:
            results.append(_flat(data[:n], args.beta))
            print(f"  {results[-1]['path']} n={n} d={d}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
        for n in sizes["bucketed"]:
            results.append(_bucketed(data[:n], args.beta, args.bucket_rows, args.seed))
            print(f"  {results[-1]['path']} n={n} d={d}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
        for n in sizes["kmeans"]:
            results.append(_kmeans(data[:n], args.k, args.niter, args.seed))
            print(f"  {results[-1]['path']} n={n} d={d}: {results[-1]['seconds']:.1f} s", file=sys.stderr)

    threads = faiss.omp_get_max_threads()
    print(f"\nCLIP-CID semantic balance and k-means, CPU ({platform.processor() or platform.machine()}, "
          f"{threads} faiss threads), beta={args.beta}, 40 % planted near-duplicates\n")
    print("| path | n | d | seconds | images/s | notes |")
    print("|------|--:|--:|--------:|---------:|-------|")
    for r in results:
        if r["path"].startswith("k-means"):
            note = (f"{r['seconds_per_iteration']:.2f} s/iteration on {r['trained_on']} rows; "
                    f"assign {r['assign_per_s']:,.0f} rows/s")
        else:
            note = f"removed {100 * r['removed_share']:.1f} %; {r['macs_per_s'] / 1e9:.1f} G multiply-adds/s"
            if "largest_bucket" in r:
                note += f"; largest bucket {r['largest_bucket']}, buckets {r['bucket_seconds']:.1f} s"
        print(f"| {r['path']} | {r['n']:,} | {r['d']} | {r['seconds']:.1f} | {r['images_per_s']:,.0f} | {note} |")

    # projections from the measured rates (not measurements)
    projection = []
    for d in sorted({r["d"] for r in results}):
        flat = max((r for r in results if r["d"] == d and r["path"].startswith("flat")), key=lambda r: r["n"],
                   default=None)
        buck = max((r for r in results if r["d"] == d and r["path"].startswith("bucketed")), key=lambda r: r["n"],
                   default=None)
        km = max((r for r in results if r["d"] == d and r["path"].startswith("k-means")), key=lambda r: r["n"],
                 default=None)
        row = {"d": d}
        if flat:
            for n in (10 ** 5, 10 ** 6, TARGET):
                row[f"flat_seconds_{n:.0e}"] = flat["seconds"] * (n / flat["n"]) ** 2
        if buck:  # the measured multiply-add rate on the cost model's multiply-adds
            for n in (10 ** 6, TARGET):
                row[f"bucketed_seconds_{n:.0e}"] = (bucketed_macs(n, d, max(1, n // args.bucket_rows))
                                                    / buck["macs_per_s"])
            row["semdedup_seconds_4e+08"] = bucketed_macs(TARGET, d, SEMDEDUP_BUCKETS) / buck["macs_per_s"]
            row["semdedup_macs_4e+08"] = bucketed_macs(TARGET, d, SEMDEDUP_BUCKETS)
            row["flat_macs_4e+08"] = float(TARGET) ** 2 * d
        if km:
            for n in (10 ** 6, TARGET):
                row[f"kmeans_assign_seconds_{n:.0e}"] = n / km["assign_per_s"]
        projection.append(row)
    print(f"\nProjected, not measured, in hours of this process ({threads} threads): flat quadratically from its "
          f"largest n; bucketed from its measured multiply-add rate on the cost model (search + assignment + bucket "
          f"k-means), at ~{args.bucket_rows} rows a bucket or SemDeDup's {SEMDEDUP_BUCKETS} buckets; the k={args.k} "
          "assignment linearly:\n")
    print("| d | flat 1e5 | flat 1e6 | flat 4e8 | bucketed 1e6 | bucketed 4e8 | 4e8, 5e4 buckets "
          "| k-means assign 4e8 |")
    print("|--:|---------:|---------:|---------:|-------------:|-------------:|-----------------:"
          "|-------------------:|")
    for row in projection:
        def h(key):
            return f"{row[key] / 3600:,.2f} h" if key in row else "-"
        print(f"| {row['d']} | {h('flat_seconds_1e+05')} | {h('flat_seconds_1e+06')} | {h('flat_seconds_4e+08')} | "
              f"{h('bucketed_seconds_1e+06')} | {h('bucketed_seconds_4e+08')} | {h('semdedup_seconds_4e+08')} | "
              f"{h('kmeans_assign_seconds_4e+08')} |")
        if "semdedup_macs_4e+08" in row:
            print(f"|   | multiply-adds at 4e8: flat {row['flat_macs_4e+08']:.2g}, 5e4 buckets "
                  f"{row['semdedup_macs_4e+08']:.2g} | | | | | | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "machine": {"cpus": os.cpu_count(), "faiss_threads": threads,
                                                                   "python": platform.python_version()},
                               "results": results, "projection": projection}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
