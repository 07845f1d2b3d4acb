"""dime_ds against open_clip_train's own distillation, side by side, in one run: the same random
teacher weights (saved once as an OpenCLIP model directory, which both tools load), the same student
architecture (random init, its own text tower), the same batch and the same synthetic-world JPEGs,
each resized by each tool's own preprocessing. Cases:

  open_clip_train fp32 / amp_bf16  `python -m open_clip_train.main --distill-model local-dir:<teacher>`
                                    on a csv of the images as files (its webdataset reader fails on
                                    webdataset 1.0); per-step times parsed from its own log lines
                                    ("Batch (t)", logged every step: data wait + step, end to end)
  dime_ds live / zero3 / cache      `dime_ds` distillation, teacher.shard=replicate, teacher.shard=zero3,
                                    teacher.source=cache (after `python -m dime_ds.match stage=embed`);
                                    per-step times of Trainer._optimizer_step (data + teacher + student)
  bare student bf16 / amp_bf16      OpenCLIP student forward + backward + AdamW on one fixed batch, no
                                    teacher, no data (bench/support/bare_student.py)

Each case is a process of its own with OMP_NUM_THREADS = --threads (default: the machine's cores; on a
machine shared with other work, 1: OpenMP's barriers wait for a descheduled thread, and 2 threads on
a busy 2-core machine ran a step 10-30x slower than 1 did). The figure per case is
the median of the per-step times after `--warmup` steps; samples/s = batch / that median. Prints a
table with live/peer-best and cached/bare-best, each case's achieved model TFLOP/s (counted FLOPs per
sample x samples/s; MFU with --peak-tflops) and writes JSON.

    .venv/bin/python bench/peer_distill.py [--teacher ViT-B-32 --student ViT-S-32] [--tiny]
        [--batch 32] [--steps 16] [--warmup 3] [--workers 0] [--threads N] [--cases ...]
        [--peak-tflops P] [--out ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("ocl_fp32", "ocl_amp_bf16", "dime_live", "dime_zero3", "dime_cache", "bare_bf16", "bare_amp_bf16")
LABELS = {
    "ocl_fp32": "open_clip_train distill, fp32",
    "ocl_amp_bf16": "open_clip_train distill, amp_bf16",
    "dime_live": "dime_ds distill, teacher live (replicate)",
    "dime_zero3": "dime_ds distill, teacher zero3",
    "dime_cache": "dime_ds distill, teacher cached",
    "bare_bf16": "bare student, bf16 weights",
    "bare_amp_bf16": "bare student, amp_bf16",
}
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], what: str, log: Path, threads: int, timeout: float = 1800) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), timeout=timeout,
                              cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); its log {log}:\n{log.read_text()[-3000:]}")


def model_cfgs(args) -> tuple[dict, dict]:
    """(teacher, student) OpenCLIP model configs: named architectures, or the demo's with --tiny."""
    import open_clip

    from omegaconf import OmegaConf

    from dime_ds.config import load_config
    from dime_ds.config.schema import StudentConfig
    from dime_ds.models.student import student_model_cfg

    if args.tiny:  # the demo's models at 32 px; --student replaces the demo's student
        teacher = student_model_cfg(load_config(["experiment=demo_teacher"]).student)
        if not args.student:
            return teacher, student_model_cfg(load_config(["experiment=demo"]).student)
        return teacher, student_model_cfg(OmegaConf.structured(StudentConfig(arch=args.student, text="own")))
    teacher = open_clip.get_model_config(args.teacher)
    if teacher is None:
        raise SystemExit(f"{args.teacher!r} is not an OpenCLIP architecture (open_clip.list_models())")
    # the student as dime_ds takes it: a name (timm towers included) or a model-config .json file
    return teacher, student_model_cfg(OmegaConf.structured(StudentConfig(arch=args.student, text="own")))


def prepare(work: Path, args) -> dict:
    """The world, the teacher (random, saved once), the student's config directory (no weights: each
    tool initialises its own), the csv of the images as files, and the embed stage's teacher cache."""
    import open_clip
    import torch

    from dime_ds.config import load_config
    from dime_ds.data.shards import list_shards
    from dime_ds.demo.synthetic import write_world
    from dime_ds.models import save_openclip_dir
    from dime_ds.models.student import student_preprocess_cfg

    n = args.batch * (args.warmup + args.steps + 2)
    synthetic = [f"data.synthetic.n_images={n}", f"data.synthetic.n_texts={n}", "data.synthetic.n_paired=16",
                 "data.synthetic.n_eval=16", f"data.synthetic.shard_size={max(64, n // 4)}",
                 "data.synthetic.head_skew=0"]
    cfg = load_config(["experiment=demo", f"work_dir={work}", *synthetic])
    write_world(cfg.data.root, cfg.data.synthetic, progress=False)
    teacher_cfg, student_cfg = model_cfgs(args)
    torch.manual_seed(0)
    save_openclip_dir(open_clip.CLIP(**teacher_cfg).state_dict(), teacher_cfg, student_preprocess_cfg(teacher_cfg),
                      work / "teacher")
    student_dir = work / "student"
    student_dir.mkdir(exist_ok=True)
    (student_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": student_cfg, "preprocess_cfg": student_preprocess_cfg(student_cfg)}, indent=2))

    # open_clip_train reads (filepath, title) rows; each image is paired with the next sentence (the
    # pairing does not matter to throughput; dime_ds reads the same images and sentences unpaired).
    images_dir = work / "csv_images"
    images_dir.mkdir(exist_ok=True)
    paths = []
    for shard in list_shards(cfg.data.images):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    path = images_dir / Path(member.name).name
                    path.write_bytes(tar.extractfile(member).read())
                    paths.append(path)
    texts = []
    for shard in list_shards(cfg.data.corpus):
        with tarfile.open(shard) as tar:
            texts += [tar.extractfile(m).read().decode().replace("\t", " ").replace("\n", " ")
                      for m in tar if m.name.endswith(".txt")]
    rows = ["filepath\ttitle"] + [f"{p}\t{texts[i % len(texts)]}" for i, p in enumerate(sorted(paths))]
    (work / "train.csv").write_text("\n".join(rows) + "\n")
    (work / "synthetic_overrides.json").write_text(json.dumps(synthetic))  # bench/profile_step.py reuses the world

    world = {"work": work, "root": Path(cfg.data.root), "teacher": work / "teacher", "student": student_dir,
             "csv": work / "train.csv", "images": len(paths), "texts": texts[:args.batch],
             "cache": work / "embeddings", "synthetic": synthetic}
    if any(c == "dime_cache" for c in args.cases):
        t0 = time.time()
        _run([sys.executable, "-m", "dime_ds.match", "stage=embed", *dime_common(world, args)[:5],
              "log.progress=false"], "python -m dime_ds.match stage=embed", work / "embed.log", args.threads)
        print(f"  embed stage (teacher cache of {len(paths)} images, {len(texts)} sentences): "
              f"{time.time() - t0:.0f} s", flush=True)
    return world


def dime_common(world: dict, args) -> list[str]:
    student = ["student.text=own"] if args.tiny and not args.student else \
        ["student.model_cfg=null", f"student.arch={args.student}", "student.text=own"]
    total = args.warmup + args.steps
    return ["experiment=demo", f"work_dir={world['work']}", f"teacher.arch=local-dir:{world['teacher']}",
            "teacher.pretrained=null", f"data.texts={world['root']}/texts", *world["synthetic"], *student,
            f"optim.steps={total}", "optim.warmup_steps=1", f"optim.global_batch_size={args.batch}",
            "eval.every_n_steps=0", "ckpt.every_n_steps=0", "log.progress=false", f"log.every_n_steps={total}",
            "log.tensorboard=false", f"data.workers={args.workers}", "data.augment=false",
            f"device={args.device}"]


def run_dime(world: dict, args, mode: str) -> list[float]:
    from bench.support.training_runs import launch

    overrides = dime_common(world, args) + [f"name=peer_{mode}"]
    overrides += {"live": ["teacher.shard=replicate"], "zero3": ["teacher.shard=zero3"],
                  "cache": ["teacher.source=cache", f"teacher.cache_dir={world['cache']}"]}[mode]
    overrides += list(args.dime_override)
    result = launch(world["work"], f"peer_{mode}", overrides, 1, timeout=3600, threads=args.threads)[0]
    return result["step_s"]


def run_open_clip_train(world: dict, args, precision: str) -> list[float]:
    name = f"ocl_{precision}"
    logs = world["work"] / "ocl_logs"
    shutil.rmtree(logs / name, ignore_errors=True)  # open_clip_train refuses (exit 0) to reuse a run name
    cmd = [sys.executable, "-m", "open_clip_train.main",
           "--train-data", str(world["csv"]), "--dataset-type", "csv",
           "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--model", f"local-dir:{world['student']}",
           "--distill-model", f"local-dir:{world['teacher']}",
           # must be non-empty for distillation to switch on; a local-dir model ignores it (its weights
           # are the directory's)
           "--distill-pretrained", "local-dir",
           "--batch-size", str(args.batch), "--epochs", "1", "--workers", str(args.workers),
           "--precision", precision, "--lr", "3e-3", "--wd", "0.05", "--warmup", "1", "--grad-clip-norm", "1.0",
           "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--report-to", "",
           "--save-frequency", "0", "--seed", "0"]
    if args.device != "auto":
        cmd += ["--device", args.device]
    _run(cmd, f"open_clip_train ({precision})", world["work"] / f"{name}.log", args.threads, timeout=3600)
    lines = (logs / name / "out.log").read_text().splitlines()
    step_s = [float(m.group(1)) for line in lines if (m := BATCH_TIME.search(line))]
    if len(step_s) < args.warmup + args.steps:
        raise RuntimeError(f"open_clip_train ({precision}) logged {len(step_s)} steps, expected "
                           f"{args.warmup + args.steps}: see {logs / name / 'out.log'}")
    return step_s[:args.warmup + args.steps]


def run_bare(world: dict, args, precision: str) -> list[float]:
    out = world["work"] / f"bare_{precision}.json"
    spec = {"model": f"local-dir:{world['student']}", "batch": args.batch, "steps": args.warmup + args.steps,
            "precision": precision, "texts": world["texts"],
            "device": "cuda" if args.device in ("auto", "cuda") and _cuda() else "cpu"}
    _run([sys.executable, str(ROOT / "bench" / "support" / "bare_student.py"), json.dumps(spec), str(out)],
         f"bare student ({precision})", world["work"] / f"bare_{precision}.log", args.threads)
    return json.loads(out.read_text())["step_s"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_case(world: dict, args, case: str) -> list[float]:
    kind, _, variant = case.partition("_")
    if kind == "ocl":
        return run_open_clip_train(world, args, variant)
    if kind == "dime":
        return run_dime(world, args, variant)
    return run_bare(world, args, variant)


def model_flops(args) -> dict:
    """FLOPs per sample (dime_ds.models.flops, counted on meta-device copies): the student's forward and
    backward (its own text tower, projected into the teacher's width as dime_ds trains it) and the
    teacher's forward; the same figures for both tools, which train the same models."""
    from dime_ds.models.flops import student_flops, teacher_flops
    from dime_ds.models.student import Student

    teacher_cfg, student_cfg = model_cfgs(args)
    return {"student": student_flops(lambda: Student(student_cfg, "own", teacher_cfg["embed_dim"]), with_text=True),
            "teacher": teacher_flops(teacher_cfg)}


def summarise(case: str, step_s: list[float], args, flops: dict) -> dict:
    steady = step_s[args.warmup:]
    median = statistics.median(steady)
    per_sample = flops["student"] + (flops["teacher"] if case.startswith(("ocl", "dime_live", "dime_zero3")) else 0)
    row = {"case": case, "what": LABELS[case], "median_step_s": median, "samples_per_s": args.batch / median,
           "spread_step_s": [min(steady), max(steady)], "step_s": step_s,
           "model_tflops_per_s": per_sample * args.batch / median / 1e12}
    if args.peak_tflops:
        row["mfu"] = row["model_tflops_per_s"] / args.peak_tflops
    return row


def ratio(rows: dict, num: list[str], den: list[str]) -> float | None:
    a = [rows[c]["samples_per_s"] for c in num if c in rows]
    b = [rows[c]["samples_per_s"] for c in den if c in rows]
    return max(a) / max(b) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="ViT-B-32", help="OpenCLIP architecture of the (random) teacher")
    parser.add_argument("--student", default=None,
                        help="the student: an OpenCLIP architecture (timm towers too: convnext_tiny, "
                             "MobileCLIP2-S0) or a model-config .json (default ViT-S-32; with --tiny the demo's)")
    parser.add_argument("--tiny", action="store_true",
                        help="the demo's teacher and student configs (32 px): a one-minute smoke run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="measured steps per case (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--workers", type=int, default=0, help="loader processes, both tools (0: in the main process)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of every case (default: all cores; 1 on a shared machine)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--dime-override", nargs="*", default=[], help="extra Hydra overrides for the dime_ds cases")
    parser.add_argument("--peak-tflops", type=float, help="one device's peak TFLOP/s in the training precision: "
                        "adds an MFU column")
    parser.add_argument("--work", help="keep the world, logs and traces here (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer_distill.json"))
    args = parser.parse_args()
    if args.student is None and not args.tiny:
        args.student = "ViT-S-32"
    from dime_ds.log.table import format_table

    with tempfile.TemporaryDirectory(prefix="dime_peer_") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        world = prepare(work, args)
        flops = model_flops(args)
        rows = {}
        for case in args.cases:
            start = time.time()
            rows[case] = summarise(case, run_case(world, args, case), args, flops)
            rows[case]["wall_s"] = round(time.time() - start, 1)
            print(f"  {LABELS[case]}: {rows[case]['samples_per_s']:.2f} samples/s "
                  f"(median step {rows[case]['median_step_s']:.3f} s)", flush=True)

    live_peer = ratio(rows, ["dime_live"], ["ocl_fp32", "ocl_amp_bf16"])
    cached_bare = ratio(rows, ["dime_cache"], ["bare_bf16", "bare_amp_bf16"])
    student = args.student or "demo_small"
    arch = f"demo teacher -> {student} student (--tiny)" if args.tiny else f"{args.teacher} -> {student}"
    mfu = ["MFU"] if args.peak_tflops else []
    table = format_table(["what", "samples/s", "median step s", "min-max step s", "model TFLOP/s", *mfu, "wall s"],
                         [[r["what"], f"{r['samples_per_s']:.2f}", f"{r['median_step_s']:.3f}",
                           f"{r['spread_step_s'][0]:.2f}-{r['spread_step_s'][1]:.2f}", f"{r['model_tflops_per_s']:.3f}",
                           *([f"{100 * r['mfu']:.1f} %"] if args.peak_tflops else []), r["wall_s"]]
                          for r in rows.values()])
    print(f"\nDistillation side by side: {arch}, batch {args.batch}, {args.steps} steps after {args.warmup} "
          f"warm-up, loader workers {args.workers}, {args.threads} threads, {os.cpu_count()} CPU cores; model "
          f"GFLOPs per sample: student forward+backward {flops['student'] / 1e9:.2f}, teacher forward "
          f"{flops['teacher'] / 1e9:.2f} (not run with a cache, nor by the bare student)\n{table}")
    for label, value in (("live / peer-best", live_peer), ("cached / bare-best", cached_bare)):
        if value is not None:
            print(f"{label}: {value:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"teacher": "demo_teacher" if args.tiny else args.teacher,
                               "student": args.student or "demo_small", "tiny": args.tiny,
                               "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                               "workers": args.workers, "threads": args.threads, "cpus": os.cpu_count(),
                               "dime_overrides": args.dime_override,
                               "model_flops_per_sample": flops, "peak_tflops": args.peak_tflops,
                               "live_over_peer_best": live_peer, "cached_over_bare_best": cached_bare,
                               "rows": list(rows.values())}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
