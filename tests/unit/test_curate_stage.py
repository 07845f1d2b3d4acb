"""The curation stage end to end in one process (`python -m dime_ds.curate stage=metaclip`): the
curated corpus is the reference computed with the public functions; reruns and resumes give the
identical corpus; t from a target size or a tail share; clear errors; and with match.pool=curated the
embed and match stages ground the curated pool."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dime_ds.cli import run_entry
from dime_ds.curate.__main__ import main

HEAD = ["dog", "red dog", "cat"]
TAIL = ["zebra", "blue whale", "kiwi", "axolotl"]
ENTRIES = HEAD + TAIL + ["never seen"]


def write_pool(root: Path, shards=(70, 50, 80), seed: int = 0) -> tuple[Path, Path]:
    """A head-heavy sentence pool (txt + json) and its metadata file; one empty sentence (skipped)."""
    from dime_ds.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    weights = np.array([30, 10, 20, 2, 1, 1, 1], float)
    n = 0
    for s, count in enumerate(shards):
        with ShardWriter(root / "pool", prefix=f"pool{s}", maxcount=count) as w:
            for _ in range(count):
                r = rng.random()
                if r < 0.15:
                    text = "nothing to see here."
                elif r < 0.3:
                    a, b = rng.choice(len(ENTRIES) - 1, 2, p=weights / weights.sum())
                    text = f"A {ENTRIES[a]} and a {ENTRIES[b]}, together."
                else:
                    text = f"a photo of a {ENTRIES[rng.choice(len(ENTRIES) - 1, p=weights / weights.sum())]}!"
                w.write(f"s{n:05d}", {"txt": " " if n == 17 else text, "json": json.dumps({"n": n})})
                n += 1
    meta = root / "metadata.json"
    meta.write_text(json.dumps(ENTRIES + ["", "dog"]))  # an empty and a repeated entry: normalised
    return root / "pool", meta


def overrides(work: Path, pool: Path, meta: Path, *extra: str) -> list[str]:
    return ["experiment=demo", f"work_dir={work}", f"data.corpus={pool}", f"curate.metadata={meta}",
            "device=cpu", "log.progress=false", *extra]


def read_corpus(out: Path) -> dict[str, dict]:
    """key -> {ext: bytes} of every curated sample, and each shard's bytes under "__shards__"."""
    samples, shards = {}, {}
    for shard in sorted((out / "corpus").glob("*.tar")):
        shards[shard.name] = shard.read_bytes()
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {"samples": samples, "shards": shards}


def reference_keep(pool: Path, t: float, seed: int, entries: list[str] | None = None) -> set[str]:
    """The curated keys computed from the whole pool at once with the public functions (entries:
    the normalised metadata; default this module's ENTRIES)."""
    from dime_ds.curate.metaclip import entry_counts, keep_mask, match
    from dime_ds.data.pipelines import iter_tar_samples
    from dime_ds.data.shards import list_shards

    keys, texts = [], []
    for raw in iter_tar_samples(list_shards(pool)):
        text = raw["txt"].decode().strip()
        if text:
            keys.append(raw["__key__"])
            texts.append(text)
    entries = entries or [e for e in dict.fromkeys(ENTRIES) if e]
    matched = match(texts, entries)
    mask = keep_mask(keys, matched, entry_counts(matched, len(entries)), t, seed)
    return {k for k, kept in zip(keys, mask) if kept}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_pool(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def curated(tmp_path_factory, pool):
    work = tmp_path_factory.mktemp("curate_work")
    assert run_entry(main, overrides(work, *pool, "stage=metaclip", "curate.t=12", "curate.seed=5")) == 0
    return work


def test_the_curated_corpus_is_the_reference(curated, pool):
    out = curated / "curated"
    corpus = read_corpus(out)
    assert set(corpus["samples"]) == reference_keep(pool[0], 12, 5)
    report = json.loads((out / "report.json").read_text())
    assert report["sentences"] == 199 and report["skipped"] == 1
    assert report["sentences_kept"] == len(corpus["samples"]) < report["sentences_matched"] < 199
    assert report["metadata"]["entries"] == 8 and len(report["metadata"]["notes"]) == 2
    counts = np.load(out / "entry_counts.npy")
    kept = np.load(out / "entry_counts_kept.npy")
    assert counts[ENTRIES.index("dog")] > 12 >= counts[ENTRIES.index("kiwi")]
    assert (kept[counts < 12] == counts[counts < 12]).all()  # tail entries keep every sentence
    assert report["entries"]["head"] == int((counts >= 12).sum()) and counts[-1] == 0
    assert report["largest"][0]["entry"] == "dog"
    assert (out / "entry_counts.png").stat().st_size > 1000 and "| dog |" in (out / "report.md").read_text()
    sample = next(iter(corpus["samples"].values()))
    assert set(sample) == {"txt", "json"}  # every field of the pool's sample, as it was
    assert json.loads((out / "curate.json").read_text())["t"] == 12


def test_a_rerun_and_a_resume_give_the_identical_corpus(curated, pool, tmp_path):
    out = curated / "curated"
    first = read_corpus(out)
    args = overrides(curated, *pool, "curate.t=12", "curate.seed=5")
    assert run_entry(main, args) == 0
    assert read_corpus(out) == first
    assert json.loads((out / "report.json").read_text())["shards_matched_now"] == 0  # every shard reused
    # a run killed after matching one shard: its record and the corpus are gone
    (out / "matches/shard-000001.record.json").unlink()
    (out / "curate.json").unlink()
    for shard in (out / "corpus").glob("*.tar"):
        shard.unlink()
    assert run_entry(main, args) == 0
    assert read_corpus(out) == first
    assert json.loads((out / "report.json").read_text())["shards_matched_now"] == 1
    # another seed draws other sentences
    assert run_entry(main, overrides(tmp_path, *pool, "curate.t=12", "curate.seed=6")) == 0
    assert read_corpus(tmp_path / "curated")["samples"].keys() != first["samples"].keys()


def test_t_from_a_target_size_or_a_tail_share(pool, tmp_path):
    from dime_ds.curate.metaclip import p_to_t

    assert run_entry(main, overrides(tmp_path / "a", *pool, "curate.target_size=60")) == 0
    report = json.loads((tmp_path / "a/curated/report.json").read_text())
    assert abs(report["expected_kept"] - 60) < 0.01 and "target_size" in report["t_chosen"]
    assert set(read_corpus(tmp_path / "a/curated")["samples"]) == reference_keep(pool[0], report["t"], 0)
    assert run_entry(main, overrides(tmp_path / "b", *pool, "curate.tail_share=0.2")) == 0
    report = json.loads((tmp_path / "b/curated/report.json").read_text())
    assert report["t"] == p_to_t(np.load(tmp_path / "b/curated/entry_counts.npy"), 0.2)


@pytest.mark.parametrize("extra, message", [
    (["curate.t=5", "curate.target_size=10"], "curate.t and curate.target_size are all set"),
    (["curate.metadata=null", "curate.t=5"], "this stage needs: curate.metadata"),
    ([], "needs one of curate.t"),
    (["curate.target_size=100000"], r"exceeds the \d+ sentences that match"),
    (["curate.tail_share=1.5"], r"curate.tail_share=1.5 must lie in \(0, 1\]"),
])
def test_clear_errors(pool, tmp_path, capsys, extra, message):
    import re

    assert run_entry(main, overrides(tmp_path, *pool, *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_no_pool_is_a_message(pool, tmp_path, capsys):
    args = [f"work_dir={tmp_path}", f"curate.metadata={pool[1]}", "curate.t=5", "device=cpu"]  # data.texts: ???
    assert run_entry(main, args) == 2
    assert "no sentence pool: set data.corpus" in capsys.readouterr().err


def test_non_utf8_metadata_is_a_message(pool, tmp_path, capsys):
    bad = tmp_path / "meta.txt"
    bad.write_bytes(b"dog\n\xe9t\xe9\n")
    assert run_entry(main, overrides(tmp_path, pool[0], bad, "curate.t=5")) == 2
    assert "line 2) is not UTF-8" in capsys.readouterr().err


def test_embed_and_match_ground_the_curated_pool(tmp_path, tiny_world, tiny_teacher_dir, capsys):
    """curate -> embed -> match on the tiny world: the text cache holds the curated pool and the
    grounded corpus comes from it."""
    from dime_ds.data.embeddings import EmbeddingCache
    from dime_ds.demo.synthetic import COLOUR_NAMES, SHAPES
    from dime_ds.match.__main__ import main as match_main

    meta = tmp_path / "entries.txt"
    meta.write_text("\n".join([*SHAPES, *COLOUR_NAMES]) + "\n")
    base = ["experiment=demo", f"work_dir={tmp_path}", f"data.root={tiny_world}", "device=cpu", "log.progress=false",
            f"curate.metadata={meta}", "curate.t=3"]
    match_args = [*base, f"teacher.arch=local-dir:{tiny_teacher_dir}", "match.topk=4", "match.stop_ratio=1.0"]
    assert run_entry(match_main, [*match_args, "match.pool=curated", "stage=embed"]) == 2  # not curated yet
    assert "run `python -m dime_ds.curate stage=metaclip`" in capsys.readouterr().err
    assert run_entry(main, base) == 0
    curated = set(read_corpus(tmp_path / "curated")["samples"])
    report = json.loads((tmp_path / "curated/report.json").read_text())
    assert 0 < len(curated) == report["sentences_kept"] < report["sentences"]
    # the raw pool embedded, then matched as if curated: refused
    assert run_entry(match_main, [*match_args, "stage=embed"]) == 0
    assert run_entry(match_main, [*match_args, "match.pool=curated", "stage=match"]) == 2
    assert "not of the curated pool" in capsys.readouterr().err
    assert run_entry(match_main, [*match_args, "match.pool=curated", "stage=all"]) == 0
    assert set(EmbeddingCache(tmp_path / "embeddings/texts").keys()) == curated
    grounded = json.loads((tmp_path / "grounded/assignment.json").read_text())["assignment"]
    assert grounded and set(grounded.values()) <= curated


def test_the_grounded_corpus_curated_after_match(tmp_path, tiny_world, tiny_teacher_dir, capsys):
    """embed -> match -> curate (curate.input=grounded): the curated corpus is MetaCLIP's keep rule
    over the grounded corpus, every field of a kept sample as the match stage wrote it; the raw pool
    and the grounded corpus are untouched; each misuse is a message naming the fix."""
    from dime_ds.demo.synthetic import COLOUR_NAMES, SHAPES
    from dime_ds.match.__main__ import main as match_main

    meta = tmp_path / "entries.txt"
    meta.write_text("\n".join([*SHAPES, *COLOUR_NAMES]) + "\n")
    base = ["experiment=demo", f"work_dir={tmp_path}", f"data.root={tiny_world}", "device=cpu", "log.progress=false",
            f"curate.metadata={meta}", "curate.t=3", "curate.input=grounded"]
    assert run_entry(main, base) == 2  # nothing grounded yet
    assert "which the match stage has not written" in capsys.readouterr().err
    match_args = ["experiment=demo", f"work_dir={tmp_path}", f"data.root={tiny_world}", "device=cpu",
                  "log.progress=false", f"teacher.arch=local-dir:{tiny_teacher_dir}", "match.topk=4",
                  "match.stop_ratio=1.0"]
    assert run_entry(match_main, [*match_args, "stage=all"]) == 0
    grounded_dir = tmp_path / "grounded"
    grounded = read_corpus(grounded_dir)
    before = dict(grounded["shards"])

    assert run_entry(main, [*base, "match.pool=curated"]) == 2
    assert "data.texts=${curate.out_dir}/corpus" in capsys.readouterr().err
    assert run_entry(main, [*base, f"curate.out_dir={grounded_dir}"]) == 2
    assert "over its own input" in capsys.readouterr().err

    assert run_entry(main, base) == 0
    assert f"train on it: data.texts={tmp_path / 'curated/corpus'}" in capsys.readouterr().err
    curated = read_corpus(tmp_path / "curated")["samples"]
    report = json.loads((tmp_path / "curated/report.json").read_text())
    assert report["input"] == "grounded" and report["pool"] == str(grounded_dir / "corpus")
    assert report["sentences"] == len(grounded["samples"]) and 0 < len(curated) < len(grounded["samples"])
    assert {k: grounded["samples"][k] for k in curated} == curated  # txt and the grounding json, byte for byte
    assert set(curated) == reference_keep(grounded_dir / "corpus", 3, 0, [*SHAPES, *COLOUR_NAMES])
    assert read_corpus(grounded_dir)["shards"] == before

