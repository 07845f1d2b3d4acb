"""What a training run reports at each log step: losses, learning rate, gradient norm, throughput
(samples/s, phase times, model TFLOP/s and MFU), data faults and memory, as one dict of TensorBoard
scalars. The Trainer times its phases with a StepMeter and hands the window here."""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field

import torch

from dime_ds.distributed import collectives as C
from dime_ds.losses.dime import reduce_for_logging
from dime_ds.models.flops import ModelFlops

PHASES = ("data_s", "teacher_s", "embed_s", "student_s")


@dataclass
class StepMeter:
    """Seconds per phase and samples since the last log line (a window), and over the whole run."""

    window: dict = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    steps: int = 0

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.window[phase] = self.window.get(phase, 0.0) + time.perf_counter() - t0

    def step_done(self, samples: int, seconds: float) -> None:
        self.window["samples"] = self.window.get("samples", 0) + samples
        self.window["seconds"] = self.window.get("seconds", 0.0) + seconds
        self.window["steps"] = self.window.get("steps", 0) + 1
        self.samples, self.seconds, self.steps = self.samples + samples, self.seconds + seconds, self.steps + 1

    def take(self) -> dict:
        window, self.window = self.window, {}
        return window


@dataclass
class StepMetrics:
    """Assembles one log step's scalars. Collective (loss means, fault sums): every rank calls it."""

    world_size: int
    device: torch.device
    flops: ModelFlops | None
    peak_tflops: float | None

    def collect(self, losses: dict, window: dict, lr: float, grad_norm: float | None, objective) -> dict:
        values = {f"loss/{k}": v for k, v in reduce_for_logging(losses).items()}
        values["optim/lr"] = lr
        if grad_norm is not None:
            values["optim/grad_norm"] = float(grad_norm)
        values.update(self.throughput(window))
        for name, count in objective.skipped().items():
            values[f"data/skipped_{name}"] = C.reduce_scalar(count)
        faults = self.data_faults(objective)
        values["data/damaged_shards"] = float(sum(f["damaged"] for f in faults.values()))
        values["data/truncated_texts"] = float(sum(f["truncated"] for f in faults.values()))
        values["memory/host_max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.device.type == "cuda":
            values["memory/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values

    @staticmethod
    def data_faults(objective) -> dict:
        """Collective: per stream, {"damaged": damaged shards counted once per (shard, epoch) over all
        ranks, "damaged_shards": their names, "truncated": sentences cut, summed over ranks}. The
        ranks' (shard, epoch) pairs are united, not their counts summed: where ranks split the samples
        of fewer shards than readers, every rank meets the same damaged shard in the same epoch."""
        local = objective.data_faults()
        every = C.all_gather_object({name: (f["damaged_epochs"], f["truncated"]) for name, f in local.items()})
        out = {}
        for name in local:
            pairs = {(shard, epoch) for rank in every for shard, epochs in rank[name][0].items() for epoch in epochs}
            out[name] = {"damaged": len(pairs), "damaged_shards": sorted({shard for shard, _ in pairs}),
                         "truncated": sum(rank[name][1] for rank in every)}
        return out

    def throughput(self, window: dict) -> dict:
        values = {}
        if window.get("seconds"):
            values["perf/samples_per_s"] = window["samples"] / window["seconds"]
            values.update(self.flops_readout(values["perf/samples_per_s"]))
        for phase in PHASES:
            values[f"perf/{phase}_per_step"] = window.get(phase, 0.0) / max(1, window.get("steps", 1))
        return values

    def flops_readout(self, samples_per_s: float) -> dict:
        """perf/model_tflops_per_device (and perf/mfu) at this global rate; empty when not counted."""
        if self.flops is None:
            return {}
        return self.flops.readout(samples_per_s / self.world_size, self.peak_tflops)

    def run_summary(self, meter: StepMeter) -> dict:
        """The whole run's throughput, for the run summary."""
        if meter.seconds <= 0:
            return {}
        out = {"samples_per_s": meter.samples / meter.seconds}
        out.update({k.removeprefix("perf/"): v for k, v in self.flops_readout(out["samples_per_s"]).items()})
        if self.flops is not None:
            out["model_flops_per_sample"] = {"student": self.flops.student, "teacher": self.flops.teacher}
        return out
