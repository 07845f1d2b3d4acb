"""DIME-FM's Algorithm 1: a visually grounded text corpus, about one sentence per image.

Semantics (exact; `greedy_ground_reference` is the plain transcription, `ground` the fast one):
- Similarity is cosine: both sides get the canonical preparation of search.prepare (float64,
  optional linear map `text_map` [d_img, d_txt] applied to the text embeddings, t -> M t, L2
  normalisation, float32); the score of a pair is the inner product of the prepared rows,
  accumulated in float64.
- Each round every remaining image takes its most similar *available* sentence. Tie rule: among
  sentences of equal score the lowest sentence index wins (numpy's argmax takes the first maximum).
- Then, in ascending image order, an image keeps its sentence only if no earlier image took it in
  this round. Matched images and sentences leave their pools.
- Rounds continue while a round removes more than (1 - stop_ratio) of the images that remained
  before it: after a round that matched m of n images, the next round runs iff
  m > (1 - stop_ratio) * n (float64). So stop_ratio=0 runs exactly one round, stop_ratio=1 runs
  until no image or no sentence is left (or a round matches nothing).

Fast path (`ground`). One faiss search gives each image its top-k sentences (float32 scores);
the lists are reused across rounds. An image's list decides its choice only when that is certain:
its best *available* candidate scores more than `margin` above the list's k-th score (every
sentence outside the list scores at most that), `margin` bounding twice the float32 error of the
faiss score. Candidates within `margin` of the best are re-scored in float64 and the tie rule
applied, so the choice is the reference's choice. An image whose list has no available candidate,
or is not certain, is re-queried by an exact search among the available sentences only (k doubled
while still uncertain, up to all available sentences); its stored list is replaced. Hence the
assignment is identical to the reference's (for scores that differ at all in float64). With
`index="ivf"` the lists come from an approximate IVF index and the result is approximate.

Texts larger than `block_size` rows are searched in blocks with a running top-k (search.merge_topk);
a multi-node run passes its merged per-node partial top-k lists as `candidates` (see search.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from dime_ds.knn.search import IVFSearcher, Rows, Searcher, gpu_count, merge_topk, prepare

log = logging.getLogger(__name__)

_U32 = 2.0 ** -24  # float32 unit roundoff


def keeps_going(matched: int, before: int, stop_ratio: float) -> bool:
    """The stop rule, shared by every implementation: run another round iff this one matched more
    than (1 - stop_ratio) of the images that remained before it."""
    return matched > (1.0 - float(stop_ratio)) * before


@dataclass
class GroundingResult:
    assignment: np.ndarray  # int64 [n_images]: sentence index, or -1 for an image left unmatched
    rounds: int  # rounds run
    per_round: list[int] = field(default_factory=list)  # images (= sentences) matched in each round
    remaining_before: list[int] = field(default_factory=list)  # images left before each round
    similarities: np.ndarray | None = None  # float32 [n_images]: cosine of the kept pair, nan if none
    requeried: int = 0  # image re-queries (candidate list exhausted or uncertain)
    exact: bool = True  # False for index="ivf"
    seconds: float = 0.0

    @property
    def images_matched(self) -> int:
        return int((self.assignment >= 0).sum())

    @property
    def sentences_kept(self) -> int:  # one sentence per matched image, never twice
        return self.images_matched


def _check(stop_ratio: float, n_img_dim: int, texts: Rows) -> None:
    if not 0.0 <= stop_ratio <= 1.0:
        raise ValueError(f"stop_ratio must lie in [0, 1], got {stop_ratio}")
    if texts.dim != n_img_dim:
        raise ValueError(f"image embeddings are {n_img_dim}-d, texts {texts.dim}-d"
                         + ("" if texts.text_map is not None else ": pass a text_map [d_img, d_txt]"))


def greedy_ground_reference(img_emb, txt_emb, stop_ratio: float = 0.95, text_map=None,
                            block_rows: int | None = None, return_rounds: bool = False):
    """Plain transcription of Algorithm 1: per round, a dense float64 similarity matrix of the
    remaining images (in row blocks of `block_rows`, default: ~256 MiB a block) against all
    sentences, taken ones masked, argmax. Returns the assignment (and the per-round match counts
    when `return_rounds`)."""
    img = prepare(img_emb).astype(np.float64)
    txt = prepare(txt_emb, text_map).astype(np.float64)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image embeddings are {img.shape[1]}-d, texts {txt.shape[1]}-d")
    if not 0.0 <= stop_ratio <= 1.0:
        raise ValueError(f"stop_ratio must lie in [0, 1], got {stop_ratio}")
    block_rows = block_rows or max(1, (1 << 28) // (8 * max(len(txt), 1)))
    per_round: list[int] = []
    assignment = np.full(len(img), -1, dtype=np.int64)
    remaining = np.arange(len(img))
    available = np.ones(len(txt), dtype=bool)
    while len(remaining) and available.any():
        choice = np.empty(len(remaining), dtype=np.int64)
        for start in range(0, len(remaining), block_rows):
            sims = img[remaining[start:start + block_rows]] @ txt.T
            sims[:, ~available] = -np.inf
            choice[start:start + block_rows] = sims.argmax(axis=1)  # first maximum: lowest index
        taken_now: set[int] = set()
        for image, sentence in zip(remaining.tolist(), choice.tolist()):
            if sentence not in taken_now:
                taken_now.add(sentence)
                assignment[image] = sentence
        available[list(taken_now)] = False
        before = len(remaining)
        remaining = remaining[assignment[remaining] < 0]
        per_round.append(len(taken_now))
        if not keeps_going(len(taken_now), before, stop_ratio):
            break
    return (assignment, per_round) if return_rounds else assignment


class _Grounder:
    def __init__(self, images: Rows, texts: Rows, searcher, topk: int, margin: float, progress: bool):
        self.images, self.texts, self.searcher = images, texts, searcher
        self.topk, self.margin, self.progress = topk, margin, progress
        self.exact = searcher.exact
        self.requeried = 0

    def _resolve(self, image_ids, ids, scores, thr, taken):
        """Each row's best available candidate, and whether the list makes it certain."""
        m = len(image_ids)
        if ids.shape[1] == 0:
            return np.full(m, -1, np.int64), np.zeros(m, bool)
        valid = ids >= 0
        avail = valid.copy()
        avail[valid] = ~taken[ids[valid]]
        has = avail.any(axis=1)
        rows = np.arange(m)
        first = avail.argmax(axis=1)
        top = np.where(has, scores[rows, first], -np.inf)
        sure = has & (top > thr + self.margin) if self.exact else has
        best = np.where(sure, ids[rows, first], -1)
        window = avail & sure[:, None] & (scores >= (top - self.margin)[:, None])
        tied = np.flatnonzero(window.sum(axis=1) > 1)
        if len(tied):
            best[tied] = self._rescore(image_ids[tied], ids[tied], window[tied])
        return best, sure

    def _rescore(self, image_ids, ids, window):
        """Float64 canonical scores of the near-tied candidates; max, ties to the lowest index."""
        r, c = np.nonzero(window)
        cand = ids[r, c]
        img = self.images.take(image_ids[r]).astype(np.float64)
        txt = self.texts.take(cand).astype(np.float64)
        score = np.einsum("ij,ij->i", img, txt)
        order = np.lexsort((cand, -score, r))
        first = np.ones(len(order), bool)
        first[1:] = r[order][1:] != r[order][:-1]
        out = np.empty(len(image_ids), np.int64)
        out[r[order][first]] = cand[order][first]
        return out

    def _threshold(self, scores, k_used, n_avail):
        """The score every sentence outside a list is known not to exceed (-inf: list is complete)."""
        if not self.exact or k_used >= n_avail or k_used == 0:
            return np.full(len(scores), -np.inf, np.float32)
        return scores[:, k_used - 1].copy()

    def requery(self, image_ids, taken, n_avail, cand_ids, cand_s, cand_thr):
        """Exact search among available sentences for images whose lists ran out or are uncertain;
        stores the new lists and returns each image's choice (-1 if nothing is available)."""
        self.requeried += len(image_ids)
        width = cand_ids.shape[1]
        out = np.full(len(image_ids), -1, np.int64)
        todo = np.arange(len(image_ids))
        k, first = self.topk, True
        available = ~taken
        while len(todo) and n_avail:
            kq = min(k, n_avail)
            scores, ids = self.searcher.search(self.images, image_ids[todo], kq, available=available)
            if first:  # replace the stored lists (their first `width` entries)
                w = min(width, kq)
                rows = image_ids[todo]
                cand_ids[rows] = -1
                cand_s[rows] = -np.inf
                cand_ids[rows, :w], cand_s[rows, :w] = ids[:, :w], scores[:, :w]
                cand_thr[rows] = self._threshold(scores, w, n_avail)
            best, sure = self._resolve(image_ids[todo], ids, scores, self._threshold(scores, kq, n_avail), taken)
            out[todo[sure]] = best[sure]
            todo = todo[~sure]
            if not self.exact or kq >= n_avail:
                break
            k, first = k * 2, False
        return out


def ground(img_emb, txt_emb, *, stop_ratio: float = 0.95, text_map=None, topk: int = 16,
           block_size: int | None = None, index: str = "flat", nlist: int = 4096, nprobe: int = 32,
           margin: float | None = None, use_gpu: bool | None = None, candidates=None,
           query_batch: int = 65536, progress: bool = False) -> GroundingResult:
    """Algorithm 1 on faiss. `img_emb` [n_img, d] and `txt_emb` [n_txt, d_txt]: arrays, memory maps
    or lists of them (cache shards), raw or normalised. `text_map` [d, d_txt] maps texts before
    matching. `topk`: candidate list length. `block_size`: text rows searched at once (None: all).
    `index`: "flat" (exact, identical to greedy_ground_reference) or "ivf" (approximate; `nlist`,
    `nprobe`). `margin`: float32-vs-float64 score slack (default 8*d*2**-24 on CPU, 2**-9 on GPU,
    enough for TF32). `use_gpu`: None = when faiss sees GPUs. `candidates`: precomputed
    (scores, ids) [n_img, k] lists, e.g. merged per-node partial top-k (see search.py)."""
    start = time.perf_counter()
    images, texts = Rows(img_emb), Rows(txt_emb, text_map)
    _check(stop_ratio, images.dim, texts)
    if index not in ("flat", "ivf"):
        raise ValueError(f"index must be flat or ivf, not {index!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    n_img, n_txt = len(images), len(texts)
    assignment = np.full(n_img, -1, dtype=np.int64)
    result = GroundingResult(assignment=assignment, rounds=0, exact=index == "flat")
    if n_img == 0 or n_txt == 0:
        result.similarities = np.full(n_img, np.nan, np.float32)
        return result
    ngpu = gpu_count(use_gpu)
    if margin is None:
        margin = 2.0 ** -9 if ngpu else 8 * images.dim * _U32
    if index == "flat":
        searcher = Searcher(texts, block_size=block_size, ngpu=ngpu, query_batch=query_batch, progress=progress)
    else:
        searcher = IVFSearcher(texts, nlist=nlist, nprobe=nprobe, block_size=block_size, ngpu=ngpu,
                               query_batch=query_batch, progress=progress)
    g = _Grounder(images, texts, searcher, topk, margin, progress)

    k0 = min(topk, n_txt)
    if candidates is not None:
        cand_s, cand_ids = (np.asarray(a) for a in candidates)
        if cand_ids.ndim != 2 or cand_ids.shape[0] != n_img or cand_s.shape != cand_ids.shape:
            raise ValueError(f"candidates must be (scores, ids) of shape [{n_img}, k], got "
                             f"{cand_s.shape} and {cand_ids.shape}")
        if cand_ids.max(initial=-1) >= n_txt:
            raise ValueError(f"candidate ids reach {cand_ids.max()}, but there are {n_txt} sentences")
        cand_s, cand_ids = merge_topk([(cand_s, cand_ids)])  # canonical order, empty slots cleaned
        cand_thr = g._threshold(cand_s, cand_ids.shape[1], n_txt)
    else:
        cand_s, cand_ids = searcher.search(images, np.arange(n_img), k0, desc="top-k search")
        cand_thr = g._threshold(cand_s, k0, n_txt)

    taken = np.zeros(n_txt, dtype=bool)
    n_avail = n_txt
    remaining = np.arange(n_img)
    bar = tqdm(desc="algorithm 1 rounds", unit="round", disable=not progress)
    while len(remaining) and n_avail:
        before = len(remaining)
        best, sure = g._resolve(remaining, cand_ids[remaining], cand_s[remaining], cand_thr[remaining], taken)
        unsure = np.flatnonzero(~sure)
        if len(unsure):
            best[unsure] = g.requery(remaining[unsure], taken, n_avail, cand_ids, cand_s, cand_thr)
        chosen = np.flatnonzero(best >= 0)  # ascending image order
        sentences, first = np.unique(best[chosen], return_index=True)  # first taker keeps it
        winners = remaining[chosen[first]]
        assignment[winners] = sentences
        taken[sentences] = True
        n_avail -= len(sentences)
        remaining = remaining[assignment[remaining] < 0]
        result.rounds += 1
        result.per_round.append(len(sentences))
        result.remaining_before.append(before)
        bar.update()
        bar.set_postfix(matched=len(sentences), left=len(remaining), requeried=g.requeried)
        log.info("algorithm 1 round %d: %d of %d images matched (%d re-queried so far)", result.rounds,
                 len(sentences), before, g.requeried)
        if not keeps_going(len(sentences), before, stop_ratio):
            break
    bar.close()
    result.requeried = g.requeried
    result.similarities = pair_similarities(images, texts, assignment)
    result.seconds = time.perf_counter() - start
    return result


def pair_similarities(images: Rows, texts: Rows, assignment: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Cosine similarity of each image with its assigned sentence (nan where unassigned)."""
    out = np.full(len(assignment), np.nan, np.float32)
    matched = np.flatnonzero(assignment >= 0)
    for s in range(0, len(matched), chunk):
        rows = matched[s:s + chunk]
        a = images.take(rows).astype(np.float64)
        b = texts.take(assignment[rows]).astype(np.float64)
        out[rows] = np.einsum("ij,ij->i", a, b)
    return out


def greedy_ground(img_emb, txt_emb, *, stop_ratio: float = 0.95, text_map=None, topk: int = 16,
                  block_size: int | None = None, index: str = "flat", **kwargs) -> np.ndarray:
    """Algorithm 1: int64 [n_images], the index of each image's sentence or -1. See `ground`."""
    return ground(img_emb, txt_emb, stop_ratio=stop_ratio, text_map=text_map, topk=topk,
                  block_size=block_size, index=index, **kwargs).assignment
