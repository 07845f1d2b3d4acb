"""The bare student, the floor a distiller's step can reach: an OpenCLIP model forward + backward +
AdamW step on one fixed batch, with no teacher, no data loading and no engine. Two precisions:
`bf16` (the weights and AdamW states in bf16, as DeepSpeed's bf16 engine computes) and `amp_bf16`
(fp32 weights under bf16 autocast, as open_clip_train's amp_bf16). The loss is OpenCLIP's CLIP loss,
a negligible cost next to the towers. Run as a process of its own so that its threads and memory
are its own:

    python bench/support/bare_student.py '{"model": "local-dir:<dir>", "batch": 32, "steps": 20,
                                           "precision": "bf16", "texts": [...]}' out.json
writes {"step_s": [seconds of each step], ...}."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run(spec: dict) -> dict:
    import open_clip
    import torch

    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(0)
    model = open_clip.create_model(spec["model"], device=device)
    tokenizer = open_clip.get_tokenizer(spec["model"])
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    batch = int(spec["batch"])
    images = torch.randn(batch, 3, *size, device=device)
    texts = (list(spec["texts"]) * batch)[:batch]
    tokens = tokenizer(texts).to(device)
    precision = spec["precision"]
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        images = images.to(torch.bfloat16)
    elif precision not in ("amp_bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: one of bf16, amp_bf16, fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "amp_bf16")
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    step_s = []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        with autocast:
            out = model(images, tokens)
            loss = loss_fn(out[0], out[1], out[2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s, "precision": precision, "loss": float(loss.detach())}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(json.loads(sys.argv[1]))))
