"""CPU latency of exported models: the image and the text encoder at batch 1 and 32, eager PyTorch
(fp32, torch.inference_mode) and onnxruntime (CPU execution provider, the ONNX files of
`python -m dime_ds.export ... --onnx`, image tower in its deploy form), for each OpenCLIP model
directory given: typically a distilled student and its teacher. Per model also its parameters and
counted FLOPs per image and per sentence (dime_ds/models/flops.py).

The figure is the median of --runs timed calls after --warmup untimed ones. The calls are interleaved:
each round times every (model, encoder, batch, runtime) once, so that a noisy machine slows all of
them alike, and speed claims are ratios of figures from one run (printed against the first model).
Threads are pinned (--threads, default 1: on a shared machine a second OpenMP thread waits on a
descheduled one). Prints tables, writes JSON to bench/results/latency.json.

    .venv/bin/python bench/latency.py DIR [DIR ...]     # OpenCLIP model directories (ONNX files made if absent)
    .venv/bin/python bench/latency.py --work work       # `make demo`'s student (exported) and its teacher
    .venv/bin/python bench/latency.py --tiny            # smoke run: the demo's architectures, random weights
With no argument: --work work where `make demo` has left its student, else --tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTENCES = ("a photo of a red circle", "two blue stars next to a green square on a white background",
             "a small yellow triangle", "nothing at all")
# torch: eager on the deploy form (what one deploys; the model itself when nothing folds);
# torch_training: the training form as open_clip loads it, timed only for towers that fold.
RUNTIMES = ("torch", "onnxruntime", "torch_training")


def demo_models(work: Path, tmp: Path) -> list[tuple[str, Path]]:
    """(name, model dir) of the demo's distilled student, exported with its ONNX files, and its teacher."""
    from open_clip.factory import parse_model_name

    from dime_ds.config import load_config
    from dime_ds.export import export_student

    cfg = load_config(["experiment=demo", f"work_dir={work.resolve()}"])
    student = export_student(cfg.run_dir, tmp / "student", onnx=True)
    return [("student (demo)", student), ("teacher (demo)", Path(parse_model_name(cfg.teacher.arch)[1]))]


def tiny_models(tmp: Path) -> list[tuple[str, Path]]:
    """The demo's student and teacher architectures with random weights, as OpenCLIP directories."""
    import open_clip
    import torch

    from dime_ds.config import load_config
    from dime_ds.models import save_openclip_dir
    from dime_ds.models.student import student_model_cfg, student_preprocess_cfg

    models = []
    for name, experiment in (("student (demo_small, random)", "demo_baseline"),
                             ("teacher (demo_teacher, random)", "demo_teacher")):
        cfg = student_model_cfg(load_config([f"experiment={experiment}"]).student)
        torch.manual_seed(0)
        out = tmp / experiment
        save_openclip_dir(open_clip.CLIP(**cfg).state_dict(), cfg, student_preprocess_cfg(cfg), out)
        models.append((name, out))
    return models


def prepare(name: str, model_dir: Path, onnx_tmp: Path, threads: int) -> dict:
    """The model (training form, as open_clip loads it), its ONNX sessions (made into `tmp` when the
    directory has none, `onnx_tmp`) and its counts."""
    import torch

    from dime_ds.models.deploy import deploy_form
    from dime_ds.models.flops import count_flops
    from dime_ds.models.onnx_export import (IMAGE_FILE, PARITY_FILE, TEXT_FILE, export_onnx, image_hw, load_openclip,
                                            onnx_session)

    onnx_dir = model_dir
    if not (model_dir / PARITY_FILE).is_file():  # no checked ONNX pair there: make one, leave the directory alone
        onnx_dir = onnx_tmp
        export_onnx(model_dir, onnx_dir)
    record = json.loads((onnx_dir / PARITY_FILE).read_text())
    model, tokenizer = load_openclip(model_dir)
    deployed = deploy_form(model)
    total = sum(p.numel() for p in model.parameters())
    image_params = sum(p.numel() for p in model.visual.parameters())
    two = {"image": torch.randn(2, 3, *image_hw(model)), "text": tokenizer(list(SENTENCES[:2]))}
    # Counted with autograd on: without it nn.MultiheadAttention takes its fused inference kernel,
    # which the FLOP counter has no formula for.
    with torch.enable_grad():
        flops = {"image": count_flops(lambda: model.encode_image(two["image"])) // 2,
                 "text": count_flops(lambda: model.encode_text(two["text"])) // 2}
    return {"name": name, "dir": str(model_dir), "onnx_dir": str(onnx_dir), "model": model, "tokenizer": tokenizer,
            "deployed": deployed.model if deployed.folded else None,
            "sessions": {"image": onnx_session(onnx_dir / IMAGE_FILE, threads),
                         "text": onnx_session(onnx_dir / TEXT_FILE, threads)},
            "params": {"image": image_params, "text": total - image_params, "total": total}, "flops": flops,
            "folded_modules": record["folded_modules"], "parity_passed": record["passed"]}


def inputs(entry: dict, encoder: str, batch: int):
    import torch

    if encoder == "image":
        from dime_ds.models.onnx_export import image_hw

        return torch.randn(batch, 3, *image_hw(entry["model"]), generator=torch.Generator().manual_seed(0))
    return entry["tokenizer"]([SENTENCES[i % len(SENTENCES)] for i in range(batch)])


def measure(models: list[dict], batches: list[int], runs: int, warmup: int) -> list[dict]:
    import torch

    cases = []
    for entry in models:
        for encoder in ("image", "text"):
            for batch in batches:
                x = inputs(entry, encoder, batch)
                forms = {"torch": entry["deployed"] or entry["model"], "torch_training": entry["model"]}
                encode = {k: m.encode_image if encoder == "image" else m.encode_text for k, m in forms.items()}
                session, feed = entry["sessions"][encoder], {encoder: x.numpy()}
                calls = {"torch": lambda f=encode["torch"], x=x: f(x),
                         "torch_training": lambda f=encode["torch_training"], x=x: f(x),
                         "onnxruntime": lambda session=session, feed=feed: session.run(None, feed)}
                for runtime in RUNTIMES if entry["deployed"] is not None else RUNTIMES[:2]:
                    cases.append({"model": entry["name"], "encoder": encoder, "batch": batch, "runtime": runtime,
                                  "call": calls[runtime], "times": []})
    with torch.inference_mode():
        for round_ in range(warmup + runs):
            order = random.Random(round_).sample(cases, len(cases))  # no case always follows the same one
            for case in order:
                start = time.perf_counter()
                case["call"]()
                if round_ >= warmup:
                    case["times"].append(time.perf_counter() - start)
    return [{"model": c["model"], "encoder": c["encoder"], "batch": c["batch"], "runtime": c["runtime"],
             "median_ms": 1e3 * statistics.median(c["times"]), "min_ms": 1e3 * min(c["times"]),
             "runs": len(c["times"])} for c in cases]


def ratios(rows: list[dict], models: list[dict]) -> list[dict]:
    """Each model's median over the first model's, per encoder, batch and runtime (same run)."""
    ms = {(r["model"], r["encoder"], r["batch"], r["runtime"]): r["median_ms"] for r in rows}
    base = models[0]["name"]
    return [{"model": m["name"], "over": base, "encoder": e, "batch": b, "runtime": rt,
             "ratio": ms[(m["name"], e, b, rt)] / ms[(base, e, b, rt)]}
            for m in models[1:] for (name, e, b, rt) in ms if name == base and (m["name"], e, b, rt) in ms]


LIVE = ("model", "deployed", "tokenizer", "sessions")  # an entry's objects, not its figures


def report(models: list[dict], rows: list[dict], relative: list[dict], batches: list[int]) -> None:
    from dime_ds.log.table import format_table

    print(format_table(["model", "image params", "text params", "GFLOPs / image", "GFLOPs / sentence",
                        "deploy form", "ONNX parity"],
                       [[m["name"], f"{m['params']['image'] / 1e6:.2f}M", f"{m['params']['text'] / 1e6:.2f}M",
                         f"{m['flops']['image'] / 1e9:.3f}", f"{m['flops']['text'] / 1e9:.3f}",
                         f"{m['folded_modules']} folded" if m["folded_modules"] else "-",
                         "ok" if m["parity_passed"] else "FAILED"] for m in models]))
    ms = {(r["model"], r["encoder"], r["batch"], r["runtime"]): r["median_ms"] for r in rows}
    table = []
    for m in models:
        for encoder in ("image", "text"):
            for batch in batches:
                eager, ort = (ms[(m["name"], encoder, batch, rt)] for rt in RUNTIMES[:2])
                training = ms.get((m["name"], encoder, batch, "torch_training"))
                table.append([m["name"], encoder, batch, f"{eager:.2f}", f"{ort:.2f}", f"{eager / ort:.2f}x",
                              f"{training:.2f}" if training is not None else "-"])
    print("\n" + format_table(["model", "encoder", "batch", "torch ms", "onnxruntime ms", "torch / onnxruntime",
                               "torch ms, training form"], table))
    if relative:
        print(f"\nlatency over {models[0]['name']}'s, same run:")
        print(format_table(["model", "encoder", "batch", "runtime", "ratio"],
                           [[r["model"], r["encoder"], r["batch"], r["runtime"], f"{r['ratio']:.2f}x"]
                            for r in relative]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="OpenCLIP model directories (exported students, teachers)")
    parser.add_argument("--work", type=Path, default=None, help="a `make demo` work directory")
    parser.add_argument("--tiny", action="store_true", help="smoke run on random demo-sized models")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and onnxruntime intra-op threads")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    parser.add_argument("--runs", type=int, default=None, help="timed calls per case (default 30; 5 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    if not args.dirs and args.work is None and not args.tiny:
        demo = ROOT / "work"
        args.work = demo if (demo / "runs" / "demo" / "checkpoints" / "latest").is_file() else None
        args.tiny = args.work is None
    runs = args.runs or (5 if args.tiny else 30)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        unique = len({p.name for p in args.dirs}) == len(args.dirs)  # else full paths name the models
        named = ([(p.name if unique else str(p), p.resolve()) for p in args.dirs] if args.dirs
                 else demo_models(args.work, tmp) if args.work else tiny_models(tmp))
        models = [prepare(name, path, tmp / f"onnx_{i}", args.threads) for i, (name, path) in enumerate(named)]
        rows = measure(models, args.batches, runs, args.warmup)

    relative = ratios(rows, models) if len(models) > 1 else []
    report(models, rows, relative, args.batches)
    print(f"\nmedian of {runs} interleaved runs after {args.warmup} warm-up rounds, {args.threads} thread(s), "
          f"fp32, {platform.machine()} ({os.cpu_count()} cores)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
              "machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "models": [{k: v for k, v in m.items() if k not in LIVE} for m in models],
              "rows": rows, "ratios": relative}
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
