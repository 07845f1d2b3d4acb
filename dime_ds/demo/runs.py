"""The students of `make demo` and `make study`: each trained once, resumed after a stop, reused
while its config holds. The run directory keeps a small ledger (RUN_STATE): the config's
fingerprint, the status and, once finished, the run summary.

- no ledger, or one of another config: the run starts from step 0 (its stale checkpoints and final
  weights removed first, so a resume never mixes configs);
- the same config, not finished (it was stopped): the run resumes from its latest checkpoint;
- the same config, finished, final weights there: reused as it is, nothing trained.

The fingerprint is the resolved config less what does not shape the weights (logging, evaluation,
checkpoint cadence, loader processes, the demo's own selections), plus the recipe of every demo
teacher a DIME-FM run learns from: a retrained teacher retrains its students."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from dime_ds import atomic
from dime_ds.config.schema import RootConfig
from dime_ds.demo.stopping import StopGuard, Stopped
from dime_ds.models import read_openclip_dir

log = logging.getLogger("dime_ds.demo")
RUN_STATE = "demo_run.json"
IGNORED = ("log", "eval", "ckpt", "demo", "study", "slurm", "name", "run_dir")
COMPLETED, TRAINING = "completed", "training"


def _recipe(arch: str) -> str | None:
    """The recipe hash a demo teacher directory records (None for any other teacher)."""
    if not arch.startswith("local-dir:"):
        return None
    try:
        return read_openclip_dir(arch.removeprefix("local-dir:")).get("dime_ds", {}).get("recipe")
    except FileNotFoundError:
        return None


def fingerprint(cfg: RootConfig) -> str:
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED:
        values.pop(key, None)
    for speed_only in ("workers", "decoded_cache_mb"):  # how fast the data comes, not what it is
        values["data"].pop(speed_only, None)
    if cfg.loss.objective == "dime":
        values["teacher_recipes"] = [_recipe(t.arch) for t in (cfg.teacher, *cfg.ensemble.teachers)]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_state(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RUN_STATE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _combined_speed(segments: list[dict]) -> float:
    """Samples/s over the segments of a run stopped and resumed (each segment's steps at its speed)."""
    samples = sum(s["samples"] for s in segments if s.get("samples_per_s"))
    seconds = sum(s["samples"] / s["samples_per_s"] for s in segments if s.get("samples_per_s"))
    return samples / seconds if seconds else 0.0


class Runner:
    """Trains (or resumes, or reuses) the command's runs under its StopGuard."""

    def __init__(self, guard: StopGuard):
        self.guard = guard

    def train(self, cfg: RootConfig, label: str) -> dict:
        """The run summary of `cfg`'s run, finished (status completed, final_weights); a stop raises Stopped."""
        from dime_ds.training import run_training

        run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.ckpt.dir)
        key, state = fingerprint(cfg), read_state(cfg.run_dir)
        steps = cfg.optim.steps
        if state is not None and state["fingerprint"] == key and state["status"] == COMPLETED \
                and Path(state["summary"].get("final_weights", "")).is_file():
            print(f"{label}: finished earlier ({run_dir}), reused", flush=True)
            return {**state["summary"], "reused": True}
        if state is None or state["fingerprint"] != key:
            for stale in (ckpt_dir, run_dir / "final"):
                if stale.exists():
                    log.info("%s: removing %s (from another config)", label, stale)
                    shutil.rmtree(stale)
            state = {"fingerprint": key, "status": TRAINING, "segments": []}
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_json(run_dir / RUN_STATE, state, indent=2)
            print(f"{label}: training {steps} steps x {cfg.optim.global_batch_size} ({run_dir})", flush=True)
        else:
            print(f"{label}: resuming from its latest checkpoint ({ckpt_dir})", flush=True)
        resumable = copy.deepcopy(cfg)
        OmegaConf.set_readonly(resumable, False)
        resumable.ckpt.resume = "latest"
        OmegaConf.set_readonly(resumable, True)
        with self.guard.training() as late:
            summary = run_training(resumable)
        done = summary["step"] - summary.get("start_step", 0)
        state["segments"].append({"samples": done * cfg.optim.global_batch_size,
                                  "samples_per_s": summary.get("samples_per_s", 0)})
        if summary["status"] != COMPLETED:
            atomic.write_json(run_dir / RUN_STATE, {**state, "status": summary["status"], "step": summary["step"]},
                              indent=2)
            raise Stopped(self.guard.stopped_message(label, summary["step"], steps, str(ckpt_dir)))
        summary = {**summary, "samples_per_s": _combined_speed(state["segments"]),
                   "resumed": len(state["segments"]) > 1}
        atomic.write_json(run_dir / RUN_STATE, {**state, "status": COMPLETED, "summary": summary}, indent=2,
                          default=str)
        if late():
            raise Stopped(f"stopped after {label} finished ({steps} steps); rerun `{self.guard.command}` to go on")
        return summary


def unfinished(summaries: dict[str, dict]) -> dict[str, str]:
    """{column: what to say} for the summaries of runs that did not finish (a table marks them)."""
    return {c: f"unfinished: {s.get('status')} at step {s.get('step')}" for c, s in summaries.items()
            if s.get("status") != COMPLETED}
