"""CLIP-CID's losses (losses/functional.py) equal a direct numpy transcription of their definitions
(docs/design.md), margin and arccos clamp included; the negative sampling and centre sharding of
losses/cid.py keep every positive and are reproducible from (seed, step)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dime_ds.losses import functional
from dime_ds.losses.cid import cluster_loss, sampled_centres, shard_bounds


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(v: list[float]) -> float:
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def _cluster_reference(s, w, labels, scale, margin) -> float:
    """The formula, one row and one centre at a time, in float64."""
    s, w = _unit(s.astype(np.float64)), _unit(w.astype(np.float64))
    per_row = []
    for i, y in enumerate(labels):
        if y == -1:
            continue
        logits = []
        for j in range(len(w)):
            cos = float(s[i] @ w[j])
            if j == y:
                theta = math.acos(min(max(cos, -1 + 1e-7), 1 - 1e-7))
                logits.append(scale * math.cos(theta + margin))
            else:
                logits.append(scale * cos)
        per_row.append(_logsumexp(logits) - logits[y])
    return sum(per_row) / len(per_row) if per_row else 0.0


def _instance_reference(s, t, temperature) -> float:
    s, t = _unit(s.astype(np.float64)), _unit(t.astype(np.float64))
    rows = []
    for i in range(len(s)):
        logits = [float(s[i] @ t[j]) / temperature for j in range(len(t))]
        rows.append(_logsumexp(logits) - logits[i])
    return sum(rows) / len(rows)


@pytest.mark.parametrize("scale, margin", [(32.0, 0.3), (10.0, 0.0), (64.0, 0.5)])
def test_cluster_discrimination_is_the_formula(scale, margin):
    g = np.random.default_rng(int(scale + 10 * margin))
    s, w = g.standard_normal((12, 8)).astype(np.float32), g.standard_normal((5, 8)).astype(np.float32)
    labels = g.integers(0, 5, size=12)
    labels[[2, 7]] = -1  # unlabelled rows leave the mean
    got = functional.cluster_discrimination(torch.from_numpy(s), torch.from_numpy(w), torch.from_numpy(labels),
                                            scale=scale, margin=margin)
    assert got.item() == pytest.approx(_cluster_reference(s, w, labels, scale, margin), rel=1e-5)


def test_cluster_discrimination_at_the_clamp_edge():
    """cos_y = +1 and -1 exactly (a row on its own centre, or opposite it): the arccos is clamped to
    (-1, 1), so the loss is the formula's and its gradient finite."""
    g = np.random.default_rng(3)
    w = g.standard_normal((4, 6)).astype(np.float32)
    s = np.stack([w[1], -w[2], 3.0 * w[0], g.standard_normal(6).astype(np.float32)])
    labels = np.array([1, 2, 0, 3])
    s_t = torch.from_numpy(s).requires_grad_(True)
    w_t = torch.from_numpy(w).requires_grad_(True)
    got = functional.cluster_discrimination(s_t, w_t, torch.from_numpy(labels), scale=32.0, margin=0.3)
    got.backward()
    assert got.item() == pytest.approx(_cluster_reference(s, w, labels, 32.0, 0.3), rel=1e-4)
    assert torch.isfinite(s_t.grad).all() and torch.isfinite(w_t.grad).all()


def test_cluster_discrimination_margin_raises_the_loss_and_unlabelled_rows_do_not_count():
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    def loss(lab, m=0.3, rows=slice(None)):
        return functional.cluster_discrimination(s[rows], w, lab, scale=32.0, margin=m).item()

    assert loss(labels) > loss(labels, m=0.0)
    partial = labels.clone()
    partial[3:] = -1
    assert loss(partial) == pytest.approx(loss(labels[:3], rows=slice(0, 3)), rel=1e-6)
    assert loss(torch.full((6,), -1)) == 0.0


@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_instance_discrimination_is_the_formula(temperature):
    g = np.random.default_rng(int(temperature * 100))
    s, t = g.standard_normal((9, 8)).astype(np.float32), g.standard_normal((9, 8)).astype(np.float32)
    got = functional.instance_discrimination(torch.from_numpy(s), torch.from_numpy(t), temperature=temperature)
    assert got.item() == pytest.approx(_instance_reference(s, t, temperature), rel=1e-5)


def test_shards_tile_the_centres():
    for k, world in ((10, 3), (7, 2), (1, 4), (64, 8)):
        bounds = [shard_bounds(k, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == k
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_sampled_centres_keep_every_positive_and_repeat_from_seed_and_step():
    k, rate = 100, 0.1
    labels = torch.tensor([3, 97, 3, -1, 50, 12])
    ids = sampled_centres(labels, k, rate, seed=0, step=5)
    positives = {3, 97, 50, 12}
    assert positives <= set(ids.tolist())
    assert len(ids) == len(positives) + math.ceil(rate * (k - len(positives))) == len(set(ids.tolist()))
    assert torch.equal(ids, torch.sort(ids).values) and 0 <= ids.min() and ids.max() < k
    assert torch.equal(ids, sampled_centres(labels.flip(0), k, rate, seed=0, step=5))  # order-free
    assert not torch.equal(ids, sampled_centres(labels, k, rate, seed=0, step=6))
    assert not torch.equal(ids, sampled_centres(labels, k, rate, seed=1, step=5))
    assert torch.equal(sampled_centres(labels, k, 1.0, seed=0, step=5), torch.arange(k))


def test_one_process_sampled_loss_is_the_formula_over_the_sampled_centres():
    """Single process: cluster_loss over all centres at rate 1 is functional's; at rate < 1 it is
    functional's over the sampled centres, labels renumbered into them."""
    g = torch.Generator().manual_seed(4)
    s, w = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[0] = -1
    opts = dict(k=40, scale=32.0, margin=0.3, seed=2, step=7)
    full = cluster_loss(s, w, labels, sample_rate=1.0, **opts)
    assert full.item() == pytest.approx(
        functional.cluster_discrimination(s, w, labels, scale=32.0, margin=0.3).item(), rel=1e-6)
    ids = sampled_centres(labels, 40, 0.25, seed=2, step=7)
    position = {c: i for i, c in enumerate(ids.tolist())}
    renumbered = torch.tensor([position[y] if y >= 0 else -1 for y in labels.tolist()])
    sampled = cluster_loss(s, w, labels, sample_rate=0.25, **opts)
    assert sampled.item() == pytest.approx(functional.cluster_discrimination(
        s, w[ids], renumbered, scale=32.0, margin=0.3).item(), rel=1e-6)
    assert sampled.item() < full.item()  # fewer negatives in the denominator
