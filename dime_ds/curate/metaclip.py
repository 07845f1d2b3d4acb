"""MetaCLIP's curation of a text pool (Xu et al., "Demystifying CLIP Data", ICLR 2024), as pure
functions: substring matching against a metadata list, and balancing.

Matching is MetaCLIP's `substr_matching` (metaclip/metaclip1/substr_matching.py): the text is padded
with a space on each side, its punctuation , . ; : ? ! ` spaced out and \\t \\n \\r made spaces; an
entry matches when " " + entry + " " occurs in that text. Case-sensitive. `match` finds every
occurrence at once with an Aho-Corasick automaton (pyahocorasick); `match_reference` is the plain
substring rule it is tested against.

Balancing: with c_e the number of pool texts matching entry e and threshold t, a text is kept with
probability 1 - prod_e (1 - min(1, t / c_e)) over its matched entries (MetaCLIP draws once per
matched entry and keeps the text if any draw succeeds: the same probability). Here the draw is one
uniform per text from a hash of (seed, sentence key), so the decision depends only on (seed, key,
matched entries) given the pool's counts and t: any rank split, rerun or resume keeps the same
texts, and a larger t keeps a superset."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")  # spaced out, as MetaCLIP does
WHITESPACE = ("\t", "\n", "\r")  # made spaces
# Expected sizes are summed as integers in units of 2**-FIXED_BITS texts: integer sums do not depend
# on the order of addition, so every rank split computes the same expected size (and the same t).
FIXED_BITS = 30


def spacing(text: str) -> str:
    """MetaCLIP's normalisation of a text before matching."""
    spaced = f" {text} "
    for p in PUNCTUATION:
        spaced = spaced.replace(p, f" {p} ")
    for c in WHITESPACE:
        spaced = spaced.replace(c, " ")
    return spaced


def match_reference(texts: Sequence[str], entries: Sequence[str]) -> list[list[int]]:
    """The plain substring rule (the test oracle of `match`): O(len(texts) x len(entries))."""
    padded = [f" {e} " for e in entries]
    return [[i for i, e in enumerate(padded) if e in s] for s in map(spacing, texts)]


class Matcher:
    """An Aho-Corasick automaton over the space-padded entries; built once, used for many texts.
    Entries that are equal after padding (duplicates) share one pattern and all match together."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        ids: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            ids.setdefault(f" {entry} ", []).append(i)
        self.n_entries = len(entries)
        self._automaton = ahocorasick.Automaton(ahocorasick.STORE_ANY, ahocorasick.KEY_STRING)
        for pattern, indices in ids.items():
            self._automaton.add_word(pattern, tuple(indices))
        self._empty = not ids
        if not self._empty:
            self._automaton.make_automaton()

    def __call__(self, text: str) -> list[int]:
        """Sorted indices of the entries `text` matches."""
        if self._empty:
            return []
        found: set[int] = set()
        for _, indices in self._automaton.iter(spacing(text)):  # every occurrence, overlapping ones too
            found.update(indices)
        return sorted(found)


def match(texts: Sequence[str], entries: Sequence[str]) -> list[list[int]]:
    """For each text, the sorted indices of the entries it matches (MetaCLIP's rule, see the module
    docstring); equal to `match_reference`."""
    matcher = Matcher(entries)
    return [matcher(t) for t in texts]


def to_csr(matched: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1], entries int32): text i matches entries[offsets[i]:offsets[i+1]]."""
    lengths = np.fromiter((len(m) for m in matched), np.int64, len(matched))
    offsets = np.zeros(len(matched) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((e for m in matched for e in m), np.int32, int(offsets[-1]))
    return offsets, flat


def _as_csr(matched) -> tuple[np.ndarray, np.ndarray]:
    return matched if isinstance(matched, tuple) else to_csr(matched)


def entry_counts(matched, n_entries: int) -> np.ndarray:
    """int64 [n_entries]: how many texts match each entry (`matched` as lists or CSR)."""
    _, flat = _as_csr(matched)
    return np.bincount(flat, minlength=n_entries).astype(np.int64)


def keep_probability(matched, counts, t: float) -> np.ndarray:
    """float64 per text: 1 - prod over its matched entries e of (1 - min(1, t / counts[e])); 0 for a
    text matching nothing. `matched`: lists of entry indices, or CSR (offsets, entries). The product
    is taken in the order of each text's entries, elementwise, so a text's value never depends on
    the other texts in the call."""
    offsets, flat = _as_csr(matched)
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        drop = 1.0 - np.minimum(1.0, float(t) / counts)  # per entry; a count of 0 never occurs in `matched`
    lengths = np.diff(offsets)
    survive = np.ones(len(lengths), np.float64)
    for j in range(int(lengths.max(initial=0))):
        rows = np.flatnonzero(lengths > j)
        survive[rows] *= drop[flat[offsets[rows] + j]]
    prob = 1.0 - survive
    prob[lengths == 0] = 0.0
    return prob


def expected_size_fixed(prob: np.ndarray) -> int:
    """sum(prob) in units of 2**-FIXED_BITS, as an exact integer (see FIXED_BITS)."""
    return int(np.rint(np.asarray(prob, np.float64) * (1 << FIXED_BITS)).astype(np.int64).sum())


def from_fixed(value: int) -> float:
    return value / float(1 << FIXED_BITS)


def key_uniforms(keys: Sequence[str], seed: int) -> np.ndarray:
    """float64 in [0, 1) per key: the first 53 bits of blake2b(seed, key). Independent of the
    process, platform and of the other keys."""
    out = np.empty(len(keys), np.float64)
    salt = f"{int(seed)}\x00".encode()
    for i, key in enumerate(keys):
        h = hashlib.blake2b(salt + key.encode("utf-8"), digest_size=8).digest()
        out[i] = (int.from_bytes(h, "little") >> 11) / float(1 << 53)
    return out


def keep_mask(keys: Sequence[str], matched, counts, t: float, seed: int) -> np.ndarray:
    """bool per text: kept by balancing (a text matching nothing is never kept)."""
    return key_uniforms(keys, seed) < keep_probability(matched, counts, t)


def t_to_p(counts: np.ndarray, t: float) -> float:
    """The tail share p(t): the share of all matches that fall on entries counted fewer than t times
    (MetaCLIP's metaclip/curation/curate.py t_to_p)."""
    counts = np.asarray(counts)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def p_to_t(counts: np.ndarray, p: float) -> float:
    """The threshold whose tail share is closest to p: MetaCLIP's p_to_t (sorted counts, cumulative
    share, the count where it is nearest p). Carries t from one pool to another of a different size."""
    counts = np.sort(np.asarray(counts, np.int64))
    total = counts.sum()
    if total == 0:
        return 1.0
    share = np.cumsum(counts) / total
    return float(max(counts[int(np.abs(share - p).argmin())], 1))


def solve_t(expected_fixed, target: float, upper: float, iterations: int = 60) -> float:
    """The smallest t (to bisection precision) whose expected kept size reaches `target` texts.
    `expected_fixed(t)` returns the expected size as a FIXED_BITS integer (summed over ranks); it is
    non-decreasing in t (min(1, t/c) grows with t). `upper`: a t at which every matched text is kept
    (the largest count). The same integers give the same t on every rank and rank split."""
    goal = int(round(float(target) * (1 << FIXED_BITS)))
    lo, hi = 0.0, float(upper)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if expected_fixed(mid) >= goal:
            hi = mid
        else:
            lo = mid
    return hi
