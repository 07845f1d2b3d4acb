"""The stage runner (dime_ds.distributed.stage) on 2 gloo ranks: an error on one rank is raised on
every rank (none is left waiting in the next collective), a user error keeps its class, rank 0's
result reaches every rank, gathered shares equal the single-process result, a stage's own process
group is made from dist.* and torn down, and a rank stuck outside a collective is given up on after
dist.timeout_min."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.multirank.harness import run_ranks

N = 1001


def _outcome(fn, *args, **kwargs):
    """What a call did on this rank: ("ok", result) or (error class name, message)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the test compares what every rank saw
        return type(err).__name__, str(err)


def _fails_on(bad_rank: int, cls, message: str):
    from dime_ds.distributed import collectives as C

    def work(x):
        if C.rank() == bad_rank:
            raise cls(message)
        return x * 2

    return work


def _agree(rank, world, bad_rank, user_error):
    from dime_ds.config import ConfigError
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.stage import agreed

    cls = ConfigError if user_error else KeyError
    seen = _outcome(agreed, _fails_on(bad_rank, cls, f"shard {bad_rank} is broken"), 21, what="embedding images")
    # Both ranks are still in step: the next collective completes on each.
    return seen, C.all_gather_object(rank)


def test_an_error_on_rank_1_is_raised_on_both_ranks():
    ranks = run_ranks(_agree, 2, 1, False, timeout=60)
    assert ranks[0] == ranks[1]
    (kind, message), after = ranks[0]
    assert kind == "StageError" and after == [0, 1]
    assert message == "embedding images failed on 1 rank(s):\nrank 1: KeyError: 'shard 1 is broken'"


def test_a_user_error_keeps_its_class_and_message_on_every_rank():
    ranks = run_ranks(_agree, 2, 1, True, timeout=60)
    assert ranks[0] == ranks[1] == (("ConfigError", "shard 1 is broken"), [0, 1])


def test_no_error_returns_each_ranks_own_result():
    ranks = run_ranks(_agree, 2, -1, False, timeout=60)
    assert ranks == [(("ok", 42), [0, 1])] * 2


def _on_main(rank, world, fail):
    from dime_ds.distributed.stage import on_main

    def main_only():
        assert rank == 0, "on_main ran fn on another rank"
        if fail:
            raise OSError("disk full")
        return {"written": 7}

    return _outcome(on_main, main_only, what="writing the manifest")


def test_on_main_sends_rank_0s_result_or_error_to_every_rank():
    assert run_ranks(_on_main, 2, False, timeout=60) == [("ok", {"written": 7})] * 2
    ranks = run_ranks(_on_main, 2, True, timeout=60)
    assert ranks[0] == ranks[1] == ("StageError",
                                    "writing the manifest failed on 1 rank(s):\nrank 0: OSError: disk full")


def _share(n: int, rank: int, world: int) -> np.ndarray:
    """Some per-row work over this rank's contiguous rows."""
    start, stop = rank * n // world, (rank + 1) * n // world
    rows = np.arange(start, stop, dtype=np.float64)
    return np.sqrt(rows) * 3 + rows % 7


def _gather(rank, world, n):
    from dime_ds.distributed.stage import agreed, gather_to_main

    part = agreed(_share, n, rank, world, what="the shares")
    return gather_to_main(part)


def test_gathered_shares_in_rank_order_equal_the_single_process_result():
    reference = _share(N, 0, 1)
    main, other = run_ranks(_gather, 2, N, timeout=60)
    assert other is None  # only rank 0 holds the gathered list
    assert [len(p) for p in main] == [500, 501]
    assert np.array_equal(np.concatenate(main), reference)


def _next_group_port() -> None:
    """Destroy the current group, if any (the harness's); the next one is made on the next port (re-making a
    group on the port just released races with the old store's shutdown: see dime_ds.distributed.stage.stage)."""
    import os

    from dime_ds.distributed.env import shutdown

    shutdown()
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)


def _own_group(rank, world, timeout_min):
    """Leave the harness's group, then let two stages in a row each make and tear down their own."""
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.stage import agreed, stage

    dist_cfg = SimpleNamespace(backend="auto", timeout_min=timeout_min)
    seen = []
    for _ in range(2):
        _next_group_port()
        with stage(dist_cfg, "cpu") as ctx:
            seen.append((ctx.rank, ctx.world_size, str(ctx.device), C.is_distributed(),
                         agreed(C.all_gather_object, ctx.rank * 10)))
        seen.append(C.is_distributed())
    return seen


def test_a_stage_makes_and_tears_down_its_own_group():
    ranks = run_ranks(_own_group, 2, 1.0, timeout=60)
    for rank, seen in enumerate(ranks):
        assert seen == [(rank, 2, "cpu", True, [0, 10]), False] * 2


def _existing_group(rank, world):
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.stage import stage

    with stage(SimpleNamespace(backend="auto", timeout_min=1), "cpu") as ctx:
        inside = (ctx.rank, ctx.world_size, ctx.is_main)
    return inside, C.is_distributed()  # the harness's group is the caller's: left alone


def test_a_stage_inside_an_existing_group_leaves_it_alone():
    assert run_ranks(_existing_group, 2, timeout=60) == [((0, 2, True), True), ((1, 2, False), True)]


def _stuck(rank, world, timeout_min, stuck_s):
    from dime_ds.distributed.stage import raise_agreed, stage

    _next_group_port()
    with stage(SimpleNamespace(backend="gloo", timeout_min=timeout_min), "cpu"):
        if rank == 1:  # never reaches the agreement (a rank stuck in I/O)
            time.sleep(stuck_s)
            return None
        t0 = time.monotonic()
        seen = _outcome(raise_agreed, None)
        return seen[0], time.monotonic() - t0


def test_a_rank_that_never_agrees_is_given_up_on_after_dist_timeout_min():
    (kind, waited), _ = run_ranks(_stuck, 2, 0.05, 15.0, timeout=90)
    assert kind != "ok" and waited < 12  # a 3 s timeout, not the 15 s the other rank is stuck


def test_one_process_runs_fn_and_raises_its_own_error():
    from dime_ds.distributed.stage import agreed, on_main, raise_agreed

    assert agreed(lambda x: x + 1, 1) == 2 and on_main(lambda: "r") == "r"
    err = KeyError("k")
    with pytest.raises(KeyError) as caught:
        agreed(_fails_on(0, KeyError, "k"), 1)
    assert caught.value.args == ("k",)
    with pytest.raises(KeyError) as caught:
        raise_agreed(err)
    assert caught.value is err
    raise_agreed(None)


def _always(rank, world, leave_harness_group):
    """What engine/run.py asks for: a group for a world of one too; an existing one is kept."""
    from dime_ds.distributed import collectives as C
    from dime_ds.distributed.stage import process_group

    if leave_harness_group:
        _next_group_port()
    info, _, made = process_group(SimpleNamespace(backend="auto", timeout_min=1), "cpu", always=True)
    return info.rank, made, C.world_size()


def test_process_group_always_keeps_an_existing_group_and_makes_one_for_a_world_of_one():
    assert run_ranks(_always, 2, False, timeout=60) == [(0, False, 2), (1, False, 2)]
    assert run_ranks(_always, 1, True, timeout=60) == [(0, True, 1)]
