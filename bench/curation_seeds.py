"""Does MetaCLIP curation change the demo student's zero-shot per shape class beyond seed noise?
Trains each experiment's DIME-FM student for several seeds on a work directory where the curation
comparison ran (world, teacher, grounded and curated corpora already there) and prints, per shape class, the mean and
standard deviation of zero-shot top-1 over the seeds, and each experiment's mean paired difference
to the first one. Prints a table, writes JSON. A finished seed (its eval report) is not retrained.

    make study ARGS="seeds=1 demo.compare=[curation]"             # prepares work/
    .venv/bin/python bench/curation_seeds.py                      # 3 experiments x 5 seeds: ~45 min on 2 cores
    .venv/bin/python bench/curation_seeds.py --seeds 0 1 2 3 --extra student.text=own --tag own

Experiments (configs/experiment/): demo (raw pool), demo_curated (the pool curated before grounding),
demo_curated_grounded (the grounded corpus curated after Algorithm 1)."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_class(work: Path, experiment: str, seed: int, extra: list[str], tag: str) -> list[float]:
    name = f"seeds-{experiment}-{tag}{seed}"
    report = work / "runs" / name / "eval" / "synthetic.json"
    if not report.is_file():
        common = [f"work_dir={work}", "log.progress=false"]
        subprocess.run([sys.executable, "-m", "dime_ds.distill", f"experiment={experiment}", f"name={name}",
                        f"seed={seed}", *common, *extra], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "dime_ds.eval", f"model={work / 'runs' / name}", *common],
                       check=True, capture_output=True)
    results = json.loads(report.read_text())["results"]
    student = [v for k, v in results.items() if not k.startswith("teacher")][-1]
    return [100 * x for x in student["shape"]["per_class"]]


def main() -> int:
    from dime_ds.demo.synthetic import SHAPES
    from dime_ds.log.table import format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "work"), help="a make demo work directory")
    p.add_argument("--experiments", nargs="+", default=["demo", "demo_curated", "demo_curated_grounded"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every student")
    p.add_argument("--tag", default="", help="run-name tag for --extra variants")
    p.add_argument("--json", default=None, help="default: <work>/curation_seeds<tag>.json")
    a = p.parse_args()
    work = Path(a.work).resolve()
    scores = {}
    for e in a.experiments:
        scores[e] = []
        for s in a.seeds:
            scores[e].append(per_class(work, e, s, a.extra, a.tag))
            print(f"{e} seed {s}: " + " ".join(f"{v:.1f}" for v in scores[e][-1]), flush=True)

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    base = a.experiments[0]
    header = ["class", *[f"{e} (mean ± sd)" for e in a.experiments], *[f"{e} - {base}" for e in a.experiments[1:]]]
    rows = []
    for c, cls in enumerate([*SHAPES, "mean"]):
        col = {e: [(sum(r) / len(r) if cls == "mean" else r[c]) for r in scores[e]] for e in a.experiments}
        diffs = [cell([x - y for x, y in zip(col[e], col[base])]) for e in a.experiments[1:]]
        rows.append([cls, *[cell(col[e]) for e in a.experiments], *diffs])
    print(f"\nzero-shot top-1 per shape class (%), seeds {a.seeds}, extra {a.extra or 'none'}; "
          "differences paired by seed")
    print(format_table(header, rows))
    out = Path(a.json or work / f"curation_seeds{a.tag}.json")
    out.write_text(json.dumps({"classes": list(SHAPES), "seeds": a.seeds, "extra": a.extra, "per_class": scores},
                              indent=1))
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
