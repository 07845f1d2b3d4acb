"""One world view from whichever launcher started this process; the only reader of rank variables.

Launchers, in order of precedence:
- torchrun (and anything that exports the same variables, e.g. the DeepSpeed launcher or
  tests/multirank/harness.py): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- SLURM, one task per GPU started by srun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the tasks per
  node, and the first host of the step's (or job's) node list. Only inside a step: an interactive
  salloc shell has SLURM_JOB_ID but no SLURM_PROCID/SLURM_NTASKS and is a single process.
  submitit's SLURM executor runs its tasks with srun and marks them with SUBMITIT_EXECUTOR=slurm, so
  this branch covers it; the source then reads 'submitit'.
- submitit's local executor (`launch --local`): SUBMITIT_EXECUTOR=local and SUBMITIT_LOCAL_* variables
  (GLOBALID, LOCALID, NTASKS, JOB_ID), one node. Read here directly rather than through
  `submitit.JobEnvironment()`, which reads os.environ only and so cannot be tested with a mapping.
- otherwise a single process: rank 0 of 1 on 127.0.0.1 and a free port.
MASTER_ADDR / MASTER_PORT in the environment override the derived address and port everywhere.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SOURCES = ("torchrun", "slurm", "submitit", "single")
_PORT_BASE, _PORT_SPAN = 20000, 20000  # ports derived from a job id lie in [20000, 40000)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun' | 'slurm' | 'submitit' | 'single'

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS considers free right now (someone may take it before we do; good enough
    for one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_from_job_id(job_id: str | int) -> int:
    """Every task of one job derives the same port, different jobs (mostly) different ones."""
    digits = re.sub(r"\D", "", str(job_id))  # heterogeneous / array ids like "1234_5" or "1234+0"
    return _PORT_BASE + int(digits or 0) % _PORT_SPAN


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str) -> list[str]:
    """"003-005,007" -> ["003", "004", "005", "007"], zero padding kept."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in node list")
            width = len(lo) if lo.startswith("0") else 0
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif item:
            out.append(item)
    return out


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + mid + rest for mid in _expand_range_list(m.group(1)) for rest in _expand_host(tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, without scontrol: "node[003-005,007],gpu1" ->
    node003 node004 node005 node007 gpu1; several bracket groups ("r[1-2]n[01-02]") multiply."""
    return [host for part in _split_top_level(nodelist) for host in _expand_host(part)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE: "4(x2),1" -> [4, 4, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None or value == "":
        if default is None:
            raise KeyError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _slurm_local_world_size(environ: Mapping[str, str], world_size: int) -> int:
    # The step's layout first (srun inside a larger allocation), then the job's.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(key):
            per_node = expand_tasks_per_node(environ[key])
            node = _int(environ, "SLURM_NODEID", 0)
            return per_node[node] if node < len(per_node) else per_node[0]
    return world_size


def _from_slurm(environ: Mapping[str, str]) -> WorldInfo:
    world_size = _int(environ, "SLURM_NTASKS", 1)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
        or environ.get("SLURM_NODELIST") or ""
    hosts = expand_nodelist(nodelist) if nodelist else []
    addr = environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    port = _int(environ, "MASTER_PORT", port_from_job_id(job_id) if job_id else 0) or free_port()
    source = "submitit" if environ.get("SUBMITIT_EXECUTOR") == "slurm" else "slurm"
    return WorldInfo(rank=_int(environ, "SLURM_PROCID", 0), local_rank=_int(environ, "SLURM_LOCALID", 0),
                     world_size=world_size, local_world_size=_slurm_local_world_size(environ, world_size),
                     master_addr=addr, master_port=port, source=source)


def _from_submitit_local(environ: Mapping[str, str]) -> WorldInfo:
    world_size = _int(environ, "SUBMITIT_LOCAL_NTASKS", 1)
    job_id = environ.get("SUBMITIT_LOCAL_JOB_ID")  # the controller's pid, shared by all tasks
    port = _int(environ, "MASTER_PORT", port_from_job_id(job_id) if job_id else 0) or free_port()
    return WorldInfo(rank=_int(environ, "SUBMITIT_LOCAL_GLOBALID", 0),
                     local_rank=_int(environ, "SUBMITIT_LOCAL_LOCALID", 0), world_size=world_size,
                     local_world_size=world_size, master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                     master_port=port, source="submitit")


def world_info(environ: Mapping[str, str] = os.environ) -> WorldInfo:
    """Where this process sits in the job, read from `environ` (see the module docstring)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world_size = _int(environ, "WORLD_SIZE")
        if world_size > 1 and not environ.get("MASTER_PORT"):
            raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_PORT is not: every rank would pick "
                               "a different port")
        return WorldInfo(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK", 0),
                         world_size=world_size, local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world_size),
                         master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                         master_port=_int(environ, "MASTER_PORT", 0) or free_port(), source="torchrun")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _from_slurm(environ)
    if environ.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in environ:
        return _from_submitit_local(environ)
    return WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1,
                     master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                     master_port=_int(environ, "MASTER_PORT", 0) or free_port(), source="single")


def device_for(info: WorldInfo, device: str = "auto") -> torch.device:
    """auto: cuda:{local_rank} when CUDA is available, else cpu. 'cuda' picks the local rank's GPU
    (modulo the visible GPUs, for jobs that hand each task its own CUDA_VISIBLE_DEVICES); 'cuda:N'
    and 'cpu' are taken as given."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but CUDA is not available on this machine")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device(device)


def backend_for(device: torch.device | str, backend: str = "auto") -> str:
    """nccl for CUDA devices, gloo for CPU; an explicit choice is checked against the device."""
    kind = torch.device(device).type
    if backend == "auto":
        return "nccl" if kind == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend must be auto, nccl or gloo, not {backend!r}")
    if backend == "nccl" and kind != "cuda":
        raise ValueError(f"dist.backend=nccl needs CUDA devices, but this process runs on {kind}; "
                         "use dist.backend=auto or gloo")
    return backend


def _export(info: WorldInfo) -> None:
    """DeepSpeed (and anything torchrun-shaped) reads these."""
    os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port), RANK=str(info.rank),
                      WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size))


def init_distributed(info: WorldInfo, backend: str = "auto", timeout_min: float = 30) -> None:
    """Export the world variables, set the CUDA device (nccl), and create the default process group,
    also for a world of one (DeepSpeed wants one). `backend` as from `backend_for` ('auto' resolves
    it from `device_for(info)`). Calling it again is a no-op."""
    if backend == "auto":
        backend = backend_for(device_for(info))
    if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
        raise RuntimeError(f"a process group already exists as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not {info.rank} of {info.world_size}")
    _export(info)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        return
    log.info("init %s process group: rank %d/%d (local %d/%d) via %s:%d, from %s", backend, info.rank,
             info.world_size, info.local_rank, info.local_world_size, info.master_addr, info.master_port,
             info.source)
    dist.init_process_group(backend=backend, init_method=f"tcp://{_url_host(info.master_addr)}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min))
    atexit.unregister(_shutdown_gloo_at_exit)  # registered once, however many groups this process makes
    atexit.register(_shutdown_gloo_at_exit)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literals


def shutdown() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _shutdown_gloo_at_exit() -> None:
    """A gloo group still alive when the interpreter shuts down can abort the process ("terminate
    called without an active exception", status 134 under srun: its worker threads free tensors once
    Python is gone), so a process that kept its group (the training job does, for a later run in the
    same process) destroys it while Python still runs, whatever the exit. Not NCCL: destroying it while
    a peer still waits in a collective can hang the exit."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
