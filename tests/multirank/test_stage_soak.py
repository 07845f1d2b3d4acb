"""Soak (issue #26, item 6): the 2-rank embed stage and the 2-rank match stage are killed with SIGKILL
at random points, one rank or both, one to three times in a row, and run again with the same command
until one run completes; then every file the embed stage wrote (manifests, shards, keys, sidecars)
and every file the match stage wrote (corpus tar shards, assignment.npy/.json, report.json/.md,
similarity_hist.png) is byte-identical to an uninterrupted run's, and no file of a killed run is
left (no temporary, no second TensorBoard event file). Only timing.json (wall-clock seconds) and the
TensorBoard event file (wall times, host name) are not compared byte for byte: they must exist, one
of each.

A kill point is a step of a rank, in the order the rank takes them: each teacher batch encoded
(embed), the partial top-k and Algorithm 1 done (match), and every file or directory the stage
renames into place (atomic.PendingFile.commit, atomic.replace_dir), just before (the temporary cut to
half its size first: a rank that died in the middle of the write) and just after. The points are
drawn with a seeded RNG over the steps an uninterrupted run takes, so a failure is reproducible
(SOAK_SEED): a point is drawn uniformly over both ranks' steps (for the n-th embed rerun of a trial,
over the first 1/n of them: a rerun skips the finished shards), and in a third of the runs the other
rank gets one too (the first to die usually ends the other: its heartbeats stop). The figures
(kills, points, files and bytes compared) are printed: run with -s to see them; docs/pipeline.md
quotes them."""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY_WORLD
from tests.multirank.harness import RankError, run_ranks

pytestmark = pytest.mark.slow
SOAK_SEED = int(os.environ.get("SOAK_SEED", "26"))
TRIALS = 4  # per stage: each 1 to 3 killed runs, then the run that completes
BOTH = 1 / 3  # the share of killed runs in which both ranks have a kill point
NOT_COMPARED = ("timing.json",)  # wall-clock seconds; tensorboard/events.* is checked apart


@pytest.fixture(scope="module")
def soak_world(tmp_path_factory):
    """The tiny world in shards of 8 samples: 8 image and 12 text shards, many steps to kill at."""
    from dime_ds.config.demo_schema import SyntheticConfig
    from dime_ds.demo.synthetic import write_world

    out = tmp_path_factory.mktemp("soak_world")
    write_world(out, OmegaConf.structured(SyntheticConfig(**{**TINY_WORLD, "shard_size": 8})), progress=False)
    return out


def _overrides(work, world, teacher):
    return ["experiment=demo", f"work_dir={work}", f"data.root={world}", f"teacher.arch=local-dir:{teacher}",
            "device=cpu", "log.progress=false", "match.batch_size=8", "match.topk=4", "match.block_size=50",
            "match.shard_size=10", "match.stop_ratio=1.0", "dist.dead_rank_s=2"]


def _stage(rank, world_size, which, overrides, kill_at, kill_log):
    """Run stage `which` on this rank, SIGKILLed at its step kill_at[rank] if given; returns the labels
    of the steps it took. Before it dies a rank writes where to `kill_log`/rank{rank}.txt."""
    from dime_ds import atomic
    from dime_ds.config import load_config
    from dime_ds.embed import stage as embed_stage
    from dime_ds.match import algorithm1
    from dime_ds.match import stage as match_stage

    steps, target = [], kill_at.get(rank)

    def point(label, cut=None):
        if len(steps) == target:
            if cut is not None and cut.is_file():  # died in the middle of writing it
                os.truncate(cut, cut.stat().st_size // 2)
            Path(kill_log, f"rank{rank}.txt").write_text(f"{len(steps)}\t{label}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        steps.append(label)

    def after(fn, label):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            point(label)
            return out
        return wrapped

    commit, replace_dir = atomic.PendingFile.commit, atomic.replace_dir

    def committing(self):
        name = f"{self.path.parent.name}/{self.path.name}"
        point(f"writing {name}", self.tmp)
        out = commit(self)
        point(f"wrote {name}")
        return out

    def replacing_dir(staging, final, **kwargs):
        point(f"swapping in {Path(final).name}/")
        out = replace_dir(staging, final, **kwargs)
        point(f"swapped in {Path(final).name}/")
        return out

    atomic.PendingFile.commit, atomic.replace_dir = committing, replacing_dir  # a forked rank: never undone
    embed_stage._encode = after(embed_stage._encode, "encoded a batch")
    match_stage.rank_partial_topk = after(match_stage.rank_partial_topk, "partial top-k")
    algorithm1.ground = after(algorithm1.ground, "algorithm 1")
    cfg = load_config(overrides)
    (embed_stage.run_embed_stage if which == "embed" else match_stage.run_match_stage)(cfg)
    return steps


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}


def _kind(name: str) -> str:
    return name.split(".out.tfevents.")[0]


def _compare(got_dir: Path, want_dir: Path) -> tuple[int, int]:
    """Every file of `want_dir` in `got_dir` with the same bytes, and no other (the timing and event
    files: one each, not compared); returns (files, bytes) compared."""
    got, want = _files(got_dir), _files(want_dir)

    def apart(name):
        return name in NOT_COMPARED or name.startswith("tensorboard/events.out.tfevents.")

    same = {n for n in got if not apart(n)}, {n for n in want if not apart(n)}
    assert same[0] == same[1], (f"{got_dir.name}: extra files {sorted(same[0] - same[1])}, "
                                f"missing {sorted(same[1] - same[0])}")
    assert sorted(map(_kind, set(got) - same[0])) == sorted(map(_kind, set(want) - same[1]))  # one each
    n_bytes = 0
    for name, path in want.items():
        if apart(name):
            continue
        data = path.read_bytes()
        assert got[name].read_bytes() == data, f"{got_dir.name}/{name} differs from the uninterrupted run's"
        n_bytes += len(data)
    return len(want) - sum(map(apart, want)), n_bytes


def _draw(steps, rng) -> tuple[int, int]:
    """(rank, step) uniformly over the steps of both ranks."""
    at = rng.randrange(sum(map(len, steps)))
    return (0, at) if at < len(steps[0]) else (1, at - len(steps[0]))


def _soak(which, overrides, work, reference, steps, rng, kill_log):
    """TRIALS trials of `which`: kills at random points, then a run to completion, compared with
    `reference`; returns the figures."""
    out = {"embed": work / "embeddings", "match": work / "grounded"}[which]
    started = time.monotonic()
    figures = {"trials": 0, "runs": 0, "kills": 0, "ranks_killed": 0, "not_reached": 0, "leftovers": 0,
               "files": 0, "bytes": 0, "points": []}
    for _ in range(TRIALS):
        figures["trials"] += 1
        if which == "embed":
            shutil.rmtree(work, ignore_errors=True)
        else:  # the cache the embed soak verified; a fresh output directory
            shutil.rmtree(out, ignore_errors=True)
        for attempt in range(rng.randint(1, 3)):
            # an embed rerun skips the finished shards: its points are drawn over fewer steps
            share = 1 / (attempt + 1) if which == "embed" else 1
            within = [s[:max(1, int(len(s) * share))] for s in steps]
            kill_at = dict([_draw(within, rng)])
            if rng.random() < BOTH:
                other = 1 - next(iter(kill_at))
                kill_at[other] = rng.randrange(len(within[other]))
            shutil.rmtree(kill_log, ignore_errors=True)
            kill_log.mkdir()
            figures["runs"] += 1
            try:
                run_ranks(_stage, 2, which, overrides, kill_at, str(kill_log), timeout=120)
                figures["not_reached"] += 1  # a rerun has fewer steps than an uninterrupted run
                continue
            except RankError as err:
                died = sorted(kill_log.glob("rank*.txt"))
                assert died, f"a rank failed without being killed:\n{err}"
            figures["kills"] += 1
            figures["ranks_killed"] += len(died)
            figures["points"] += [f"rank {p.stem[4:]} at step {p.read_text().strip()}" for p in died]
            figures["leftovers"] += sum(1 for p in out.parent.rglob("*") if p.name.endswith(".tmp"))
        run_ranks(_stage, 2, which, overrides, {}, str(kill_log), timeout=120)  # the same command, to the end
        figures["runs"] += 1
        files, n_bytes = _compare(out, reference)
        figures["files"] += files
        figures["bytes"] += n_bytes
        assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")]
        if which == "match":
            assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    figures["seconds"] = time.monotonic() - started
    return figures


def test_killed_embed_and_match_rerun_to_the_uninterrupted_bytes(tmp_path, soak_world, tiny_teacher_dir):
    import matplotlib.figure  # noqa: F401 - imported once here, not in each of ~40 forked runs
    import torch.utils.tensorboard  # noqa: F401

    import dime_ds.embed.stage
    import dime_ds.knn.search
    import dime_ds.match.stage
    import dime_ds.models  # noqa: F401

    rng = random.Random(SOAK_SEED)
    work, ref, kill_log = tmp_path / "run", tmp_path / "reference", tmp_path / "kills"
    overrides = _overrides(work, soak_world, tiny_teacher_dir)  # every run in `work`: same paths recorded
    steps = {}
    for which in ("embed", "match"):
        steps[which] = run_ranks(_stage, 2, which, overrides, {}, str(kill_log), timeout=120)
    shutil.move(work, ref)
    assert len(list((ref / "grounded" / "tensorboard").glob("events.out.tfevents.*"))) == 1

    report = []
    for which, reference in (("embed", ref / "embeddings"), ("match", ref / "grounded")):
        f = _soak(which, overrides, work, reference, steps[which], rng, kill_log)
        assert f["kills"] >= TRIALS and f["files"] > 0
        report.append(f"{which}: {sum(map(len, steps[which]))} kill points "
                      f"({' + '.join(str(len(s)) for s in steps[which])} steps on ranks 0 + 1), "
                      f"{f['trials']} trials, {f['runs']} runs, {f['kills']} killed "
                      f"({f['ranks_killed']} ranks SIGKILLed, {f['not_reached']} reruns finished before their "
                      f"kill point), {f['leftovers']} temporaries left by the kills, {f['files']} files / "
                      f"{f['bytes']} bytes compared equal, {f['seconds']:.0f} s\n  killed at: {'; '.join(f['points'])}")
    print(f"\nstage soak (seed {SOAK_SEED}):\n" + "\n".join(report))
