"""Gradient accumulation with batch-wide softmaxes: memory per rank against the global batch at a
fixed micro-batch, and the cost of the second forward. DIME-FM through the real Trainer (ZeRO-1,
demo student <- a random demo-shaped teacher, its embeddings cached or live), for each global
batch G = micro x ranks x A:
- two-pass, A = 1, 4, 8 at the fixed micro-batch (A=1 is the plain path, no second forward);
- single pass, A = 1 with the whole G as one micro-batch: the same loss, no second forward, the
  memory of all G samples' activations at once.
Prints a table, writes JSON to bench/results/accumulation.json. Memory: peak RSS per rank and its
growth during training on CPU (peak RSS minus RSS at the start of training); on CUDA also torch's
peak allocation. Times leave out the first `--warmup` steps; "student s/step" is the student's side
(forward without gradient, loss, forward and backward), "2nd-forward cost" its extra time against
the single pass over the same global batch (the teacher's time is the same in both and left out).

    .venv/bin/python bench/accumulation.py               # ~5 minutes on 2 CPU cores
    .venv/bin/python bench/accumulation.py --micro 128 --ranks 2 --accum 1 4 8 16 --image-size 64
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


def run_case(work: Path, args, micro: int, accum: int) -> dict:
    ranks, global_batch = args.ranks, micro * args.ranks * accum
    name = f"g{global_batch}_a{accum}"
    cache = ["teacher.source=cache", f"teacher.cache_dir={work / 'cache'}"] if args.teacher == "cache" else []
    overrides = ["experiment=demo", f"work_dir={work}", f"name=bench_{name}", f"optim.steps={args.steps}",
                 f"data.texts={work}/synthetic/texts", "optim.warmup_steps=1",
                 f"optim.global_batch_size={global_batch}", f"optim.grad_accum={accum}", "dist.ds_config=zero1",
                 "eval.every_n_steps=0", "ckpt.every_n_steps=0", "log.progress=false",
                 f"log.every_n_steps={args.steps}", "data.workers=1", "data.augment=false", *cache, *args.override]
    results = launch(work, name, overrides, ranks)
    timed = slice(args.warmup, None)
    step_s = sum(results[0]["step_s"][timed]) / len(results[0]["step_s"][timed])
    phases = results[0]["phases_s"][timed]
    return {"global_batch": global_batch, "micro_batch": micro, "accum": accum, "ranks": ranks,
            "samples_per_s": global_batch / step_s,
            "phase_s_per_step": {k: sum(p.get(k, 0.0) for p in phases) / len(phases) for k in phases[0]},
            "step_s": step_s,
            "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in results],
            "train_rss_growth_gb_per_rank": [r["peak_rss_gb"] - r["rss_at_train_gb"] for r in results],
            "cuda_peak_gb_per_rank": [r["cuda_peak_gb"] for r in results],
            "final_loss": results[0]["loss"]["loss/total"]}


def _student_s(r: dict) -> float:
    """Seconds per step on the student's side: the forward without gradient, loss, forward, backward."""
    return r["phase_s_per_step"].get("embed_s", 0.0) + r["phase_s_per_step"]["student_s"]


def _row(r: dict, single: dict | None) -> list:
    two_pass = r["accum"] > 1
    gpu = r["cuda_peak_gb_per_rank"][0]
    cost = f"{100 * (_student_s(r) / _student_s(single) - 1):+.0f}%" if two_pass and single else ""
    return [r["global_batch"], r["micro_batch"], r["accum"], "two-pass" if two_pass else "single",
            f"{r['samples_per_s']:.1f}", f"{_student_s(r):.2f}", f"{r['phase_s_per_step'].get('embed_s', 0.0):.2f}",
            cost, f"{max(r['peak_rss_gb_per_rank']):.3f}", f"{max(r['train_rss_growth_gb_per_rank']):.3f}",
            "" if gpu is None else f"{gpu:.3f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro", type=int, default=16, help="fixed micro-batch per rank")
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 4, 8], help="accumulation counts A")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--teacher", choices=["live", "cache"], default="cache",
                        help="cache: the teacher's embeddings read from disk (its time out of the way)")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic world's image size")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides (a bigger student, ...)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "accumulation.json"))
    args = parser.parse_args()
    from dime_ds.log.table import format_table

    rows = []
    with tempfile.TemporaryDirectory(prefix="dime_bench_") as tmp:
        work = Path(tmp)
        demo_world(work, cache=args.teacher == "cache", synthetic=(f"data.synthetic.image_size={args.image_size}",
                                                 "data.synthetic.n_images=1024", "data.synthetic.n_texts=2048",
                                                 "data.synthetic.n_paired=8", "data.synthetic.n_eval=8"))
        for accum in args.accum:
            for micro, a in ((args.micro, accum), (args.micro * accum, 1)) if accum > 1 else ((args.micro, 1),):
                start = time.time()
                rows.append(run_case(work, args, micro, a))
                rows[-1]["wall_s"] = round(time.time() - start, 1)
                print(f"  G={rows[-1]['global_batch']} micro={micro} A={a}: {rows[-1]['samples_per_s']:.0f} samples/s, "
                      f"+{max(rows[-1]['train_rss_growth_gb_per_rank']):.3f} GB", flush=True)
    single = {r["global_batch"]: r for r in rows if r["accum"] == 1}
    table = format_table(["global batch", "micro/rank", "A", "path", "samples/s", "student s/step", "of which embed",
                          "2nd-forward cost", "peak RSS GB/rank", "RSS growth GB/rank", "CUDA peak GB/rank"],
                         [_row(r, single.get(r["global_batch"])) for r in rows])
    print(f"\nDIME-FM, demo student <- demo-shaped teacher ({args.teacher}), ZeRO-1, {args.ranks} rank(s), "
          f"{args.steps} steps ({args.warmup} untimed), {os.cpu_count()} CPU cores\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
