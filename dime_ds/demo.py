"""`make demo`: the embedded default on one CPU machine, nothing downloaded. Writes the synthetic
world, trains (or reuses) the demo teacher with the CLIP loss on paired shards, then evaluates it
zero-shot on the labelled synthetic sets and prints a table. Extra arguments are Hydra overrides
applied to every stage (e.g. `work_dir=/tmp/demo optim.steps=50`)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from open_clip.factory import parse_model_name

from dime_ds.cli import run_entry
from dime_ds.config import ConfigError, load_config, save_config
from dime_ds.data.synthetic import write_world
from dime_ds.engine.pretrain import is_current, pretrain_clip
from dime_ds.eval.suite import evaluate_suite
from dime_ds.log.table import format_table
from dime_ds.models import load_teacher, resolve_device

log = logging.getLogger("dime_ds.demo")


def teacher_dir(cfg) -> Path:
    schema, path = parse_model_name(cfg.teacher.arch)
    if schema != "local-dir":
        raise ConfigError(f"the demo trains its own teacher: teacher.arch must be local-dir:<dir>, "
                          f"not {cfg.teacher.arch}")
    return Path(path)


def ensure_teacher(overrides: Sequence[str], out_dir: Path) -> dict | None:
    """Train the demo teacher unless a current one (same recipe) is already there."""
    cfg = load_config(["experiment=demo_teacher", *overrides])
    write_world(cfg.data.root, cfg.data.synthetic)
    if is_current(out_dir, cfg):
        log.info("demo teacher in %s is current; reusing it", out_dir)
        return None
    save_config(cfg, cfg.run_dir)
    return pretrain_clip(cfg, out_dir)


def main(overrides: Sequence[str]) -> int:
    start = time.time()
    cfg = load_config(["experiment=demo", *overrides])
    save_config(cfg, cfg.run_dir)
    trained = ensure_teacher(overrides, teacher_dir(cfg))
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, device)
    results = {"teacher": evaluate_suite(teacher.encode_image, teacher.encode_text, teacher.tokenizer,
                                         teacher.preprocess_cfg, cfg.eval, device)}
    rows = []
    for model, per_set in results.items():
        for name, m in per_set.items():
            rows.append([model, name, "missing" if m.get("missing") else f"{100 * m['top1']:.1f}",
                         "" if m.get("missing") else f"{100 / m['classes']:.1f}", m.get("n", 0)])
    table = format_table(["model", "dataset", "zero-shot top-1 %", "chance %", "images"], rows)
    wall = time.time() - start
    print("\n" + table + f"\n\ndemo wall time {wall:.0f} s"
          + (f" (teacher trained in {trained['wall_s']:.0f} s)" if trained else " (teacher reused)"))
    out = Path(cfg.run_dir) / "demo_results.json"
    out.write_text(json.dumps({"results": results, "teacher_training": trained, "wall_s": wall}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
