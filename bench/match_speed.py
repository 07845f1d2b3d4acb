"""Algorithm 1 speed: the faiss path (top-k candidate lists reused across rounds, exhausted lists
re-queried) against the plain exact implementation (a dense float64 matmul + argmax per round, in
row blocks), on random unit vectors. Each method runs in its own process, so the peak memory
(resource.getrusage ru_maxrss) is its own; "data" is the peak right after the embeddings were
made, so peak - data is what the method itself needed. Prints a table, writes JSON.

    .venv/bin/python bench/match_speed.py                       # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/match_speed.py --images 100000 --texts 1000000 --dim 256 \
        --methods faiss,faiss_blocked --block-size 250000       # the issue's setting (GPU machine)

The reference costs rounds x images x texts x dim float64 operations: leave it out
(--methods faiss,...) where that is hours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("faiss", "faiss_blocked", "reference")


def make_data(n_img: int, n_txt: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)

    def unit(n):
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return unit(n_img), unit(n_txt)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(args) -> None:
    import numpy as np

    from dime_ds.match.algorithm1 import ground, greedy_ground_reference

    img, txt = make_data(args.images, args.texts, args.dim, args.seed)
    data_mib = _maxrss_mib()
    start = time.perf_counter()
    extra = {}
    if args.worker == "reference":
        assignment, per_round = greedy_ground_reference(img, txt, args.stop_ratio, return_rounds=True)
        matched, rounds = int((assignment >= 0).sum()), len(per_round)
        extra = {"per_round": per_round}
    else:
        block = args.block_size if args.worker == "faiss_blocked" else None
        result = ground(img, txt, stop_ratio=args.stop_ratio, topk=args.topk, block_size=block,
                        progress=args.progress)
        assignment, matched, rounds = result.assignment, result.images_matched, result.rounds
        extra = {"per_round": result.per_round, "requeried": result.requeried}
    seconds = time.perf_counter() - start
    np.save(args.assignment_out, assignment, allow_pickle=False)
    print(json.dumps({"method": args.worker, "seconds": seconds, "rounds": rounds, "matched": matched,
                      "peak_rss_mib": _maxrss_mib(), "data_rss_mib": data_mib, **extra}))


def _row(r: dict) -> str:
    rounds = "-" if r.get("rounds") is None else str(r["rounds"])
    same = {True: "yes", False: "NO", None: "-"}[r.get("identical")]
    return (f"| {r['method']:<13} | {r['seconds']:>9.1f} | {rounds:>6} | {r['matched']:>9} | "
            f"{r['peak_rss_mib']:>9.0f} | {r['peak_rss_mib'] - r['data_rss_mib']:>9.0f} | {same:>9} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--stop-ratio", type=float, default=0.95)
    parser.add_argument("--block-size", type=int, default=25_000, help="text rows per block (faiss_blocked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--out", default=str(ROOT / "bench/results/match_speed.json"))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--assignment-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import numpy as np

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = Path(tmp) / f"{method}.npy"
            cmd = [sys.executable, __file__, "--worker", method, "--assignment-out", str(path),
                   "--images", str(args.images), "--texts", str(args.texts), "--dim", str(args.dim),
                   "--topk", str(args.topk), "--stop-ratio", str(args.stop_ratio),
                   "--block-size", str(args.block_size), "--seed", str(args.seed)]
            if args.progress:
                cmd.append("--progress")
            print(f"running {method} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["assignment"] = np.load(path)
            results.append(row)
    reference = next((r["assignment"] for r in results if r["method"] == "reference"), None)
    for r in results:
        r["identical"] = None if reference is None or r["method"] == "reference" else \
            bool(np.array_equal(r.pop("assignment"), reference))
        r.pop("assignment", None)
    print(f"\nAlgorithm 1, {args.images} images x {args.texts} sentences x {args.dim} dims, random unit vectors, "
          f"stop_ratio {args.stop_ratio}, topk {args.topk} ({os.cpu_count()} CPU cores)\n")
    print("| method        | seconds   | rounds | matched   | peak MiB  | method MiB | identical |")
    print("|---------------|----------:|-------:|----------:|----------:|----------:|----------:|")
    for r in results:
        print(_row(r))
    try:
        import faiss

        faiss_info = {"version": faiss.__version__, "gpus": faiss.get_num_gpus()}
    except ImportError:
        faiss_info = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: getattr(args, k)
                     for k in ("images", "texts", "dim", "topk", "stop_ratio", "block_size", "seed")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "faiss": faiss_info},
        "results": results}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
