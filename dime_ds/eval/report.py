"""One table for one or several models on a suite: a row per dataset and headline metric, a column
per model (teacher and student side by side), task means at the bottom. Printed, and written as
JSON (every metric) and a markdown table."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from dime_ds import atomic
from dime_ds.config.schema import EvalConfig
from dime_ds.distributed import collectives as C
from dime_ds.models.encoder import Encoder
from dime_ds.eval.suite import evaluate_suite, headline
from dime_ds.log.table import format_table


def _cell(value) -> str:
    return f"{100 * value:.1f}" if isinstance(value, float) else str(value)


def table_rows(results: Mapping[str, Mapping[str, dict]],
               extra_rows: Sequence[Sequence] = ()) -> tuple[list[str], list[list]]:
    """(header, rows) of percentages; `results` is {model: {dataset: metrics}}. Task means average
    each dataset's headline metric (ELEVATER's way: mean per-class where a set uses it)."""
    models = list(results)
    datasets = list(dict.fromkeys(d for per in results.values() for d in per))
    rows, means, mean_labels = [], {}, {}
    for dataset in datasets:
        per_model = [results[m].get(dataset) for m in models]
        first = next(p for p in per_model if p is not None)
        for i, (_, label, _) in enumerate(headline(first)):
            values = [headline(p)[i][2] if p is not None else "" for p in per_model]
            rows.append([dataset, label, *[_cell(v) for v in values]])
            if all(isinstance(v, float) for v in values):
                group = label if first["task"] == "retrieval" else first["task"]
                means.setdefault(group, []).append(values)
                mean_labels.setdefault(group, set()).add(label)
    for group, lists in means.items():
        if len(lists) > 1:
            labels = mean_labels[group]
            label = next(iter(labels)) if len(labels) == 1 else f"{group.replace('_', ' ')}, each set's metric"
            rows.append([f"mean of {len(lists)}", label, *[_cell(sum(col) / len(col)) for col in zip(*lists)]])
    rows += [list(r) for r in extra_rows]
    return ["dataset", "metric (%)", *models], rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, stem: str, results: Mapping[str, Mapping[str, dict]],
                 info: Mapping[str, dict], extra_rows: Sequence[Sequence] = ()) -> tuple[str, Path]:
    """(console table, json path); `<stem>.json` and `<stem>.md` land in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(results, extra_rows)
    missing = sorted({f"{d} ({m.get('path')})" for per in results.values() for d, m in per.items() if m.get("missing")})
    errors = sorted({f"{d}: {m['error']}" for per in results.values() for d, m in per.items() if "error" in m})
    notes = [f"missing, skipped: {', '.join(missing)}"] if missing else []
    notes += [f"error: {e}" for e in errors]
    damaged = sorted({f"{d}: {msg}" for per in results.values() for d, m in per.items()
                      for msg in m.get("damaged_shards", [])})
    notes += [f"{e} (used as far as readable)" for e in damaged]
    path = out / f"{stem}.json"
    atomic.write_json(path, {"models": dict(info), "results": dict(results), "missing": missing, "errors": errors,
                             "damaged_shards": damaged}, indent=2, default=str)
    atomic.write_text(out / f"{stem}.md",
                      markdown_table(header, rows) + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    return format_table(header, rows) + "".join(f"\n{n}" for n in notes), path


def compare(encoders: Sequence[Encoder], eval_cfg: EvalConfig, out_dir: str | os.PathLike, *, progress: bool = True,
            extra_rows: Sequence[Sequence] = (), notes: Sequence[str] = ()) -> dict[str, dict]:
    """Every model on the suite (all ranks take part); rank 0 prints the side-by-side table and
    writes <suite>.json / <suite>.md in out_dir. Returns {model: {dataset: metrics}}."""
    results = {e.name: evaluate_suite(e, eval_cfg, progress=progress) for e in encoders}
    if C.is_main():
        table, path = write_report(out_dir, eval_cfg.suite, results, {e.name: e.info for e in encoders}, extra_rows)
        models = "\n".join(f"  {e.name}: {e.info.get('source')}" for e in encoders)
        print(f"\nsuite {eval_cfg.suite}\n{models}\n\n{table}" + "".join(f"\n{n}" for n in notes))
        print(f"\nresults: {path} (and {path.with_suffix('.md').name})")
    return results
