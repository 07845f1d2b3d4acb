"""Why the precision policy (dime_ds/models/precision.py) picks fp32 on CPUs without native bf16:
forward + backward of the demo teacher's architecture (a student with its own text tower) in fp32
and in bf16, the dtypes alternated so that a noisy machine hits both alike. Prints a table, writes
JSON to bench/results/precision_speed.json.

    .venv/bin/python bench/precision_speed.py            # ~1 minute on 2 CPU cores
    .venv/bin/python bench/precision_speed.py --batch 256 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per dtype (after one warm-up each)")
    args = parser.parse_args()

    import torch

    from dime_ds.config import load_config
    from dime_ds.log.table import format_table
    from dime_ds.models.precision import cpu_has_native_bf16, precision_for
    from dime_ds.models.student import build_student

    cfg = load_config(["experiment=demo_teacher"])
    torch.manual_seed(0)
    model = build_student(cfg.student)
    size = model.model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 1000, (args.batch, model.context_length))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for round_ in range(args.rounds + 1):
        for name, dtype in dtypes.items():
            model.to(dtype).zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(images=images.to(dtype), tokens=tokens)
            (out.image.float().sum() + out.text.float().sum()).backward()
            if round_:  # the first round warms both up
                times[name].append(time.perf_counter() - t0)
    rows = [{"dtype": name, "median_s": statistics.median(ts), "samples_per_s": args.batch / statistics.median(ts)}
            for name, ts in times.items()]
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    print(format_table(["dtype", "fwd+bwd s (median)", "samples/s"],
                       [[r["dtype"], f"{r['median_s']:.3f}", f"{r['samples_per_s']:.0f}"] for r in rows]))
    print(f"bf16 / fp32 time: {ratio:.1f}x; native bf16 on this CPU: {cpu_has_native_bf16()}; "
          f"the policy's student precision here: {precision_for('student', torch.device('cpu')).name}")
    out = ROOT / "bench" / "results" / "precision_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.machine(), "rows": rows,
                               "bf16_over_fp32": ratio, "native_bf16": cpu_has_native_bf16()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
