"""torch.profiler traces of dime_ds distillation steps, against the bare student's step, with each
phase of the step named (record_function scopes): data, teacher, student forward, loss, backward,
engine step; and the heaviest operators inside each. Run it on the world bench/peer_distill.py
prepared (--work), so that teacher, student and cache are the ones it measured:

    .venv/bin/python bench/profile_step.py --work /tmp/peer [--mode cache|live|bare] [--steps 3]
        [--warmup 2] [--threads 1] [--trace-dir /tmp/peer/traces] [peer_distill's --tiny/--student/--batch]

Prints, per mode, milliseconds per step of each phase and the top operators (self CPU time) of each;
writes a Chrome trace (chrome://tracing, perfetto) per mode under --trace-dir, outside git."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("data", "teacher", "student_forward", "loss", "backward", "engine_step", "optimizer")


def _profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, record_shapes=False, with_stack=False)


def _summary(prof, steps: int, top: int) -> dict:
    """{phase: ms per step} and the top operators by self time per step, from the profile's events."""
    events = prof.events()
    phases = {}
    for e in events:
        if e.name in PHASES:
            phases[e.name] = phases.get(e.name, 0.0) + e.cpu_time_total / 1e3 / steps
    # operators inside each phase: attribute each op to the innermost enclosing phase
    spans = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES))
    per_phase: dict[str, dict[str, float]] = {}
    for e in events:
        if e.name in PHASES or e.name.startswith("ProfilerStep"):
            continue
        start = e.time_range.start
        owner = next((n for s, t, n in spans if s <= start < t), "outside")
        bucket = per_phase.setdefault(owner, {})
        bucket[e.name] = bucket.get(e.name, 0.0) + e.self_cpu_time_total / 1e3 / steps
    tops = {p: sorted(ops.items(), key=lambda kv: -kv[1])[:top] for p, ops in per_phase.items()}
    return {"phase_ms": phases, "top_ops_ms": tops}


def profile_dime(overrides: list[str], steps: int, warmup: int, trace: Path, top: int) -> dict:
    """In this process: a dime_ds run whose steps after `warmup` are profiled, phase by phase."""
    from torch.profiler import record_function

    from dime_ds.config import load_config
    from dime_ds.engine import loop
    from dime_ds.training import run_training
    from dime_ds.log.setup import setup_logging

    state = {"step": 0, "prof": None, "wall": []}

    def single_step(trainer):  # Trainer._single_step, each call in its own scope
        objective = trainer.objective
        with record_function("data"):
            batch = objective.next_batch()
        with record_function("teacher"):
            targets = objective.targets(batch)
        with record_function("student_forward"):
            features = objective.student_features(trainer.forward, batch)
        with record_function("loss"):
            losses = objective.losses(features, targets)
        with record_function("backward"):
            trainer.engine.backward(losses["total"])
        with record_function("engine_step"):
            trainer.engine.step()
        return losses

    optimizer_step = loop.Trainer._optimizer_step

    def step(trainer):
        state["step"] += 1
        if state["step"] == warmup + 1:
            state["prof"] = _profiler().__enter__()
        t0 = time.perf_counter()
        losses = optimizer_step(trainer)
        if state["prof"] is not None:
            state["wall"].append(time.perf_counter() - t0)
        if state["step"] == warmup + steps:
            state["prof"].__exit__(None, None, None)
        return losses

    loop.Trainer._single_step, loop.Trainer._optimizer_step = single_step, step
    setup_logging()
    run_training(load_config(overrides))
    prof = state["prof"]
    prof.export_chrome_trace(str(trace))
    return {**_summary(prof, steps, top), "wall_ms_per_step": 1e3 * sum(state["wall"]) / len(state["wall"])}


def profile_bare(model: str, batch: int, precision: str, steps: int, warmup: int, trace: Path, top: int) -> dict:
    """The bare student's step (bench/support/bare_student.py's), phase by phase."""
    import open_clip
    import torch
    from torch.profiler import record_function

    torch.manual_seed(0)
    net = open_clip.create_model(model)
    size = net.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size)
    tokens = open_clip.get_tokenizer(model)(["a red circle on a blue square"] * batch)
    if precision == "bf16":
        net, images = net.to(torch.bfloat16), images.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp_bf16")
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    prof, wall = None, []
    for i in range(warmup + steps):
        if i == warmup:
            prof = _profiler().__enter__()
        t0 = time.perf_counter()
        with record_function("student_forward"), autocast:
            out = net(images, tokens)
        with record_function("loss"), autocast:
            loss = loss_fn(*out)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if prof is not None:
            wall.append(time.perf_counter() - t0)
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(str(trace))
    return {**_summary(prof, steps, top), "wall_ms_per_step": 1e3 * sum(wall) / len(wall)}


def _child(spec: dict) -> dict:
    trace = Path(spec["trace"])
    if spec["mode"] == "bare":
        return profile_bare(spec["model"], spec["batch"], spec["precision"], spec["steps"], spec["warmup"], trace,
                            spec["top"])
    return profile_dime(spec["overrides"], spec["steps"], spec["warmup"], trace, spec["top"])


def main() -> int:
    from bench.peer_distill import dime_common

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="a world bench/peer_distill.py --work prepared")
    parser.add_argument("--mode", nargs="+", default=["bare", "cache", "live"], choices=["bare", "cache", "live"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--student", default="ViT-S-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="the dime_ds runs' device (the bare student: CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--top", type=int, default=8, help="operators listed per phase")
    parser.add_argument("--bare-precision", default="bf16", choices=["bf16", "amp_bf16"])
    parser.add_argument("--dime-override", nargs="*", default=[])
    parser.add_argument("--trace-dir", help="default: <work>/traces")
    parser.add_argument("--out", help="JSON of the summaries (default: <trace-dir>/profile.json)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    trace_dir = Path(args.trace_dir or work / "traces")
    trace_dir.mkdir(parents=True, exist_ok=True)
    world = {"work": work, "root": work / "synthetic", "teacher": work / "teacher", "cache": work / "embeddings",
             "synthetic": json.loads((work / "synthetic_overrides.json").read_text())}
    results = {}
    for mode in args.mode:
        trace = trace_dir / f"{mode}.json"
        spec = {"mode": mode, "steps": args.steps, "warmup": args.warmup, "trace": str(trace), "top": args.top}
        if mode == "bare":
            spec.update(model=f"local-dir:{work / 'student'}", batch=args.batch, precision=args.bare_precision)
        else:
            overrides = dime_common(world, args) + [f"name=profile_{mode}", *args.dime_override]
            overrides += ["teacher.shard=replicate"] if mode == "live" else \
                ["teacher.source=cache", f"teacher.cache_dir={world['cache']}"]
            spec["overrides"] = overrides
        out = trace_dir / f"{mode}.summary.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
               "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"profile of {mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(out.read_text())
        print_summary(mode, results[mode])
    out = Path(args.out or trace_dir / "profile.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\ntraces: {trace_dir}/<mode>.json   summaries: {out}")
    return 0


def print_summary(mode: str, summary: dict) -> None:
    from dime_ds.log.table import format_table

    print(f"\n== {mode}: {summary['wall_ms_per_step']:.0f} ms per step (wall, under the profiler)")
    rows = [[p, f"{ms:.0f}"] for p, ms in summary["phase_ms"].items()]
    print(format_table(["phase", "ms/step"], rows))
    for phase, ops in summary["top_ops_ms"].items():
        print(f"  {phase}: " + ", ".join(f"{name} {ms:.0f}" for name, ms in ops if ms >= 1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        Path(sys.argv[3]).write_text(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
