"""Evaluation speed: feature extraction (images/s, decode + forward) with 0 and 2 loader workers on
labelled synthetic shards, then the metric stages on random unit features at sizes a real suite
has: retrieval R@K (COCO-5k-like: 5k images x 25k captions) and the linear probe's L2 sweep. Prints
a table, writes JSON to bench/results/eval_speed.json.

    .venv/bin/python bench/eval_speed.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/eval_speed.py --images 4000 --probe-train 20000 --probe-dim 768
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


def extraction(n_images: int, image_size: int, batch_size: int, model_dir: str | None) -> list[dict]:
    import torch
    from omegaconf import OmegaConf

    from dime_ds.config.demo_schema import SyntheticConfig
    from dime_ds.demo.synthetic import write_world
    from dime_ds.eval.features import extract
    from dime_ds.eval.models import openclip_encoder
    from dime_ds.eval.sources import open_split
    from dime_ds.models import save_openclip_dir
    from dime_ds.models.student import student_model_cfg, student_preprocess_cfg

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        write_world(world, OmegaConf.structured(SyntheticConfig(
            image_size=image_size, n_images=8, n_texts=8, n_paired=8, n_eval=n_images, shard_size=500)), progress=False)
        if model_dir is None:  # the demo teacher's architecture, random weights: speed does not care
            cfg = student_model_cfg(OmegaConf.load(ROOT / "configs/student/demo_teacher.yaml"))
            torch.manual_seed(0)
            import open_clip
            model_dir = str(Path(tmp) / "model")
            save_openclip_dir(open_clip.CLIP(**cfg).state_dict(), cfg, student_preprocess_cfg(cfg), model_dir)
        encoder = openclip_encoder(model_dir, None, "fp32", torch.device("cpu"), "bench")
        split = open_split(world / "eval" / "shape", "test")
        for workers in (0, 2):
            start = time.perf_counter()
            feats = extract(split, encoder, batch_size=batch_size, workers=workers, progress=False)
            wall = time.perf_counter() - start
            rows.append({"stage": f"extract, {workers} workers", "n": len(feats.labels), "s": wall,
                         "per_s": len(feats.labels) / wall})
    return rows


def metrics(n_img: int, captions: int, dim: int, probe_train: int, probe_dim: int, classes: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from dime_ds.eval.linear_probe import linear_probe
    from dime_ds.eval.retrieval import retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n_img, dim, generator=gen), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(captions)
    text = F.normalize(image[owner] + torch.randn(len(owner), dim, generator=gen), dim=-1)
    start = time.perf_counter()
    retrieval_metrics(image, text, owner)
    rows = [{"stage": f"retrieval R@K, {n_img} x {len(owner)}", "n": n_img, "s": time.perf_counter() - start}]
    centres = torch.randn(classes, probe_dim, generator=gen)
    y = torch.arange(probe_train + probe_train // 4) % classes
    x = F.normalize(centres[y] + 12 * torch.randn(len(y), probe_dim, generator=gen), dim=-1)  # not separable
    regs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    start = time.perf_counter()
    res = linear_probe(x[:probe_train], y[:probe_train], x[probe_train:], y[probe_train:], regs)
    rows.append({"stage": f"linear probe, {len(regs)} L2 + refit, {probe_train} x {probe_dim}, {classes} cls",
                 "n": probe_train, "s": time.perf_counter() - start, "top1": res["top1"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="labelled images for the extraction rows")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model-dir", default=None, help="an OpenCLIP model dir (default: random demo-teacher arch)")
    p.add_argument("--retrieval-images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probe-train", type=int, default=10000)
    p.add_argument("--probe-dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    args = p.parse_args()
    rows = extraction(args.images, args.image_size, args.batch_size, args.model_dir)
    rows += metrics(args.retrieval_images, args.captions, args.dim, args.probe_train, args.probe_dim, args.classes)

    from dime_ds.log.table import format_table

    print(format_table(["stage", "n", "s", "per s", "top-1"],
                       [[r["stage"], r["n"], f"{r['s']:.2f}", f"{r['per_s']:.0f}" if "per_s" in r else "",
                         f"{r['top1']:.3f}" if "top1" in r else ""] for r in rows]))
    out = ROOT / "bench" / "results" / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
