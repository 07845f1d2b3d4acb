"""What the training benchmarks share: the demo world with a random demo-shaped teacher (throughput
does not depend on its weights), and a launcher of one training job on N local ranks, each its own
process (so each peak memory is its own), torchrun-style variables, results read back per rank.

Each rank reports its run summary plus: `peak_rss_gb` (the process's high-water mark),
`rss_at_train_gb` (resident memory when training starts, after models, engine and data are built),
`cuda_peak_gb` (on CUDA: torch's peak allocation during training, else None), and `step_s` and
`phases_s`, the wall time and the trainer's phase times (data_s, teacher_s, embed_s, student_s) of
each optimizer step, so that a caller can leave out the first steps' warm-up."""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_world(work: Path, cache: bool = True, synthetic: tuple[str, ...] = ()) -> None:
    """Under `work`: the synthetic world (`synthetic`: overrides of data.synthetic.*), a random
    demo-shaped teacher in work/demo_teacher, and with `cache` its embeddings in work/cache (the
    embed stage's format). Runs read texts from work/synthetic/texts (no match stage)."""
    sys.path.insert(0, str(ROOT))
    import open_clip
    import torch

    from dime_ds.config import load_config
    from dime_ds.data.shards import list_shards
    from dime_ds.demo.synthetic import write_world
    from dime_ds.embed.stage import embed_shards
    from dime_ds.models import load_teacher, save_openclip_dir
    from dime_ds.models.student import student_model_cfg, student_preprocess_cfg

    teacher_cfg = load_config(["experiment=demo_teacher", f"work_dir={work}", *synthetic])
    write_world(teacher_cfg.data.root, teacher_cfg.data.synthetic, progress=False)
    model_cfg = student_model_cfg(teacher_cfg.student)
    torch.manual_seed(0)
    save_openclip_dir(open_clip.CLIP(**model_cfg).state_dict(), model_cfg, student_preprocess_cfg(model_cfg),
                      work / "demo_teacher")
    if not cache:
        return
    cfg = load_config(["experiment=demo", f"work_dir={work}", f"data.texts={work}/synthetic/texts"])
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    for modality, spec in (("images", cfg.data.images), ("texts", cfg.data.texts)):
        embed_shards(teacher, list_shards(spec), work / "cache" / modality, modality, cfg.teacher.arch, progress=False)


def _rss_gb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(overrides: list[str], out: str) -> None:
    """One rank: train, recording memory at the start of training and each step's times."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dime_ds.config import load_config
    from dime_ds.engine import loop
    from dime_ds.training import run_training
    from dime_ds.log.setup import setup_logging

    record: dict = {"step_s": [], "phases_s": []}
    train, optimizer_step = loop.Trainer.train, loop.Trainer._optimizer_step

    def timed_train(trainer):
        record["rss_at_train_gb"] = _rss_gb()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        return train(trainer)

    def timed_step(trainer):
        before, t0 = dict(trainer.meter.window), time.perf_counter()
        losses = optimizer_step(trainer)
        record["step_s"].append(time.perf_counter() - t0)
        after = trainer.meter.window
        record["phases_s"].append({k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_s")})
        return losses

    loop.Trainer.train, loop.Trainer._optimizer_step = timed_train, timed_step
    setup_logging()
    summary = run_training(load_config(overrides))
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    Path(out).write_text(json.dumps({**summary, **record}, default=str))


def launch(work: Path, name: str, overrides: list[str], ranks: int, timeout: float = 900,
           threads: int | None = None) -> list[dict]:
    """Every rank's result dict (see the module docstring), in rank order. `threads`: OMP_NUM_THREADS
    per rank (default: the cores divided among the ranks)."""
    port = _free_port()
    procs, outs = [], []
    for rank in range(ranks):
        out = work / f"{name}.rank{rank}.json"
        outs.append(out)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 2) // ranks))}
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(overrides), str(out)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    return [json.loads(o.read_text()) for o in outs]


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]), sys.argv[2])
