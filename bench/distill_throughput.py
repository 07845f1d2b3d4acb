"""Distillation throughput: samples/s and peak host memory per rank for ZeRO stages 0-3, teacher
replicate vs zero3 vs cache, 1 and 2 ranks, on the demo architectures (a random teacher of the
demo teacher's shape; throughput does not depend on its weights). Prints a table, writes JSON.

    .venv/bin/python bench/distill_throughput.py [--steps 30] [--out bench/results/distill_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [  # (ranks, ZeRO config, teacher mode)
    *[(ranks, f"zero{stage}", "replicate") for ranks in (1, 2) for stage in (0, 1, 2, 3)],
    *[(ranks, "zero1", mode) for ranks in (1, 2) for mode in ("zero3", "cache")],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path) -> dict:
    """World, random demo-shaped teacher, and its embedding cache (the embed stage's format)."""
    import open_clip
    import torch

    from dime_ds.config import load_config
    from dime_ds.data.shards import list_shards
    from dime_ds.demo.synthetic import write_world
    from dime_ds.embed.stage import embed_shards
    from dime_ds.models import load_teacher, save_openclip_dir
    from dime_ds.models.student import student_model_cfg, student_preprocess_cfg

    teacher_cfg = load_config(["experiment=demo_teacher", f"work_dir={work}"])
    write_world(teacher_cfg.data.root, teacher_cfg.data.synthetic, progress=False)
    model_cfg = student_model_cfg(teacher_cfg.student)
    torch.manual_seed(0)
    save_openclip_dir(open_clip.CLIP(**model_cfg).state_dict(), model_cfg, student_preprocess_cfg(model_cfg),
                      work / "demo_teacher")
    cfg = load_config(["experiment=demo", f"work_dir={work}", f"data.texts={work}/synthetic/texts"])
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    for modality, spec in (("images", cfg.data.images), ("texts", cfg.data.texts)):
        embed_shards(teacher, list_shards(spec), work / "cache" / modality, modality, cfg.teacher.arch, progress=False)
    return {"work": str(work)}


def worker(overrides: list[str], out: str) -> None:
    from dime_ds.config import load_config
    from dime_ds.engine.run import run_training
    from dime_ds.log.setup import setup_logging

    setup_logging()
    summary = run_training(load_config(overrides))
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(out).write_text(json.dumps(summary, default=str))


def run_case(work: Path, ranks: int, ds_config: str, teacher: str, steps: int, batch: int) -> dict:
    name = f"{ranks}r_{ds_config}_{teacher}"
    overrides = ["experiment=demo", f"work_dir={work}", f"name=bench_{name}", f"optim.steps={steps}",
                 f"data.texts={work}/synthetic/texts",
                 "optim.warmup_steps=1", f"optim.global_batch_size={batch}", f"dist.ds_config={ds_config}",
                 "eval.every_n_steps=0", "ckpt.every_n_steps=0", "log.progress=false", f"log.every_n_steps={steps}",
                 "data.workers=1", "data.augment=false"]
    if teacher == "cache":
        overrides += ["teacher.source=cache", f"teacher.cache_dir={work / 'cache'}"]
    else:
        overrides += [f"teacher.shard={teacher}"]
    port = _free_port()
    procs, outs = [], []
    for rank in range(ranks):
        out = work / f"{name}.rank{rank}.json"
        outs.append(out)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(overrides), str(out)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    results = [json.loads(o.read_text()) for o in outs]
    return {"ranks": ranks, "ds_config": ds_config, "teacher": teacher,
            "samples_per_s": results[0]["samples_per_s"],
            "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in results],
            "final_loss": results[0]["loss"]["loss/total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="global batch (images and sentences per step)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill_throughput.json"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return 0
    from dime_ds.log.table import format_table

    with tempfile.TemporaryDirectory(prefix="dime_bench_") as tmp:
        work = Path(tmp)
        prepare(work)
        rows = []
        for ranks, ds_config, teacher in CASES:
            start = time.time()
            rows.append(run_case(work, ranks, ds_config, teacher, args.steps, args.batch))
            rows[-1]["wall_s"] = round(time.time() - start, 1)
            print(f"  {ranks} rank(s) {ds_config} teacher={teacher}: {rows[-1]['samples_per_s']:.0f} samples/s",
                  flush=True)
    table = format_table(["ranks", "ZeRO", "teacher", "samples/s", "peak RSS GB / rank", "wall s"],
                         [[r["ranks"], r["ds_config"], r["teacher"], f"{r['samples_per_s']:.0f}",
                           " ".join(f"{m:.2f}" for m in r["peak_rss_gb_per_rank"]), r["wall_s"]] for r in rows])
    print(f"\nDIME-FM distillation, demo student <- demo-shaped teacher, global batch {args.batch}, "
          f"{args.steps} steps, {os.cpu_count()} CPU cores\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
