"""World view from each launcher's variables (fake environments), and the single-process identity
of the collectives."""
from __future__ import annotations

import os

import pytest
import torch

from dime_ds.distributed import collectives as C
from dime_ds.distributed import env as E
from dime_ds.distributed.env import WorldInfo, backend_for, device_for, expand_nodelist, world_info

SLURM_STEP = {  # rank 5 of 8 in a 2-node job, 4 tasks per node, as srun exports them
    "SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
    "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "node[003-004]",
}
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}


def test_torchrun():
    assert world_info(TORCHRUN) == WorldInfo(rank=3, local_rank=1, world_size=4, local_world_size=2,
                                             master_addr="10.0.0.7", master_port=29500, source="torchrun")


def test_torchrun_wins_over_slurm():
    info = world_info({**SLURM_STEP, **TORCHRUN})
    assert (info.source, info.rank, info.world_size, info.master_addr) == ("torchrun", 3, 4, "10.0.0.7")


def test_torchrun_without_a_port_is_an_error():
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        world_info({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"})


def test_slurm_step():
    info = world_info(SLURM_STEP)
    assert info == WorldInfo(rank=5, local_rank=1, world_size=8, local_world_size=4, master_addr="node003",
                             master_port=20000 + 123456 % 20000, source="slurm")
    assert info.node_rank == 1 and not info.is_main


def test_slurm_uneven_tasks_per_node_and_ntasks_per_node():
    env = {**SLURM_STEP, "SLURM_TASKS_PER_NODE": "5,3", "SLURM_NODEID": "1"}
    assert world_info(env).local_world_size == 3
    assert world_info({**env, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4
    assert world_info({**env, "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}).local_world_size == 2


def test_slurm_master_is_the_first_host_of_the_step():
    env = {**SLURM_STEP, "SLURM_JOB_NODELIST": "gpu[10-12],cpu1", "SLURM_STEP_NODELIST": "gpu[11-12]"}
    assert world_info(env).master_addr == "gpu11"
    del env["SLURM_STEP_NODELIST"]
    assert world_info(env).master_addr == "gpu10"


def test_master_variables_override_slurm():
    info = world_info({**SLURM_STEP, "MASTER_PORT": "31337", "MASTER_ADDR": "head"})
    assert (info.master_addr, info.master_port, info.source) == ("head", 31337, "slurm")


def test_salloc_shell_without_a_step_is_single():
    info = world_info({"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"})
    assert (info.source, info.rank, info.world_size, info.master_addr) == ("single", 0, 1, "127.0.0.1")


def test_submitit_on_slurm_is_marked():
    info = world_info({**SLURM_STEP, "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/x"})
    assert (info.source, info.rank, info.world_size, info.master_addr) == ("submitit", 5, 8, "node003")


def test_submitit_local_executor():
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0"}
    assert world_info(env) == WorldInfo(rank=1, local_rank=1, world_size=2, local_world_size=2,
                                        master_addr="127.0.0.1", master_port=24242, source="submitit")


def test_single_process():
    info = world_info({})
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (0, 0, 1, 1)
    assert (info.master_addr, info.source, info.is_main) == ("127.0.0.1", "single", True)
    assert 0 < info.master_port < 65536
    assert world_info({"MASTER_PORT": "29999"}).master_port == 29999


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[003-005,007],gpu1", ["node003", "node004", "node005", "node007", "gpu1"]),
    ("gpu1", ["gpu1"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("host-1.cluster,host-2.cluster", ["host-1.cluster", "host-2.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1]", "node[5-2]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_tasks_per_node_and_port_from_job_id():
    assert E.expand_tasks_per_node("4(x2),1") == [4, 4, 1]
    assert E.expand_tasks_per_node("2") == [2]
    assert E.port_from_job_id("123456") == 23456
    assert E.port_from_job_id(40000) == 20000
    assert E.port_from_job_id("1234_5") == E.port_from_job_id("12345")  # array jobs
    assert all(20000 <= E.port_from_job_id(j) < 40000 for j in (0, 1, 19999, 10**9 + 7))


def test_device_and_backend_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = world_info(TORCHRUN)
    assert device_for(info) == torch.device("cpu")
    assert device_for(info, "cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        device_for(info, "cuda")
    assert backend_for(device_for(info)) == "gloo"
    assert backend_for("cpu", "gloo") == "gloo"
    with pytest.raises(ValueError, match="nccl"):
        backend_for(torch.device("cpu"), "nccl")
    with pytest.raises(ValueError):
        backend_for("cpu", "mpi")


def test_device_and_backend_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    info = world_info({**TORCHRUN, "LOCAL_RANK": "3"})
    assert device_for(info) == torch.device("cuda", 1)  # local rank modulo the visible GPUs
    assert device_for(info, "cuda:0") == torch.device("cuda", 0)
    assert device_for(info, "cpu") == torch.device("cpu")
    assert backend_for(device_for(info)) == "nccl"
    assert backend_for("cuda:1") == "nccl"


def test_init_distributed_world_of_one_is_idempotent(monkeypatch):
    import torch.distributed as dist

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)  # restored after the test: init exports them
    assert not dist.is_initialized()
    info = world_info({})
    try:
        E.init_distributed(info, backend_for("cpu"), timeout_min=1)
        E.init_distributed(info, "gloo")
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == \
            ("0", "1", str(info.master_port))
        assert world_info() == WorldInfo(0, 0, 1, 1, "127.0.0.1", info.master_port, "torchrun")
        with pytest.raises(RuntimeError, match="already exists"):
            E.init_distributed(world_info(TORCHRUN), "gloo")
        x = torch.randn(3, 2, requires_grad=True)
        assert torch.equal(C.gather_with_grad(x), x) and C.all_reduce_mean(x).tolist() == x.tolist()
    finally:
        E.shutdown()
    assert not dist.is_initialized()
    E.shutdown()  # no group: a no-op


def test_collectives_are_identities_in_one_process():
    assert not C.is_distributed() and (C.rank(), C.world_size(), C.is_main()) == (0, 1, True)
    x = torch.randn(4, 3, requires_grad=True)
    assert C.gather_with_grad(x) is x
    g = C.gather_no_grad(x)
    assert torch.equal(g, x) and not g.requires_grad
    m = C.all_reduce_mean(x)
    assert torch.equal(m, x) and m is not x and not m.requires_grad
    assert C.broadcast_object({"a": 1}) == {"a": 1} and C.all_gather_object(5) == [5]
    C.barrier()
