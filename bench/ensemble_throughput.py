"""Throughput of teacher ensembles: samples/s of DIME-FM distillation (demo student, 1 rank) with one
live teacher, two live, one live + one cached, one cached and two cached, all demo-shaped random
teachers (throughput does not depend on their weights). The cases run round-robin, `--rounds` times,
and each keeps its best round, so that the ratios compare runs made side by side. Prints a table,
writes JSON.

    .venv/bin/python bench/ensemble_throughput.py [--steps 20] [--rounds 2] \
        [--out bench/results/ensemble_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.support.training_runs import demo_world, launch  # noqa: E402

CASES = {  # name: (teacher A's source, teacher B's source or None)
    "1 live": ("live", None),
    "2 live": ("live", "live"),
    "1 live + 1 cached": ("live", "cache"),
    "1 cached": ("cache", None),
    "2 cached": ("cache", "cache"),
}


def second_teacher(work: Path) -> None:
    """Teacher B: another random demo-shaped teacher in work/demo_teacher_b, its cache in work/cache_b."""
    import open_clip
    import torch

    from dime_ds.config import load_config
    from dime_ds.data.shards import list_shards
    from dime_ds.embed.stage import embed_shards
    from dime_ds.models import load_teacher, save_openclip_dir
    from dime_ds.models.student import student_model_cfg, student_preprocess_cfg

    cfg = load_config(["experiment=demo_teacher", f"work_dir={work}"])
    model_cfg = student_model_cfg(cfg.student)
    torch.manual_seed(1)
    save_openclip_dir(open_clip.CLIP(**model_cfg).state_dict(), model_cfg, student_preprocess_cfg(model_cfg),
                      work / "demo_teacher_b")
    cfg = load_config(["experiment=demo", f"work_dir={work}", f"data.texts={work}/synthetic/texts",
                       f"teacher.arch=local-dir:{work / 'demo_teacher_b'}"])
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    for modality, spec in (("images", cfg.data.images), ("texts", cfg.data.texts)):
        embed_shards(teacher, list_shards(spec), work / "cache_b" / modality, modality, cfg.teacher.arch,
                     progress=False)


def overrides(work: Path, name: str, a: str, b: str | None, steps: int, batch: int) -> list[str]:
    out = ["experiment=demo", f"work_dir={work}", f"name=bench_{name.replace(' ', '_')}", f"optim.steps={steps}",
           f"data.texts={work}/synthetic/texts", "optim.warmup_steps=1", f"optim.global_batch_size={batch}",
           "eval.every_n_steps=0", "ckpt.every_n_steps=0", "log.progress=false", f"log.every_n_steps={steps}",
           "data.workers=1", "data.augment=false"]
    if a == "cache":
        out += ["teacher.source=cache", f"teacher.cache_dir={work / 'cache'}"]
    if b is not None:
        cached = f",source:cache,cache_dir:'{work / 'cache_b'}'" if b == "cache" else ""
        out.append(f"ensemble.teachers=[{{arch:'local-dir:{work / 'demo_teacher_b'}',pretrained:null{cached}}}]")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="global batch (images and sentences per step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the run (default: every core)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ensemble_throughput.json"))
    args = parser.parse_args()
    from dime_ds.log.table import format_table

    runs: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory(prefix="dime_bench_") as tmp:
        work = Path(tmp)
        demo_world(work)
        second_teacher(work)
        for r in range(args.rounds):
            for name, (a, b) in CASES.items():
                result = launch(work, f"{name}_{r}", overrides(work, name, a, b, args.steps, args.batch), 1,
                                threads=args.threads)[0]
                runs[name].append(result["samples_per_s"])
                print(f"  round {r + 1}: {name}: {runs[name][-1]:.0f} samples/s", flush=True)
    best = {name: max(v) for name, v in runs.items()}
    rows = [{"case": name, "samples_per_s": best[name], "rounds": runs[name],
             "vs_1_live": best[name] / best["1 live"], "vs_1_cached": best[name] / best["1 cached"]} for name in CASES]
    table = format_table(["teachers", "samples/s (best)", "rounds", "vs 1 live", "vs 1 cached"],
                         [[r["case"], f"{r['samples_per_s']:.0f}", " ".join(f"{v:.0f}" for v in r["rounds"]),
                           f"{r['vs_1_live']:.2f}", f"{r['vs_1_cached']:.2f}"] for r in rows])
    print(f"\nDIME-FM distillation with teacher ensembles, demo student <- demo-shaped teachers, 1 rank, global "
          f"batch {args.batch}, {args.steps} steps, {args.threads or os.cpu_count()} thread(s) on {os.cpu_count()} CPU "
          "cores\n" + table)
    print(f"second cached teacher costs {1 - best['2 cached'] / best['1 cached']:.0%} of cached throughput, "
          f"{1 - best['1 live + 1 cached'] / best['1 live']:.0%} of live throughput "
          f"(spread of rounds: {statistics.pstdev(runs['1 live']) / best['1 live']:.0%} for 1 live)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "cpus": os.cpu_count(),
                               "threads": args.threads, "rows": rows},
                              indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
