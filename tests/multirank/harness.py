"""Run a function on N local ranks (gloo, forked from the test process) and collect its results.

Usage, from any test:

    from tests.multirank.harness import run_ranks

    def _body(rank, world_size, scale):          # module level or a closure: fork needs no pickling
        from dime_ds.distributed import collectives as C
        return C.all_reduce_mean(torch.tensor([rank * scale])).item()

    def test_mean():
        assert run_ranks(_body, 2, 10.0) == [5.0, 5.0]

Each rank is a child process forked with multiprocessing's 'fork' context (the parent has already
imported torch, so a rank starts in milliseconds). It gets MASTER_ADDR=127.0.0.1, a free
MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (so `dime_ds.distributed.env.world_info()`
reads a torchrun-shaped world, and DeepSpeed finds what it looks for), one torch thread, and a
gloo process group made by `dime_ds.distributed.env.init_distributed`, destroyed when `fn` returns.
`run_ranks` returns `fn(rank, world_size, *args)` of every rank, in rank order; the results must be
picklable (tensors are fine: they are pickled by value). An exception on any rank is raised here
as `RankError` with the remote tracebacks of every rank that failed within ERROR_GRACE_S of the
first, in rank order; the ranks still running then are killed (they would otherwise wait in a
collective). Ranks still running after `timeout` seconds are killed and `TimeoutError` raised.
`env` adds environment variables to every rank. Do not create a process group in the parent.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Mapping

# After one rank fails, how long the others get to report their own errors before they are killed.
ERROR_GRACE_S = 5.0

__all__ = ["RankError", "run_ranks"]


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def _child(fn: Callable[..., Any], rank: int, world_size: int, args: tuple, port: int, backend: str,
           timeout: float, env: Mapping[str, str], conn) -> None:
    status, payload = "ok", None
    try:
        os.environ.update({k: str(v) for k, v in env.items()})
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        import torch

        torch.set_num_threads(1)
        from dime_ds.distributed import env as dist_env

        dist_env.init_distributed(dist_env.world_info(), backend, timeout_min=timeout / 60)
        try:
            payload = fn(rank, world_size, *args)
        finally:
            dist_env.shutdown()
        data = pickle.dumps(("ok", payload))  # plain pickle: tensors by value, no shared-memory handles
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status, payload = "err", f"rank {rank}:\n{traceback.format_exc()}"
        data = pickle.dumps((status, payload))
    conn.send_bytes(data)
    conn.close()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 120,
              backend: str = "gloo", env: Mapping[str, str] | None = None) -> list[Any]:
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each on its own forked rank of
    one gloo process group. See the module docstring."""
    from dime_ds.distributed.env import free_port

    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, name=f"rank{rank}", daemon=True,
                        args=(fn, rank, world_size, args, port, backend, timeout, dict(env or {}), send))
        p.start()
        send.close()  # the child holds the writing end; EOF here means it died
        procs.append(p)
        conns.append(recv)

    results: dict[int, Any] = {}
    errors: list[tuple[int, str]] = []
    grace_deadline = 0.0
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if errors:  # the others' own errors (often "connection closed by peer") follow within moments
                left = min(left, grace_deadline - time.monotonic())
                if left <= 0:
                    break
            elif left <= 0:
                raise TimeoutError(f"ranks {sorted(pending)} of {world_size} still running after {timeout:.0f} s")
            for conn in wait(list(pending.values()), timeout=left):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    status, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    procs[rank].join(5)
                    status, payload = "err", f"rank {rank} died without a result (exit code {procs[rank].exitcode})"
                if status == "ok":
                    results[rank] = payload
                else:
                    if not errors:
                        grace_deadline = time.monotonic() + ERROR_GRACE_S
                    errors.append((rank, payload))
        if errors:  # every rank's error, in rank order: the first to arrive is not always the cause
            raise RankError("\n".join(payload for _, payload in sorted(errors)))
    finally:
        for p in procs:
            if p.is_alive() and (errors or pending):
                p.kill()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in conns:
            conn.close()
    return [results[r] for r in range(world_size)]
