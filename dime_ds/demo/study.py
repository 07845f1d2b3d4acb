"""`make study`: the demo's comparisons over several student seeds, on the synthetic world.

    python -m dime_ds.demo.study [seeds=3] [demo.compare=[curation,balance,...]] [Hydra overrides as for the demo]

Beside the demo's three models (teacher, DIME-FM student on unpaired data, the same student from
scratch on pairs), the comparisons of `demo.compare` (all by default; dime_ds/demo/comparisons.py):
`curation`, `balance`, `cid`, `views`, `families`, `ensemble`. Every student trains once per seed
0..N-1 (`seed=` moves its initialisation, data order and augmentation; teachers, the world and the
stages before training stay as they are); each model is evaluated with the synthetic suite and
every cell is reported as mean ± sd over the seeds (teachers: one value). A second table holds each
student's differences from the DIME-FM student, paired by seed: a difference whose mean is well
outside its sd is beyond seed noise.

Writes <work_dir>/study/: study.md (the tables and each comparison's lines, from the students'
results averaged over the seeds), study.json (every seed's results) and study.png (the headline
metrics as bars with sd error bars). Runs are <work_dir>/runs/study-<experiment>-seed<k>.

`demo.compare=[]` studies the demo itself (DIME-FM against scratch over seeds);
`demo.compare=[ensemble]` is the teacher-ensemble study (students of A, B and A+B).
Stopping: as `make demo` (SIGTERM or Ctrl-C: the student in training checkpoints, status 3; a rerun
resumes it and reuses every run that finished)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from dime_ds import atomic
from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config
from dime_ds.config.schema import RootConfig

log = logging.getLogger("dime_ds.demo")
SEEDS = "seeds="
DEFAULT_SEEDS = 3


def parse_seeds(argv: Sequence[str]) -> tuple[int, list[str]]:
    """(seeds, the other arguments): `seeds=N` (default 3) is the study's own argument."""
    given = [a for a in argv if a.startswith(SEEDS)]
    try:
        n = int(given[-1][len(SEEDS):]) if given else DEFAULT_SEEDS
    except ValueError:
        raise ConfigError(f"{given[-1]}: seeds=N with a whole number N >= 1") from None
    if n < 1:
        raise ConfigError(f"seeds={n}: at least one seed")
    return n, [a for a in argv if not a.startswith(SEEDS)]


def mean_results(per_seed: Sequence[Any]) -> Any:
    """The seeds' results averaged leaf by leaf (numbers, and lists of them element-wise); other
    leaves are the first seed's."""
    first = per_seed[0]
    if isinstance(first, bool) or len(per_seed) == 1:
        return first
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in per_seed):
        return sum(per_seed) / len(per_seed)
    if isinstance(first, dict):
        return {k: mean_results([r[k] for r in per_seed if isinstance(r, dict) and k in r]) for k in first}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in per_seed):
        return [mean_results(list(col)) for col in zip(*per_seed)]
    return first


def differences(results: dict[str, list[dict]], reference: str, students: Sequence[str]) -> list[list[str]]:
    """Rows (model, then per headline metric the difference from `reference` paired by seed, in
    points: mean ± sd)."""
    from dime_ds.demo.summary import METRICS, cell, metric

    return [[m, *[cell([metric(a, ds, key) - metric(b, ds, key) for a, b in zip(results[m], results[reference])])
                   for _, ds, key in METRICS]] for m in students if m != reference]


def write_study(raw: RootConfig, n: int, compared: list[str], students: list[str], results: dict[str, list[dict]],
                speeds: dict[str, list[float]], summaries: dict[str, list[dict]], records: dict, lines: list[str],
                trained: dict, wall: float) -> None:
    """The tables printed, and <work_dir>/study/study.{md,json,png}."""
    from dime_ds.demo.comparisons import RAW_COLUMN
    from dime_ds.demo.summary import METRICS, bar_chart, markdown, rows
    from dime_ds.log.table import format_table

    models = list(results)
    header = ["metric (%)", *models]
    body = rows(results, speeds)
    diff_header = ["difference from DIME-FM (points)", *[label for label, _, _ in METRICS]]
    diff_body = differences(results, RAW_COLUMN, students)
    head = (f"make study: {n} seed{'s' if n > 1 else ''} (0-{n - 1}) per student, mean ± sd; teachers once; "
            f"{raw.optim.steps} steps x {raw.optim.global_batch_size} samples per student; "
            f"comparisons: {', '.join(compared) or 'none'}")
    print(f"\n{head}\n{format_table(header, body)}\n\n{format_table(diff_header, diff_body)}\n\n" + "\n".join(lines)
          + f"\nwall time {wall:.0f} s")
    out = Path(raw.work_dir) / "study"
    png = bar_chart(out / "study.png", results, speeds, f"make study: {n} seed(s), mean ± sd",
                    notes=[f"{raw.optim.steps} steps x {raw.optim.global_batch_size} per student; "
                           f"synthetic world, {raw.data.synthetic.n_eval} test images a set; chance 12.5 % zero-shot"])
    atomic.write_text(out / "study.md", f"{head}\n\n{markdown(header, body)}\nDifferences from "
                      f"{RAW_COLUMN}, paired by seed (mean ± sd of the per-seed differences, points):\n\n"
                      f"{markdown(diff_header, diff_body)}\n```\n" + "\n".join(lines).strip("\n")
                      + f"\n```\n\n![study]({png.name})\n")
    atomic.write_json(out / "study.json", {"seeds": n, "compare": compared, "results": results,
                                           "samples_per_s": speeds, "students": summaries, **records,
                                           "teacher_training": trained, "wall_s": wall}, indent=2, default=str)
    print(f"results: {out / 'study.md'} (and study.json, {png.name})")


def main(argv: Sequence[str]) -> int:
    n, overrides = parse_seeds(argv)  # answered before torch, DeepSpeed and faiss are imported
    import torch

    from dime_ds.demo.comparisons import BASELINE_COLUMN, RAW_COLUMN, TEACHER_COLUMN, ground, grounding_line, selected
    from dime_ds.demo.runs import Runner
    from dime_ds.demo.stopping import StopGuard, Stopped, user_command
    from dime_ds.demo.teacher import ensure_teacher, student_overrides, teacher_dir, teacher_record
    from dime_ds.eval.models import checkpoint_encoders, openclip_encoder
    from dime_ds.eval.suite import evaluate_suite

    start = time.time()

    def config(experiment: str, seed: int | None = None) -> RootConfig:
        extra = [] if seed is None else [f"seed={seed}", f"name=study-{experiment}-seed{seed}"]
        return load_config([f"experiment={experiment}", *student_overrides(overrides), *extra])

    raw = config("demo")
    comparisons = selected(raw.demo.compare)
    students = [(RAW_COLUMN, "demo"), *((s.column, s.experiment) for c in comparisons for s in c.students),
                (BASELINE_COLUMN, "demo_baseline")]
    cfgs = {exp: config(exp) for _, exp in students}
    for seed in range(n):  # every config is checked before anything heavy starts
        for _, exp in students:
            config(exp, seed)
    device, eval_cfg = torch.device("cpu"), raw.eval
    command = user_command("study", " ".join(argv))  # a rerun with other seeds would be another study
    with StopGuard(command) as guard:
        runner = Runner(guard)
        teachers = [(TEACHER_COLUMN, "demo_teacher", "demo")]
        teachers += [(f"teacher B (CLIP, paired, {t})", t, s) for c in comparisons for t, s in c.teachers]
        trained = {}
        for column, experiment, reader in teachers:
            with guard.training() as late:
                trained[column] = ensure_teacher(overrides, teacher_dir(cfgs[reader]), experiment, rerun=command)
            if late():
                raise Stopped(f"stopped after {column} finished; rerun `{command}` to go on")
        grounding = ground(raw)
        prepared = {c.name: c.prepare(cfgs, raw) for c in comparisons}
        results: dict[str, list[dict]] = {}
        speeds: dict[str, list[float]] = {}
        for column, experiment, reader in teachers:
            encoder = openclip_encoder(str(teacher_dir(cfgs[reader])), None, eval_cfg.precision, device, column)
            results[column] = [evaluate_suite(encoder, eval_cfg, progress=False)]
            speeds[column] = [teacher_record(cfgs[reader], trained[column]).get("samples_per_s", 0)]
        summaries: dict[str, list[dict]] = {}
        for seed in range(n):
            for column, exp in students:
                cfg = config(exp, seed)
                summary = runner.train(cfg, f"{column}, seed {seed}")
                encoder, _ = checkpoint_encoders(cfg.run_dir, eval_cfg.precision, device, with_teacher=False)
                results.setdefault(column, []).append(evaluate_suite(encoder, eval_cfg, progress=False))
                speeds.setdefault(column, []).append(summary.get("samples_per_s", 0))
                summaries.setdefault(column, []).append({**summary, "run_dir": cfg.run_dir})
                log.info("seed %d, %s: zero-shot shape %.1f %%", seed, column,
                         100 * results[column][-1]["shape"]["top1"])
        # each comparison's lines from the students' results averaged over the seeds
        means = {c: mean_results(r) for c, r in results.items()}
        mean_summaries = {c: {**s[0], "samples_per_s": sum(speeds[c]) / len(speeds[c])} for c, s in summaries.items()}
        records, lines = {}, [grounding_line("raw", grounding)]
        for c in comparisons:
            more, records[c.name] = c.lines(cfgs, raw, prepared[c.name], means, mean_summaries)
            lines += more
        write_study(raw, n, [c.name for c in comparisons], [c for c, _ in students], results, speeds, summaries,
                    records, lines, trained, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main, usage=__doc__))
