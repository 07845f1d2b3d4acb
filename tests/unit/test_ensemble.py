"""Teacher ensembles: every DIME-FM term's target is the teachers' combined distribution. Two copies of
one teacher are that teacher; weights (1, 0) are the first teacher alone; the student's extra heads
train but never reach the export; Algorithm 1's combined rows score the weighted mean cosine."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dime_ds.losses import functional

CFG = dict(w_vl=0.5, w_pvl=0.3, w_ud=0.4, t_vl=1.0, t_pvl=3.0, t_ud=7.0, scale=100.0)
D_IN, D_A, D_B = 6, 8, 5


class TwoHeads(nn.Module):
    """A stand-in student: one tower, a head into teacher A's space, one into teacher B's."""

    def __init__(self, d_b: int = D_A):
        super().__init__()
        torch.manual_seed(1)
        self.tower = nn.Linear(D_IN, 7)
        self.head_a = nn.Linear(7, D_A)
        self.head_b = nn.Linear(7, d_b)
        self.txt = nn.Linear(D_IN, D_A)


def _data(seed: int = 0, n_img: int = 6, n_txt: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x_img": torch.randn(n_img, D_IN, generator=g), "x_txt": torch.randn(n_txt, D_IN, generator=g),
            "a_img": torch.randn(n_img, D_A, generator=g), "a_txt": torch.randn(n_txt, D_A, generator=g),
            "b_img": torch.randn(n_img, D_B, generator=g), "b_txt": torch.randn(n_txt, D_B, generator=g)}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _student(model: TwoHeads, d: dict, own_text: bool):
    h = model.tower(d["x_img"])
    return model.head_a(h), model.head_b(h), (model.txt(d["x_txt"]) if own_text else d["a_txt"])


@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("own_text", [False, True])
def test_two_copies_of_one_teacher_are_that_teacher(combine, own_text):
    d = _data()
    # the student's head for the copy is the same map as its head for the original
    single, ensemble = TwoHeads(), TwoHeads()
    ensemble.head_b.load_state_dict(ensemble.head_a.state_dict())
    s_img, _, s_txt = _student(single, d, own_text)
    want = functional.dime_losses(d["a_img"], d["a_txt"], s_img, s_txt, **{**CFG, "scale": 100.0},
                                  scales=[70.0])
    want["total"].backward()
    s_a, s_b, s_txt = _student(ensemble, d, own_text)
    got = functional.dime_losses(d["a_img"], d["a_txt"], s_a, s_txt, **CFG, extra=[(d["a_img"], d["a_txt"], s_b)],
                                 scales=[70.0, 70.0], weights=[0.5, 0.5], combine=combine)
    got["total"].backward()
    for key in ("vl", "pvl", "ud", "total"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5), key
    g_single, g_ens = _grads(single), _grads(ensemble)
    for name in ("tower.weight", "tower.bias") + (("txt.weight",) if own_text else ()):
        torch.testing.assert_close(g_ens[name], g_single[name], rtol=1e-4, atol=1e-7)
    # the two heads share what the one head of the single teacher received
    torch.testing.assert_close(g_ens["head_a.weight"] + g_ens["head_b.weight"], g_single["head_a.weight"],
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_weights_one_zero_are_the_first_teacher_and_a_real_mix_is_not(combine):
    d = _data(seed=3)
    model = TwoHeads(D_B)
    s_a, s_b, s_txt = _student(model, d, True)
    alone = functional.dime_losses(d["a_img"], d["a_txt"], s_a, s_txt, **CFG)
    first = functional.dime_losses(d["a_img"], d["a_txt"], s_a, s_txt, **CFG, extra=[(d["b_img"], d["b_txt"], s_b)],
                                   weights=[1.0, 0.0], combine=combine)
    for key in alone:
        assert first[key].item() == alone[key].item(), key  # exactly: a teacher of weight 0 takes no part
    mixed = functional.dime_losses(d["a_img"], d["a_txt"], s_a, s_txt, **CFG, extra=[(d["b_img"], d["b_txt"], s_b)],
                                   weights=[0.5, 0.5], combine=combine)
    assert all(mixed[key].item() != pytest.approx(alone[key].item(), rel=1e-3) for key in ("vl", "pvl", "ud"))
    mixed["total"].backward()
    assert model.head_b.weight.grad is not None and model.head_b.weight.grad.abs().sum() > 0


def test_prob_combine_is_the_weighted_mean_of_the_softmaxes_and_logit_of_the_logits():
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(4, 7, generator=g) * 5, torch.randn(4, 7, generator=g) * 5
    w, t = [0.25, 0.75], 2.0
    prob = functional.mixed_log_probs([la, lb], w, t, "prob").exp()
    torch.testing.assert_close(prob, 0.25 * F.softmax(la / t, -1) + 0.75 * F.softmax(lb / t, -1))
    logit = functional.mixed_log_probs([la, lb], w, t, "logit").exp()
    torch.testing.assert_close(logit, F.softmax((0.25 * la + 0.75 * lb) / t, -1))
    assert not torch.allclose(prob, logit)


def test_teacher_scale_changes_only_the_targets():
    d = _data(seed=5)
    s_img, _, s_txt = _student(TwoHeads(), d, True)
    base = functional.dime_losses(d["a_img"], d["a_txt"], s_img, s_txt, **CFG)
    same = functional.dime_losses(d["a_img"], d["a_txt"], s_img, s_txt, **CFG, scales=[100.0])
    sixty = functional.dime_losses(d["a_img"], d["a_txt"], s_img, s_txt, **CFG, scales=[60.0])
    assert same["total"].item() == base["total"].item()
    assert sixty["total"].item() != pytest.approx(base["total"].item(), rel=1e-3)


def test_student_heads_train_but_stay_out_of_the_export():
    from dime_ds.models.student import Student
    from tests.conftest import tiny_model_cfg

    plain = Student(tiny_model_cfg(embed_dim=16), "own", target_dim=32)
    ens = Student(tiny_model_cfg(embed_dim=16), "own", target_dim=32, ensemble_dims=(24, 16))
    assert not any(k.startswith("ensemble_proj") for k in plain.state_dict())
    assert ens.ensemble_dims == (24, 16)
    out = ens(images=torch.randn(2, 3, 32, 32), tokens=torch.randint(0, 100, (2, 16)))
    assert out.image.shape == (2, 32) and [x.shape for x in out.image_spaces] == [(2, 24), (2, 16)]
    state, _ = ens.openclip_state()
    assert not any("ensemble" in k for k in state)
    assert set(state) == set(plain.openclip_state()[0])


def test_a_checkpoint_state_rebuilds_the_student_with_its_heads(tmp_path, tiny_teacher_dir):
    from dime_ds.config import load_config
    from dime_ds.engine.consolidate import student_from_state
    from dime_ds.models import build_run_student

    cfg = load_config(["experiment=demo", f"work_dir={tmp_path}", f"teacher.arch=local-dir:{tiny_teacher_dir}"])
    student = build_run_student(cfg.student, cfg.teacher, 48, init=False, ensemble_dims=(40, 24))
    rebuilt = student_from_state(cfg, student.state_dict())
    assert rebuilt.ensemble_dims == (40, 24)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v.float())


def test_ensemble_config_errors_name_the_keys(tmp_path):
    from dime_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(["experiment=demo", f"work_dir={tmp_path}",
                     "ensemble.teachers=[{arch:'local-dir:/b',pretrained:null,scale:-1,source:cache,shard:zero3}]",
                     "ensemble.weights=[1]", "match.teacher=2", "ensemble.cid_teacher=5"])
    text = str(err.value)
    for part in ("ensemble.teachers[0].scale=-1.0 must be > 0", "ensemble.weights=[1.0] gives 1 weight(s) for 2",
                 "match.teacher=2", "ensemble.cid_teacher=5", "ensemble.teachers[0].shard=zero3 contradicts"):
        assert part in text, part
    with pytest.raises(ConfigError, match="scal"):
        load_config(["experiment=demo", "ensemble.teachers=[{arch:x,scal:60}]"])


def test_combined_rows_score_the_weighted_mean_cosine(tmp_path):
    from dime_ds.data.embeddings import EmbeddingCache, EmbeddingCacheError, EmbeddingShardWriter
    from dime_ds.match.ensemble import CombinedCache

    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(10)]

    def cache(name, dim, order=keys):
        with EmbeddingShardWriter(tmp_path / name, modality="images", model=name) as w:
            w.write_shard("shard-000000", order, rng.standard_normal((10, dim)).astype(np.float32), "src", "0" * 64)
        return EmbeddingCache(tmp_path / name)

    a, b = cache("a", 8), cache("b", 5)
    both = CombinedCache([a, b], [0.3, 0.7])
    rows = both.rows(0, 10)
    assert rows.shape == (10, 13) and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)

    def cos(c):
        x = c.rows(0, 10).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    np.testing.assert_allclose(rows @ rows.T, 0.3 * cos(a) + 0.7 * cos(b), atol=1e-5)
    np.testing.assert_allclose(np.concatenate(both.shards), rows)
    with pytest.raises(EmbeddingCacheError, match="same samples"):
        CombinedCache([a, cache("c", 5, keys[::-1])], [0.5, 0.5])
