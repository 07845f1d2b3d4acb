"""Algorithm 1: the fast faiss/block paths against the plain transcription, merge of partial top-k."""
from __future__ import annotations

import numpy as np
import pytest

from dime_ds.match.algorithm1 import ground, greedy_ground, greedy_ground_reference, keeps_going
from dime_ds.knn.search import merge_topk, partial_topk, prepare

SHAPES = [(40, 70, 8), (90, 30, 16), (50, 50, 32), (30, 120, 64)]  # more texts, more images, equal


def _data(n_img, n_txt, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_img, d)).astype(np.float32),
            rng.standard_normal((n_txt, d)).astype(np.float32))


def _is_matching(assignment, n_txt):
    kept = assignment[assignment >= 0]
    return len(np.unique(kept)) == len(kept) and (kept < n_txt).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stop_ratio", [0.95, 1.0])
def test_fast_paths_equal_reference(shape, stop_ratio):
    img, txt = _data(*shape, seed=sum(shape))
    ref = greedy_ground_reference(img, txt, stop_ratio)
    assert _is_matching(ref, shape[1])
    faiss_path = ground(img, txt, stop_ratio=stop_ratio, topk=16)
    assert np.array_equal(faiss_path.assignment, ref)
    # small lists: candidates run out and images are re-queried; blocks smaller than k
    blocked = ground(img, txt, stop_ratio=stop_ratio, topk=2, block_size=7)
    assert blocked.requeried > 0
    assert np.array_equal(blocked.assignment, ref)
    assert np.array_equal(greedy_ground(img, txt, stop_ratio=stop_ratio, topk=1, block_size=11), ref)
    assert faiss_path.rounds == blocked.rounds and faiss_path.per_round == blocked.per_round
    assert sum(faiss_path.per_round) == faiss_path.images_matched == (ref >= 0).sum()


def test_one_round_stop():
    img, txt = _data(60, 60, 16, seed=1)
    ref = greedy_ground_reference(img, txt, 0.0)
    result = ground(img, txt, stop_ratio=0.0, topk=3, block_size=16)
    assert result.rounds == 1 and np.array_equal(result.assignment, ref)
    # every image took its overall best sentence; the first taker of each kept it
    sims = prepare(img).astype(np.float64) @ prepare(txt).astype(np.float64).T
    best = sims.argmax(1)
    for image, sentence in enumerate(best):
        first = np.flatnonzero(best == sentence)[0]
        assert ref[image] == (sentence if first == image else -1)
    # at the default stop_ratio: images that all want one sentence stop the algorithm after round 1
    crowd = (img[:1] + 1e-3 * img[1:41]).astype(np.float32)
    crowded = ground(crowd, txt, topk=2, block_size=16)
    assert crowded.rounds == 1 and crowded.per_round == [1]
    assert np.array_equal(crowded.assignment, greedy_ground_reference(crowd, txt, 0.95))


def test_stop_rule_and_rounds():
    assert keeps_going(6, 100, 0.95) and not keeps_going(5, 100, 0.95)
    # a crowd of 50 near-identical images all want the same sentence each round (one of them gets
    # it); 30 diverse images are matched in the first rounds; then a round matches 1 of ~50: stop
    rng = np.random.default_rng(2)
    hub = rng.standard_normal(8)
    crowd = hub + 0.01 * rng.standard_normal((50, 8))
    img = np.concatenate([rng.standard_normal((30, 8)), crowd]).astype(np.float32)
    txt = rng.standard_normal((200, 8)).astype(np.float32)
    result = ground(img, txt, stop_ratio=0.95, topk=4)
    ref, ref_rounds = greedy_ground_reference(img, txt, 0.95, return_rounds=True)
    assert np.array_equal(result.assignment, ref) and result.per_round == ref_rounds
    assert result.rounds >= 2 and result.images_matched < 80
    steps = list(zip(result.remaining_before, result.per_round))
    assert all(keeps_going(m, b, 0.95) for b, m in steps[:-1]) and not keeps_going(*steps[-1][::-1], 0.95)
    assert result.remaining_before[1:] == [b - m for b, m in steps[:-1]]


def test_text_map():
    rng = np.random.default_rng(3)
    img = rng.standard_normal((40, 8)).astype(np.float32)
    txt = rng.standard_normal((60, 12)).astype(np.float32)
    text_map = rng.standard_normal((8, 12)).astype(np.float32)
    ref = greedy_ground_reference(img, txt, 0.95, text_map=text_map)
    assert np.array_equal(ground(img, txt, text_map=text_map, topk=2, block_size=9).assignment, ref)
    identity = greedy_ground_reference(img, txt[:, :8], 0.95, text_map=np.eye(8))
    assert np.array_equal(identity, greedy_ground_reference(img, txt[:, :8], 0.95))
    with pytest.raises(ValueError, match="text_map"):
        ground(img, txt)


def test_ties_go_to_lowest_sentence_index():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((15, 8)).astype(np.float32)
    txt = np.concatenate([base, base, 4 * base])  # exact duplicates (4x scales exactly: same after L2)
    img = rng.standard_normal((40, 8)).astype(np.float32)
    one_round = greedy_ground_reference(img, txt, 0.0)
    assert one_round[one_round >= 0].max() < 15
    ref = greedy_ground_reference(img, txt, 1.0)
    for kw in ({"topk": 1}, {"topk": 2, "block_size": 4}, {"topk": 64}):
        assert np.array_equal(ground(img, txt, stop_ratio=1.0, **kw).assignment, ref)


def test_merge_of_partials_equals_full_search_and_feeds_ground():
    img, txt = _data(30, 100, 16, seed=5)
    k = 8
    full_s, full_i = partial_topk(img, txt, 0, k)
    cuts = [0, 5, 40, 41, 100]  # one block smaller than k, one of a single row
    parts = [partial_topk(img, txt[a:b], a, k) for a, b in zip(cuts, cuts[1:])]
    merged_s, merged_i = merge_topk(parts, k)
    assert np.array_equal(merged_i, full_i)
    np.testing.assert_allclose(merged_s, full_s, rtol=0, atol=1e-6)
    # "two nodes", each merging its own blocks first: merging is associative
    node_a, node_b = merge_topk(parts[:2], k), merge_topk(parts[2:], k)
    assert np.array_equal(merge_topk([node_b, node_a], k)[1], full_i)
    ref = greedy_ground_reference(img, txt, 0.95)
    assert np.array_equal(ground(img, txt, candidates=(merged_s, merged_i), topk=k).assignment, ref)


def test_partial_topk_with_available_mask():
    img, txt = _data(10, 30, 8, seed=6)
    available = np.arange(30) % 3 == 0
    s, i = partial_topk(img, txt, 100, 4, available=available)
    assert ((i - 100) % 3 == 0).all() and (i >= 100).all()
    sims = prepare(img) @ prepare(txt)[available].T
    np.testing.assert_allclose(s[:, 0], sims.max(1), atol=1e-6)


def test_ivf_exhaustive_is_exact_and_approximate_is_a_matching():
    img, txt = _data(100, 800, 16, seed=7)
    ref = greedy_ground_reference(img, txt, 0.95)
    exhaustive = ground(img, txt, index="ivf", nlist=8, nprobe=8, topk=4)
    assert not exhaustive.exact and np.array_equal(exhaustive.assignment, ref)
    approx = ground(img, txt, index="ivf", nlist=16, nprobe=1, topk=4)
    assert _is_matching(approx.assignment, 800) and approx.images_matched > 50


def test_result_and_edge_cases():
    img, txt = _data(20, 30, 8, seed=8)
    result = ground(img, txt, topk=4)
    matched = result.assignment >= 0
    sims = (prepare(img) * prepare(txt)[np.clip(result.assignment, 0, None)]).sum(1)
    np.testing.assert_allclose(result.similarities[matched], sims[matched], atol=1e-6)
    assert np.isnan(result.similarities[~matched]).all()
    assert result.sentences_kept == matched.sum()
    empty = ground(img, txt[:0], topk=4)
    assert (empty.assignment == -1).all() and empty.rounds == 0
    with pytest.raises(ValueError, match="stop_ratio"):
        ground(img, txt, stop_ratio=1.5)
    # fp16 cache shards as a list of parts
    parts = [txt[:13].astype(np.float16), txt[13:].astype(np.float16)]
    ref = greedy_ground_reference(img, txt.astype(np.float16), 0.95)
    assert np.array_equal(ground(img, parts, topk=3, block_size=10).assignment, ref)
