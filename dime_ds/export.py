"""`python -m dime_ds.export <checkpoint> <out_dir> [--tag step_00000042] [--force] [--onnx]`: a distilled
student as a plain OpenCLIP model directory (open_clip_config.json + open_clip_model.safetensors)
that `open_clip.create_model_and_transforms('local-dir:<out_dir>')` loads without dime_ds.

<checkpoint> is a run directory, its checkpoint directory or one tag directory. The weights are the
fp32 master weights consolidated from the ZeRO shards; projections are folded into the towers; a
student without a text tower (student.text=teacher) gets the teacher's, loaded from the run's
teacher section.

--onnx also writes image.onnx and text.onnx beside it (the image tower folded into its deploy form),
checked against PyTorch with onnxruntime, the figures in onnx_parity.json (dime_ds/models/onnx_export.py;
needs the `deploy` extra). The directory itself keeps the training form: open_clip rebuilds the tower
from the config."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from dime_ds.cli import run_entry
from dime_ds.errors import UserError


class ExportError(UserError, FileExistsError):
    """An output directory that export must not write into."""


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another out_dir")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another out_dir, or pass --force to "
                          "overwrite its model files")


def export_student(checkpoint: str | Path, out_dir: str | Path, tag: str | None = None,
                   force: bool = False, onnx: bool = False, onnx_tolerance: float | None = None) -> Path:
    """Write the student of `checkpoint` (newest tag unless `tag`) to `out_dir`, and with `onnx` its
    ONNX files (parity-checked, models/onnx_export.py); returns its path."""
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, force)  # before any heavy work
    import torch

    from dime_ds.engine.consolidate import fp32_state_dict, resolve_checkpoint, step_of, student_from_state
    from dime_ds.models import PRECISIONS, load_teacher, save_openclip_dir, student_preprocess_cfg, uses_quick_gelu
    from dime_ds.models import onnx_export

    if onnx:
        onnx_export.require_deploy_extra()  # before any heavy work too

    cfg, ckpt_dir, tag = resolve_checkpoint(checkpoint, tag)
    student = student_from_state(cfg, fp32_state_dict(ckpt_dir, tag))
    text_state = text_cfg = None
    if not student.has_text:
        # fp32: the teacher's stored weights as they are, not their half-precision rounding.
        teacher = load_teacher(cfg.teacher, torch.device("cpu"), PRECISIONS["fp32"])
        if uses_quick_gelu(teacher.model) != bool(student.model_cfg.get("quick_gelu", False)):
            # The student took teacher_quick_gelu's answer; a teacher built otherwise would make an
            # OpenCLIP model whose one quick_gelu flag is wrong for one of its towers.
            raise RuntimeError(f"teacher {cfg.teacher.arch}: its built activation disagrees with its config's")
        text_state, text_cfg = teacher.text_tower_state()
    state, model_cfg = student.openclip_state(text_state, text_cfg)
    provenance = {"source": str(ckpt_dir / tag), "tag": tag, "step": step_of(tag), "run": cfg.name,
                  "student_text": student.text_mode, "loss": cfg.loss.objective}
    if cfg.loss.objective != "clip":  # a CLIP-loss run (demo teacher, from-scratch baseline) had no teacher
        provenance.update(teacher=cfg.teacher.arch, teacher_pretrained=cfg.teacher.pretrained)
    onnx_export.remove_onnx_files(out)  # an earlier export's: they are not of this model
    save_openclip_dir(state, model_cfg, student_preprocess_cfg(student.model_cfg), out, extra=provenance)
    if onnx:
        tolerance = onnx_export.TOLERANCE if onnx_tolerance is None else onnx_tolerance
        try:
            onnx_export.export_onnx(out, tolerance=tolerance)
        except onnx_export.OnnxExportError as err:
            raise type(err)(f"{err}\nThe OpenCLIP directory {out} is written and whole; "
                            "no ONNX file was kept.") from None
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dime_ds.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory, checkpoint directory or tag directory")
    parser.add_argument("out_dir", help="the OpenCLIP model directory to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest, DeepSpeed's `latest`)")
    parser.add_argument("--force", action="store_true", help="overwrite the model files of a non-empty out_dir")
    parser.add_argument("--onnx", action="store_true",
                        help="also write image.onnx and text.onnx (deploy form, parity-checked with onnxruntime)")
    parser.add_argument("--onnx-tolerance", type=float, default=None,
                        help="parity tolerance: max abs difference of normalised embeddings and relative L2 error "
                             "of raw ones (default 1e-4)")
    args = parser.parse_args(argv)
    out = export_student(args.checkpoint, args.out_dir, args.tag, args.force, args.onnx, args.onnx_tolerance)
    from dime_ds.models import read_openclip_dir

    source = read_openclip_dir(out)["dime_ds"]
    print(f"exported {source['source']} (step {source['step']}) to {out}\n"
          f"load it with OpenCLIP alone:\n"
          f"  model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out}')\n"
          f"  tokenizer = open_clip.get_tokenizer('local-dir:{out}')")
    if args.onnx:
        from dime_ds.models.onnx_export import PARITY_FILE, parity_table

        record = json.loads((out / PARITY_FILE).read_text())
        folded = (f"{record['folded_modules']} modules folded ({', '.join(record['folded_kinds'])})"
                  if record["folded_modules"] else "no deploy form to fold")
        print(f"ONNX: {out / 'image.onnx'}, {out / 'text.onnx'} (opset {record['opset']}; image tower: {folded}); "
              f"onnxruntime against PyTorch:\n{parity_table(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
