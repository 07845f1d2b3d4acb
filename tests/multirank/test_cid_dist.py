"""CLIP-CID's distributed terms on 2 gloo ranks (losses/cid.py): with centres sharded over the ranks
and every centre scored, the loss and the gradients (after the engine's average over ranks) w.r.t. the
student's parameters and the learnable centres equal one process holding every centre and the whole
global batch (functional.py); with a sample rate < 1 every rank scores the same centres, all
positives among them, and the loss is the one-process loss over that set. Through the DIME-FM
objective with two-pass accumulation (2 micro-batches per rank) the same holds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dime_ds.losses import functional
from tests.multirank.harness import run_ranks

WORLD, DIM_IN, DIM, K = 2, 6, 8, 7  # K odd: the ranks hold slices of different lengths
OPTS = dict(scale=32.0, margin=0.3)


class Model(nn.Module):
    """A linear student into the teacher's space and learnable centres (replicated, like the engine's)."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        torch.manual_seed(1)
        self.img = nn.Linear(DIM_IN, DIM)
        self.centres = nn.Parameter(centroids.clone())


def _batch(n: int, seed: int, k: int = K) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[[1, n - 2]] = -1  # unlabelled rows, one on each rank
    return {"x": torch.randn(n, DIM_IN, generator=g), "t": torch.randn(n, DIM, generator=g), "labels": labels,
            "centroids": torch.randn(k, DIM, generator=g)}


def _share(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // WORLD
    return x[rank * n:(rank + 1) * n]


def _rank(rank: int, world_size: int, b: dict, rate: float, step: int = 11):
    from dime_ds.distributed import collectives as C
    from dime_ds.losses.cid import cluster_loss, instance_loss, sampled_centres, shard_bounds
    from dime_ds.losses.dime import reduce_for_logging

    model = Model(b["centroids"])
    k = b["centroids"].shape[0]
    lo, hi = shard_bounds(k, rank, world_size)
    labels = _share(b["labels"], rank)
    s_img = model.img(_share(b["x"], rank))
    cluster = cluster_loss(s_img, model.centres[lo:hi], labels, k=k, sample_rate=rate, seed=3, step=step, **OPTS)
    instance = instance_loss(s_img, _share(b["t"], rank), temperature=0.07)
    (cluster + instance).backward()
    grads = {n: C.all_reduce_mean(p.grad) for n, p in model.named_parameters()}
    ids = sampled_centres(C.gather_no_grad(labels), k, rate, seed=3, step=step)
    return {"cluster": cluster.item(), "instance": instance.item(),
            "logged": reduce_for_logging({"cluster": cluster, "instance": instance}), "grads": grads,
            "own_centre_grad": model.centres.grad.abs().sum(dim=1).nonzero().flatten().tolist(),
            "slice": (lo, hi), "ids": ids}


def _reference(b: dict, ids: torch.Tensor | None = None):
    """One process: every centre (or the centres `ids`, labels renumbered into them), the whole batch."""
    model = Model(b["centroids"])
    s_img, labels, centres = model.img(b["x"]), b["labels"], model.centres
    if ids is not None:
        position = {c: i for i, c in enumerate(ids.tolist())}
        labels = torch.tensor([position[y] if y >= 0 else -1 for y in labels.tolist()])
        centres = centres[ids]
    cluster = functional.cluster_discrimination(s_img, centres, labels, **OPTS)
    instance = functional.instance_discrimination(s_img, b["t"], temperature=0.07)
    (cluster + instance).backward()
    return cluster.item(), instance.item(), {n: p.grad for n, p in model.named_parameters()}


def test_sharded_centres_give_the_one_process_loss_and_gradients():
    b = _batch(12, seed=0)
    want_cluster, want_instance, want_grads = _reference(b)
    ranks = run_ranks(_rank, WORLD, b, 1.0)
    assert [r["slice"] for r in ranks] == [(0, 4), (4, 7)]
    for r in ranks:
        # Cluster: the global loss on every rank. Instance: local losses whose mean is the global one.
        assert r["cluster"] == pytest.approx(want_cluster, rel=1e-5)
        assert r["logged"]["cluster"] == pytest.approx(want_cluster, rel=1e-5)
        assert r["logged"]["instance"] == pytest.approx(want_instance, rel=1e-5)
        # A rank's centre gradient lies on its own slice only: the average over ranks is exact.
        assert set(r["own_centre_grad"]) <= set(range(*r["slice"]))
        assert r["grads"].keys() == want_grads.keys()
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ranks[0]["instance"] != pytest.approx(ranks[1]["instance"])
    assert sum(r["instance"] for r in ranks) / WORLD == pytest.approx(want_instance, rel=1e-5)


def test_a_rank_with_no_sampled_centre_still_gives_the_one_process_loss():
    """k=6 on 2 ranks, labels in rank 0's slice only, and a step whose one sampled negative is rank
    0's too: rank 1 scores no centre and still returns the global loss and gradients."""
    from dime_ds.losses.cid import sampled_centres

    b = _batch(12, seed=2, k=2)
    b["centroids"] = torch.randn(6, DIM, generator=torch.Generator().manual_seed(9))
    step = next(t for t in range(100) if sampled_centres(b["labels"], 6, 0.25, seed=3, step=t).max() < 3)
    ranks = run_ranks(_rank, WORLD, b, 0.25, step)
    ids = ranks[0]["ids"]
    assert ids.max() < 3 and len(ids) == 3
    want_cluster, _, want_grads = _reference(b, ids)
    for r in ranks:
        assert r["cluster"] == pytest.approx(want_cluster, rel=1e-5)
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_centres_are_the_same_on_every_rank_and_hold_every_positive():
    b = _batch(12, seed=5, k=41)
    ranks = run_ranks(_rank, WORLD, b, 0.3)
    ids = ranks[0]["ids"]
    assert torch.equal(ids, ranks[1]["ids"])
    positives = set(b["labels"][b["labels"] >= 0].tolist())
    assert positives <= set(ids.tolist()) and len(ids) < 41
    want_cluster, _, want_grads = _reference(b, ids)
    for r in ranks:
        assert r["cluster"] == pytest.approx(want_cluster, rel=1e-5)
        torch.testing.assert_close(r["grads"]["img.weight"], want_grads["img.weight"], rtol=1e-4, atol=1e-6)
        # Unsampled centres get no gradient, as in the reference (which indexes the centres `ids`).
        torch.testing.assert_close(r["grads"]["centres"], want_grads["centres"], rtol=1e-4, atol=1e-6)
        assert set(r["grads"]["centres"].abs().sum(dim=1).nonzero().flatten().tolist()) <= set(ids.tolist())


def _accumulated_rank(rank: int, world_size: int, cluster_dir, cfg, batch: dict):
    from dime_ds.distributed import collectives as C
    from dime_ds.losses.dime import reduce_for_logging
    from tests.accumulate_fixtures import TensorCid, TinyStudent, accumulated_step, grads, split

    objective, student = TensorCid(cfg, cluster_dir), TinyStudent()
    losses = accumulated_step(objective, student, split(split(batch, world_size)[rank], 2))
    averaged = {n: C.all_reduce_mean(g) for n, g in grads(student).items()}  # what the engine does
    averaged["centres"] = C.all_reduce_mean(objective.trainable_module().centres.grad)
    return reduce_for_logging(losses), averaged


def test_accumulated_cid_objective_on_two_ranks_equals_one_process(tmp_path):
    import numpy as np

    from dime_ds.config.schema import LossConfig
    from dime_ds.data.pseudo_labels import write_pseudo_labels
    from tests.accumulate_fixtures import (DIM as T_DIM, TensorCid, TinyStudent, assert_grads_close, global_batch,
                                          grads, plain_step)

    n, k = 16, 9
    g = np.random.default_rng(1)
    keys = [f"img{i:02d}" for i in range(n)]
    write_pseudo_labels(tmp_path, keys[:-3], g.integers(0, k, n - 3), g.standard_normal((k, T_DIM)).astype(np.float32))
    cfg = LossConfig(w_ud=0.3, w_cluster=0.5, w_instance=0.5, learn_centres=True)
    batch = {**global_batch(n, seed=2), "keys": keys}
    objective, reference = TensorCid(cfg, tmp_path), TinyStudent()
    want = plain_step(objective, reference, batch)
    want_grads = {**grads(reference), "centres": objective.trainable_module().centres.grad}
    for logged, averaged in run_ranks(_accumulated_rank, WORLD, tmp_path, cfg, batch):
        assert logged.keys() == want.keys() and "cluster" in logged
        for key, value in want.items():
            assert logged[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
        assert_grads_close(averaged, want_grads)
