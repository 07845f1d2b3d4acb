"""What a K-view teacher cache (embed.views=K, dime_ds/data/views.py) costs: the embed stage's
throughput per view and the cache's bytes per image for K = 1, 4, 10, measured with the demo
teacher's architecture (random weights: throughput does not depend on them) on the demo's synthetic
images; then, from those bytes per view, the cache of the paper's run (40M images, ViT-L/14's 768-d
embeddings) and what it saves against a live teacher, assuming the teacher's forward costs
`--teacher-cost` (7) student forward+backward passes per sample and `--epochs` passes over the data.
Prints two tables, writes JSON to bench/results/embed_views.json.

    .venv/bin/python bench/embed_views.py                 # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/embed_views.py --images 512 --views 1 4 10 --epochs 30 --runs 5
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_IMAGES = 40_000_000
PAPER_DIM = 768  # ViT-L/14's embedding width


def _cache_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.endswith((".npy", ".keys.txt")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic images embedded per K")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--batch", type=int, default=128, help="teacher inputs (views) per forward")
    parser.add_argument("--epochs", type=float, default=10.0,
                        help="passes over the 40M images (vitb32_from_vitl14: 100k steps x 4096 = 10.2)")
    parser.add_argument("--teacher-cost", type=float, default=7.0,
                        help="teacher forward per sample, in student forward+backward passes (ViT-L/14 vs ViT-B/32)")
    parser.add_argument("--runs", type=int, default=3, help="distillation runs sharing one cache (sweeps, students)")
    args = parser.parse_args()

    import torch

    from bench.support.training_runs import demo_world
    from dime_ds.config import load_config
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.data.shards import list_shards
    from dime_ds.data.views import ViewRecipe
    from dime_ds.embed.stage import embed_shards
    from dime_ds.log.table import format_table
    from dime_ds.models import load_teacher

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo_world(work, cache=False, synthetic=(f"data.synthetic.n_images={args.images}", "data.synthetic.n_texts=64",
                                                 "data.synthetic.n_paired=64", "data.synthetic.n_eval=16"))
        cfg = load_config(["experiment=demo", f"work_dir={work}"])
        teacher = load_teacher(cfg.teacher, torch.device("cpu"))
        urls = list_shards(cfg.data.images)
        embed_shards(teacher, urls[:1], work / "warmup", "images", "bench", batch_size=args.batch, progress=False)
        for k in args.views:
            recipe = ViewRecipe(k, float(cfg.data.crop_scale_min)) if k > 1 else None
            out = work / f"views{k}" / "images"
            t0 = time.perf_counter()
            embed_shards(teacher, urls, out, "images", "bench", batch_size=args.batch, progress=False, views=recipe)
            seconds = time.perf_counter() - t0
            cache = EmbeddingCache(out)
            n, dim = len(cache), cache.dim
            per_view_bytes = (dim * 2 + (20 if k > 1 else 0))  # fp16 embedding, int32 x0 y0 w h flip
            rows.append({"views": k, "images": n, "seconds": seconds, "views_per_s": n * k / seconds,
                         "ms_per_view": 1000 * seconds / (n * k), "bytes_per_image": _cache_bytes(out) / n,
                         "dim": dim, "paper_bytes_per_image": k * (PAPER_DIM * 2 + (20 if k > 1 else 0)),
                         "per_view_bytes": per_view_bytes})
    print(f"embed stage, demo teacher ({dim}-d, {platform.machine()}, {torch.get_num_threads()} threads), "
          f"{rows[0]['images']} images:")
    print(format_table(["K", "views/s", "ms/view", "cache B/image (demo, incl. keys)", "fp16 B/image at 768-d"],
                       [[r["views"], f"{r['views_per_s']:.0f}", f"{r['ms_per_view']:.2f}",
                         f"{r['bytes_per_image']:.0f}", f"{r['paper_bytes_per_image']:,}"] for r in rows]))

    # The paper's run in units of one student forward+backward of one sample.
    e, c, runs = args.epochs, args.teacher_cost, args.runs
    paper = []
    live = e * (c + 1)
    paper.append({"setting": "live teacher, augmented", "views": None, "cache_gb": 0.0, "cost_per_image": live,
                  "cost_per_image_runs": runs * live, "speedup": 1.0, "speedup_runs": 1.0})
    for k in args.views:
        embed, train = k * c, e * 1.0
        gb = PAPER_IMAGES * k * (PAPER_DIM * 2 + (20 if k > 1 else 0)) / 1e9
        paper.append({"setting": f"cache K={k}" + (" (no augmentation)" if k == 1 else ", augmented views"),
                      "views": k, "cache_gb": gb, "cost_per_image": embed + train,
                      "cost_per_image_runs": embed + runs * train, "speedup": live / (embed + train),
                      "speedup_runs": runs * live / (embed + runs * train)})
    print(f"\nthe paper's run: {PAPER_IMAGES / 1e6:.0f}M images, {e:g} epochs, teacher forward = {c:g} student "
          f"fwd+bwd; cost in student fwd+bwd per image:")
    print(format_table(["setting", "cache (GB)", "cost/image, 1 run", "vs live", f"cost/image, {runs} runs", "vs live"],
                       [[p["setting"], f"{p['cache_gb']:.0f}", f"{p['cost_per_image']:.0f}", f"{p['speedup']:.1f}x",
                         f"{p['cost_per_image_runs']:.0f}", f"{p['speedup_runs']:.1f}x"] for p in paper]))
    out = ROOT / "bench" / "results" / "embed_views.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.machine(), "embed": rows, "paper_run": paper},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
