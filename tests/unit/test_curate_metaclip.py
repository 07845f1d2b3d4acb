"""MetaCLIP's matching and balancing (dime_ds.curate.metaclip): the Aho-Corasick matcher equals the
plain substring rule; balancing caps head entries near t and keeps every tail text; the expected
size formula matches the realised size; t solved for a target size."""
from __future__ import annotations

import random

import numpy as np
import pytest

from dime_ds.curate.metaclip import (expected_size_fixed, from_fixed, keep_mask, keep_probability, key_uniforms,
                                     match, match_reference, p_to_t, solve_t, spacing, t_to_p, to_csr)

WORDS = ["dog", "Dog", "dogs", "hot", "hot dog", "a", "an", "red", "red dog", "og", "do", "cat", "New York",
         "York", "new york", "big red dog", "é", "naïve", "C++", "x.y"]
PUNCT = [",", ".", ";", ":", "?", "!", "`", "\t", "\n", "\r", "-", "'", "(", ")", "  "]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        parts.append(rng.choice(WORDS + ["x", "the", "DOG", "dogdog"]))
        parts.append(rng.choice([" ", " ", " "] + PUNCT))
    return "".join(parts)


def test_spacing_is_metaclips():
    assert spacing("A dog, a cat.") == " A dog ,  a cat .  "
    assert spacing("tab\tnew\nline") == " tab new line "
    assert spacing("a`b;c:d?e!f") == " a ` b ; c : d ? e ! f "  # the shared rule: the oracle uses it too


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_the_substring_rule_on_random_texts(seed):
    rng = random.Random(seed)
    # entries: words, multi-word phrases, substrings of each other, punctuation, repeats, case variants
    entries = rng.sample(WORDS, 14) + [rng.choice(WORDS) for _ in range(3)] + [".", "dog ,", "x . y"]
    rng.shuffle(entries)
    texts = [_random_text(rng) for _ in range(400)]
    got, want = match(texts, entries), match_reference(texts, entries)
    assert got == want
    assert sum(map(len, got)) > 200  # the texts do match: the comparison is not vacuous
    assert any(len(m) >= 3 for m in got)


def test_matching_is_case_sensitive_and_whole_word():
    entries = ["dog", "Dog", "hot dog", "og"]
    assert match(["Dog days", "hotdog", "a hot dog.", "dogs"], entries) == [[1], [], [0, 2], []]
    assert match(["anything"], []) == [[]]


def test_keep_probability_formula():
    counts = np.array([10, 4, 2, 0])
    matched = [[0], [1], [2], [0, 1], [], [0, 2]]
    p = keep_probability(matched, counts, t=4)
    expected = [0.4, 1.0, 1.0, 1 - 0.6 * 0.0, 0.0, 1.0]
    assert np.allclose(p, expected)
    assert np.allclose(keep_probability(matched, counts, t=1), [0.1, 0.25, 0.5, 1 - 0.9 * 0.75, 0.0, 1 - 0.9 * 0.5])
    assert np.array_equal(keep_probability(to_csr(matched), counts, 4), p)


def _head_tail_pool(rng: np.random.Generator):
    """Texts matching one entry each (head entries counted far above t), plus tail texts and texts
    matching a head and a tail entry."""
    head_counts = [20000, 8000, 3000]
    tail_counts = [40, 7, 1]
    matched = [[e] for e, c in enumerate(head_counts + tail_counts) for _ in range(c)]
    matched += [[0, 4]] * 5  # a tail entry rescues its texts
    order = rng.permutation(len(matched))
    return [matched[i] for i in order]


def test_balancing_caps_head_entries_near_t_and_keeps_every_tail_text():
    t = 500
    matched = _head_tail_pool(np.random.default_rng(0))
    counts = np.bincount([e for m in matched for e in m], minlength=6)
    keys = [f"s{i:06d}" for i in range(len(matched))]
    kept = keep_mask(keys, matched, counts, t, seed=1)
    kept_counts = np.bincount([e for m, k in zip(matched, kept) if k for e in m], minlength=6)
    # head entry e (texts matching e alone): kept ~ Binomial(c_e, t/c_e); tolerance 5 standard deviations
    for e in range(3):
        c = counts[e]
        sd = np.sqrt(t * (1 - t / c))
        single = kept_counts[e] - (5 if e == 0 else 0)  # entry 0's five texts with a tail entry are all kept
        assert abs(single - t) < 5 * sd, (e, kept_counts[e], t, sd)
    assert kept_counts[3:].tolist() == counts[3:].tolist()  # tail entries keep everything
    assert all(k for m, k in zip(matched, kept) if any(counts[e] < t for e in m))


def test_expected_size_matches_the_realised_size():
    matched = _head_tail_pool(np.random.default_rng(1))
    counts = np.bincount([e for m in matched for e in m], minlength=6)
    keys = [f"k{i}" for i in range(len(matched))]
    for t in (50, 500, 2500):
        p = keep_probability(matched, counts, t)
        expected = from_fixed(expected_size_fixed(p))
        assert abs(expected - p.sum()) < 1e-3
        sd = np.sqrt((p * (1 - p)).sum())
        realised = [int(keep_mask(keys, matched, counts, t, seed).sum()) for seed in range(3)]
        assert all(abs(r - expected) < 5 * sd for r in realised), (t, expected, sd, realised)


def test_keep_decisions_depend_on_seed_and_key_only():
    u = key_uniforms(["a", "b", "c"], 0)
    assert np.array_equal(u, key_uniforms(["c", "a", "b"], 0)[[1, 2, 0]])
    assert not np.array_equal(u, key_uniforms(["a", "b", "c"], 1))
    assert ((u >= 0) & (u < 1)).all()
    # a larger t keeps a superset
    matched = _head_tail_pool(np.random.default_rng(2))
    counts = np.bincount([e for m in matched for e in m], minlength=6)
    keys = [f"k{i}" for i in range(len(matched))]
    small, large = keep_mask(keys, matched, counts, 100, 0), keep_mask(keys, matched, counts, 400, 0)
    assert (large | ~small).all() and large.sum() > small.sum()


def test_solve_t_reaches_the_target_size():
    matched = _head_tail_pool(np.random.default_rng(3))
    counts = np.bincount([e for m in matched for e in m], minlength=6)
    size = lambda t: expected_size_fixed(keep_probability(matched, counts, t))  # noqa: E731
    for target in (1000, 2500.5, 9000):
        t = solve_t(size, target, counts.max())
        assert abs(from_fixed(size(t)) - target) < 0.01
    assert solve_t(size, len(matched), counts.max()) <= counts.max()


def test_tail_share_and_threshold_convert_as_metaclip_does():
    counts = np.array([1, 1, 2, 10, 100, 1000])
    assert t_to_p(counts, 20) == pytest.approx(14 / 1114)
    assert p_to_t(counts, 14 / 1114) == 10
    assert p_to_t(counts, 0.1) == 100
