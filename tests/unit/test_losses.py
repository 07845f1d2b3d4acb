"""DIME-FM and CLIP losses against a direct, loop-level transcription of the definitions."""
from __future__ import annotations

import math

import pytest
import torch

from dime_ds.config.schema import LossConfig
from dime_ds.losses.dime import dime_kwargs
from dime_ds.losses.functional import clip_loss, dime_losses

PAPER = dime_kwargs(LossConfig())  # the schema's defaults, their one owner


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _kl_rows(teacher, student, temperature):
    """mean over rows of sum_j p_t log(p_t / p_s), softmax at `temperature` on both sides."""
    total = 0.0
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        zt = [v / temperature for v in t_row]
        zs = [v / temperature for v in s_row]
        lt = [v - math.log(sum(math.exp(u) for u in zt)) for v in zt]
        ls = [v - math.log(sum(math.exp(u) for u in zs)) for v in zs]
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total / len(teacher)


def _reference(t_img, t_txt, s_img, s_txt, own_text, w=(0.7, 0.3, 0.0), temps=(1.0, 3.0, 7.0), scale=100.0):
    ti, tt, si, st = map(_unit, (t_img.double(), t_txt.double(), s_img.double(), s_txt.double()))
    vl = _kl_rows(scale * ti @ tt.T, scale * si @ st.T, temps[0]) \
        + _kl_rows(scale * tt @ ti.T, scale * st @ si.T, temps[0])
    pvl = 2 * _kl_rows(scale * ti @ ti.T, scale * si @ ti.T, temps[1])
    ud = 2 * _kl_rows(scale * ti @ ti.T, scale * si @ si.T, temps[2])
    if own_text:
        ud += 2 * _kl_rows(scale * tt @ tt.T, scale * st @ st.T, temps[2])
    return {"vl": vl, "pvl": pvl, "ud": ud, "total": w[0] * vl + w[1] * pvl + w[2] * ud}


@pytest.mark.parametrize("n_img, n_txt, dim, own_text", [(6, 6, 8, False), (5, 9, 4, True), (7, 3, 16, True)])
def test_dime_losses_match_the_formulas(n_img, n_txt, dim, own_text):
    g = torch.Generator().manual_seed(n_img * 100 + n_txt)
    t_img, t_txt = torch.randn(n_img, dim, generator=g), torch.randn(n_txt, dim, generator=g)
    s_img = t_img + 0.5 * torch.randn(n_img, dim, generator=g)
    s_txt = t_txt + 0.5 * torch.randn(n_txt, dim, generator=g) if own_text else t_txt
    weights, temps = (0.5, 0.2, 0.3), (1.5, 3.0, 7.0)
    got = dime_losses(t_img, t_txt, s_img, s_txt, w_vl=weights[0], w_pvl=weights[1], w_ud=weights[2],
                      t_vl=temps[0], t_pvl=temps[1], t_ud=temps[2], scale=100.0)
    want = _reference(t_img, t_txt, s_img, s_txt, own_text, weights, temps)
    for key in ("vl", "pvl", "ud", "total"):
        assert got[key].item() == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_student_equal_to_teacher_has_zero_loss():
    t_img, t_txt = torch.randn(5, 8), torch.randn(7, 8)
    # scale-invariant: cosine similarities
    out = dime_losses(t_img, t_txt, 3.0 * t_img, t_txt, **{**PAPER, "w_ud": 1.0})
    assert all(abs(out[k].item()) < 1e-5 for k in ("vl", "pvl", "ud", "total"))


def test_default_weights_are_the_published_ones():
    from dime_ds.config import load_config

    assert PAPER == dict(w_vl=0.7, w_pvl=0.3, w_ud=0.0, t_vl=1.0, t_pvl=3.0, t_ud=7.0, scale=100.0)
    assert dime_kwargs(load_config([]).loss) == PAPER  # no YAML restates (or changes) them
    t_img, t_txt, s_img = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    out = dime_losses(t_img, t_txt, s_img, t_txt, **PAPER)
    torch.testing.assert_close(out["total"], 0.7 * out["vl"] + 0.3 * out["pvl"])


def test_clip_loss_matches_cross_entropy_transcription():
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor([math.log(10.0)])
    logits = 10.0 * _unit(img) @ _unit(txt).T
    want = 0.0
    for m in (logits, logits.T):
        want += sum(-(m[i, i] - torch.logsumexp(m[i], 0)).item() for i in range(5)) / 5
    assert clip_loss(img, txt, scale).item() == pytest.approx(want / 2, rel=1e-5)


@pytest.mark.parametrize("own_text", [True, False])
def test_row_blocks_average_to_the_whole_batch(own_text):
    """What each rank computes (its rows against all columns) averages to the whole-batch loss."""
    from dime_ds.losses.functional import DimeFeatures, dime_losses_block

    g = torch.Generator().manual_seed(5)
    t_img, t_txt = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g)
    s_img = t_img + torch.randn(6, 8, generator=g)
    s_txt = t_txt + torch.randn(9, 8, generator=g) if own_text else t_txt
    cfg = {**PAPER, "w_vl": 0.5, "w_pvl": 0.2, "w_ud": 0.3}
    want = dime_losses(t_img, t_txt, s_img, s_txt, **cfg)
    cols = DimeFeatures.of(t_img, t_txt, s_img, s_txt)
    assert cols.own_text == own_text

    def block(k):  # 3 blocks of 2 images and 3 sentences
        img, txt = slice(2 * k, 2 * k + 2), slice(3 * k, 3 * k + 3)
        tt = cols.t_txt[txt]
        return DimeFeatures(cols.t_img[img], tt, cols.s_img[img], cols.s_txt[txt] if own_text else tt)

    blocks = [dime_losses_block(block(k), cols, **cfg) for k in range(3)]
    for key in ("vl", "pvl", "ud", "total"):
        assert sum(b[key] for b in blocks).item() / 3 == pytest.approx(want[key].item(), rel=1e-5), key


def test_teacher_text_tower_has_no_sentence_ud_term():
    g = torch.Generator().manual_seed(0)  # seeded: the float32 KL of two paths is compared at rel 1e-5
    t_img, t_txt, s_img = (torch.randn(n, 8, generator=g) for n in (5, 7, 5))
    frozen = dime_losses(t_img, t_txt, s_img, t_txt, **{**PAPER, "w_ud": 1.0})
    copy = dime_losses(t_img, t_txt, s_img, t_txt.clone(), **{**PAPER, "w_ud": 1.0})  # same values, "own" tower
    assert frozen["ud"].item() == pytest.approx(copy["ud"].item(), rel=1e-5, abs=1e-6)
    image_only = 2 * _kl_rows(100 * _unit(t_img.double()) @ _unit(t_img.double()).T,
                              100 * _unit(s_img.double()) @ _unit(s_img.double()).T, 7.0)
    assert frozen["ud"].item() == pytest.approx(image_only, rel=1e-4)


def test_distributed_losses_in_one_process_are_the_functional_ones():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dime_ds.losses import dime

    t_img, t_txt, s_img, s_txt = torch.randn(4, 8), torch.randn(6, 8), torch.randn(4, 8), torch.randn(6, 8)
    cfg = dict(w_vl=0.4, w_pvl=0.1, w_ud=0.5, t_vl=2.0, t_pvl=4.0, t_ud=5.0, scale=50.0)
    want = dime_losses(t_img, t_txt, s_img, s_txt, **cfg)
    for loss_cfg in (SimpleNamespace(**cfg), LossConfig(**cfg), OmegaConf.merge(OmegaConf.structured(LossConfig), cfg)):
        got = dime.dime_loss(t_img, t_txt, s_img, s_txt, loss_cfg)
        assert dime.reduce_for_logging(got) == pytest.approx({k: v.item() for k, v in want.items()})
    defaults = dime.dime_loss(t_img, t_txt, s_img, t_txt, OmegaConf.structured(LossConfig))
    torch.testing.assert_close(defaults["total"], dime_losses(t_img, t_txt, s_img, t_txt, **PAPER)["total"])
    scale = torch.tensor(2.0)
    torch.testing.assert_close(dime.clip_loss(s_img, t_img, scale), clip_loss(s_img, t_img, scale))
