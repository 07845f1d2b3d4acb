"""Distillation throughput: samples/s and peak host memory per rank for ZeRO stages 0-3, teacher
replicate vs zero3 vs cache, 1 and 2 ranks, on the demo architectures (a random teacher of the
demo teacher's shape; throughput does not depend on its weights). Prints a table, writes JSON.

    .venv/bin/python bench/distill_throughput.py [--steps 30] [--out bench/results/distill_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support.training_runs import demo_world, launch  # noqa: E402

CASES = [  # (ranks, ZeRO config, teacher mode)
    *[(ranks, f"zero{stage}", "replicate") for ranks in (1, 2) for stage in (0, 1, 2, 3)],
    *[(ranks, "zero1", mode) for ranks in (1, 2) for mode in ("zero3", "cache")],
]


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
    results = launch(work, name, overrides, ranks)
    return {"ranks": ranks, "ds_config": ds_config, "teacher": teacher,
            "samples_per_s": results[0]["samples_per_s"],
            "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in results],
            "final_loss": results[0]["loss"]["loss/total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="global batch (images and sentences per step)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill_throughput.json"))
    args = parser.parse_args()
    from dime_ds.log.table import format_table

    with tempfile.TemporaryDirectory(prefix="dime_bench_") as tmp:
        work = Path(tmp)
        demo_world(work)
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
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "cpus": os.cpu_count(), "rows": rows},
                              indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
