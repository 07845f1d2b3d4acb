"""CLIP-CID's terms inside the DIME-FM objective (objectives/cid.py): weights 0 leave DIME-FM's loss
bit-identical; the total adds the weighted terms; labels are looked up by image key; two-pass
accumulation gives the loss and gradients (student and learnable centres) of one big batch; a
missing or mismatched pseudo-label directory is a clear error naming it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dime_ds.config import ConfigError
from dime_ds.config.schema import LossConfig
from dime_ds.data.pseudo_labels import write_pseudo_labels
from dime_ds.losses import functional
from tests.accumulate_fixtures import (DIM, LOSS_CFG, TensorCid, TinyStudent, accumulated_step, assert_grads_close,
                                      global_batch, grads, plain_step, split)

K, N = 5, 16
DIME = {k: getattr(LOSS_CFG, k) for k in ("w_vl", "w_pvl", "w_ud", "t_vl", "t_pvl", "t_ud", "scale")}


def _cfg(**cid) -> LossConfig:
    return LossConfig(**DIME, **cid)


@pytest.fixture
def cluster_dir(tmp_path):
    g = np.random.default_rng(0)
    keys = [f"img{i:03d}" for i in range(N - 2)]  # the last two images were never clustered
    write_pseudo_labels(tmp_path / "clusters", keys, g.integers(0, K, len(keys)),
                        g.standard_normal((K, DIM)).astype(np.float32))
    return tmp_path / "clusters"


def _batch(seed: int = 0) -> dict:
    return {**global_batch(N, seed=seed), "keys": [f"img{i:03d}" for i in range(N)]}


def test_zero_weights_leave_the_dime_loss_bit_identical(cluster_dir):
    batch = _batch()
    plain = TensorCid(_cfg(), cluster_dir)
    assert plain.cid is None  # defaults: nothing loaded, nothing computed
    want = plain.losses(plain.student_features(TinyStudent(), batch), plain.targets(batch))
    assert set(want) == {"vl", "pvl", "ud", "total"}
    direct = functional.dime_losses(batch["t_img"], batch["t_txt"], TinyStudent().img(batch["x_img"]),
                                    batch["t_txt"], **DIME)
    assert all(torch.equal(want[k], direct[k]) for k in want)

    cid = TensorCid(_cfg(w_cluster=0.5, w_instance=0.25), cluster_dir)
    got = cid.losses(cid.student_features(TinyStudent(), batch), cid.targets(batch))
    assert set(got) == {"vl", "pvl", "ud", "cluster", "instance", "total"}
    assert all(torch.equal(got[k], want[k]) for k in ("vl", "pvl", "ud"))
    torch.testing.assert_close(got["total"], want["total"] + 0.5 * got["cluster"] + 0.25 * got["instance"])


def test_labels_come_from_the_keys_and_the_terms_are_functional(cluster_dir):
    from dime_ds.data.pseudo_labels import PseudoLabels

    batch = _batch(seed=3)
    objective = TensorCid(_cfg(w_cluster=1.0, w_instance=1.0, cluster_margin=0.2), cluster_dir)
    targets = objective.targets(batch)
    want_labels = PseudoLabels(cluster_dir).lookup(batch["keys"])
    assert targets["cluster_label"].tolist() == want_labels.tolist() and want_labels[-1] == -1
    s_img = TinyStudent().img(batch["x_img"])
    got = objective.losses(objective.student_features(TinyStudent(), batch), targets)
    centres = torch.from_numpy(PseudoLabels(cluster_dir).centroids)
    want = functional.cluster_discrimination(s_img, centres, targets["cluster_label"], scale=32.0, margin=0.2)
    torch.testing.assert_close(got["cluster"], want)
    torch.testing.assert_close(got["instance"], functional.instance_discrimination(s_img, batch["t_img"],
                                                                                    temperature=0.07))


@pytest.mark.parametrize("learn", [False, True])
def test_accumulated_equals_the_whole_batch_with_cid_terms(cluster_dir, learn):
    cfg = _cfg(w_cluster=0.5, w_instance=0.5, learn_centres=learn)
    batch = _batch(seed=7)
    reference, ref_objective = TinyStudent(), TensorCid(cfg, cluster_dir)
    want = plain_step(ref_objective, reference, batch)
    student, objective = TinyStudent(), TensorCid(cfg, cluster_dir)
    got = accumulated_step(objective, student, split(batch, 2))
    assert got.keys() == want.keys() and "cluster" in got
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert_grads_close(grads(student), grads(reference))
    assert (objective.trainable_module() is not None) == learn
    if learn:
        want_centres = ref_objective.trainable_module().centres.grad
        assert want_centres.abs().sum() > 0
        assert_grads_close(grads(objective.trainable_module()), {"centres": want_centres})


def test_missing_or_mismatched_pseudo_labels_are_clear_errors(tmp_path, cluster_dir):
    with pytest.raises(ConfigError, match=f"cluster.out_dir={tmp_path / 'nowhere'}.*no complete pseudo-labels"):
        TensorCid(_cfg(w_cluster=1.0), tmp_path / "nowhere")
    write_pseudo_labels(tmp_path / "wide", ["a"], np.array([0]), np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ConfigError, match=f"cluster.out_dir={tmp_path / 'wide'}: centroids are {DIM + 1}-d"):
        TensorCid(_cfg(w_cluster=1.0), tmp_path / "wide")
    # Instance discrimination alone reads no pseudo-labels.
    assert TensorCid(_cfg(w_instance=1.0), tmp_path / "nowhere").cid.labels is None


def test_config_refuses_cid_terms_it_cannot_run():
    from dime_ds.config import load_config

    with pytest.raises(ConfigError, match="loss.learn_centres=true .* loss.w_cluster=0"):
        load_config(["experiment=demo", "loss.learn_centres=true"])
    with pytest.raises(ConfigError, match="loss.objective=clip"):
        load_config(["experiment=demo_baseline", "loss.w_instance=0.5"])
    with pytest.raises(ConfigError, match="loss.cluster_sample_rate"):
        load_config(["experiment=demo_cid", "loss.cluster_sample_rate=0"])
    assert dataclasses.asdict(LossConfig())["w_cluster"] == 0.0 == LossConfig().w_instance
