"""A user error in a job of 2 ranks started torchrun's way (RANK, WORLD_SIZE, MASTER_* in the
environment, one `python -m` process per rank): every rank exits with status 2, the message is
printed once (by rank 0), and no rank aborts ("terminate called without an active exception", a
gloo group alive at the interpreter's exit) or shows a traceback. tests/slurm/test_clean_exits.py
runs the same under srun."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_two_ranks(tmp_path, module: str, args: list[str], timeout: float = 240) -> tuple[list[int], list[str]]:
    """Each rank's exit status and stderr."""
    from dime_ds.distributed.env import free_port

    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        logs.append(tmp_path / f"rank{rank}.err")
        with open(logs[-1], "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                                          stderr=err, env=env))
    try:
        statuses = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return statuses, [log.read_text() for log in logs]


def assert_clean(statuses: list[int], stderr: list[str], message: str) -> None:
    assert statuses == [2, 2], "\n".join(s[-3000:] for s in stderr)
    everything = "".join(stderr)
    assert everything.count(message) == 1, everything[-4000:]  # one message, from rank 0
    assert message in stderr[0]
    assert "terminate called" not in everything and "Traceback" not in everything, everything[-4000:]


def test_a_missing_data_path_in_training(tmp_path, tiny_world, tiny_teacher_dir):
    """Each rank finds it on its own, inside the training job (under its heartbeats)."""
    from tests.conftest import engine_overrides

    missing = tmp_path / "no_such_texts"
    args = engine_overrides(tmp_path, tiny_world, tiny_teacher_dir, f"data.texts={missing}", "device=cpu")
    assert_clean(*run_two_ranks(tmp_path, "dime_ds.distill", args), f"no shards match '{missing}'")


def test_a_missing_data_path_in_a_runner_stage(tmp_path, tiny_world, tiny_teacher_dir):
    """The embed stage: the ranks agree on the error through the stage runner."""
    missing = tmp_path / "no_such_images" / "x.tar"
    args = ["match.stage=embed", "experiment=demo", f"work_dir={tmp_path}", f"data.root={tiny_world}",
            f"data.images={missing}", f"teacher.arch=local-dir:{tiny_teacher_dir}", "log.progress=false",
            "device=cpu"]
    assert_clean(*run_two_ranks(tmp_path, "dime_ds.match", args), f"no shards match '{missing}'")
