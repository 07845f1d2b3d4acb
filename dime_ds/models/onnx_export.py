"""ONNX files of an OpenCLIP model directory, for deployment: image.onnx (input `image`, float32
[batch, 3, H, W] preprocessed at the model's image size; output `image_features`) and text.onnx (input
`text`, int64 token ids [batch, context_length]; output `text_features`): what the model's
`encode_image` / `encode_text` return (unnormalised, as open_clip returns them), batch axis dynamic.
The image tower is folded into its deploy form first (models/deploy.py).

The model is loaded from the directory by open_clip itself, so the files are of the model a user
loads. Every export is checked: onnxruntime (CPU) against that PyTorch model, in its training form,
on random images and on token ids from the directory's own tokenizer, at batch 1 and 3 (traced at 2,
so that no batch size is baked in). Above the tolerance it fails (OnnxParityError) and no ONNX file
is left; the figures go to onnx_parity.json, written last: a directory with it holds a checked pair.

Needs the `deploy` extra (onnx, onnxruntime), imported only here, when asked for."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dime_ds import atomic
from dime_ds.errors import UserError
from dime_ds.models.deploy import deploy_form

log = logging.getLogger(__name__)

IMAGE_FILE, TEXT_FILE, PARITY_FILE = "image.onnx", "text.onnx", "onnx_parity.json"
# Opset 17: the first with LayerNormalization as one operator; older runtimes than the newest run it.
OPSET = 17
# On the max abs difference of L2-normalised embeddings (what every CLIP score uses) and the relative
# L2 error of the raw ones (their norms too), in fp32: well above what reordered float sums give,
# well below what a wrong graph or a lost BatchNorm statistic gives.
TOLERANCE = 1e-4
PARITY_BATCHES = (1, 3)
TRACE_BATCH = 2
PARITY_TEXTS = ("a photo of a dog", "two red circles next to a blue square on a white table", "a")


class DeployExtraMissing(UserError, ImportError):
    """onnx or onnxruntime is not installed."""


class OnnxExportError(UserError, RuntimeError):
    """A tower the ONNX exporter cannot convert (the message names the operator)."""


class OnnxParityError(OnnxExportError):
    """onnxruntime's embeddings differ from PyTorch's beyond the tolerance."""


def require_deploy_extra():
    """(onnx, onnxruntime), or a message naming the extra that brings them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise DeployExtraMissing(f"ONNX export needs onnx and onnxruntime ({err.name} is not installed): "
                                 "pip install 'dime_ds[deploy]' (or: pip install onnx onnxruntime)") from None
    return onnx, onnxruntime


class _Encoder(nn.Module):
    """One tower of an OpenCLIP model as a module of one input: what torch.onnx.export traces."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.kind == "image" else self.model.encode_text(x)


def load_openclip(model_dir: str | os.PathLike):
    """(model in eval mode, tokenizer) of an OpenCLIP model directory, by open_clip alone, fp32 on CPU."""
    import open_clip

    name = f"local-dir:{Path(model_dir).resolve()}"
    model = open_clip.create_model(name, device="cpu", precision="fp32").eval()
    return model, open_clip.get_tokenizer(name)


def parity_inputs(model: nn.Module, tokenizer, batch: int) -> dict[str, torch.Tensor]:
    """Random images at the model's input size and token ids of real sentences, `batch` of each."""
    images = torch.randn(batch, 3, *image_hw(model), generator=torch.Generator().manual_seed(batch))
    texts = [PARITY_TEXTS[i % len(PARITY_TEXTS)] for i in range(batch)]
    return {"image": images, "text": tokenizer(texts).to(torch.int64)}


def image_hw(model: nn.Module) -> list[int]:
    """(height, width) an OpenCLIP model's image tower takes (an int for OpenCLIP's ResNet, else a pair)."""
    size = model.visual.image_size
    return [size, size] if isinstance(size, int) else list(size)


def _operator(message: str) -> str:
    """The operator an exporter error names ('aten::fft_fft', 'mylib::op'), else its first line."""
    found = re.search(r"operator '([^']+)'", message) or re.search(r"unrecognized namespace (\S+?)\.?(\s|$)", message)
    return found.group(1) if found else message.strip().splitlines()[0]


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """Holds file descriptor 2 in a file for the call, the exporter's log sent there: when a
    conversion fails, the TorchScript exporter logs its whole graph (thousands of lines that would
    bury the message naming the operator); that goes to the debug log. After a success what was
    written is passed on. The log stream is set back to stdout, torch's default, after."""
    log_to = getattr(torch._C, "_jit_set_onnx_log_output_stream", lambda stream: None)
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        log_to("stderr")
        try:
            yield
            failed = False
        finally:
            log_to("stdout")
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            if failed:
                log.debug("ONNX exporter output:\n%s", text)
            elif text:
                sys.stderr.write(text)


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, kind: str, opset: int = OPSET) -> None:
    """Trace `module` (one input, one output) to an ONNX file with a dynamic batch axis."""
    # The TorchScript-based exporter (dynamo=False): the dynamo exporter needs onnxscript, one more
    # dependency, and torch.export's slower tracing; this one ships with torch and converts every
    # tower open_clip builds here. Its tracer and conversion warnings are silenced: the parity check,
    # at batch sizes other than the traced one, catches what they warn of (a shape baked into the
    # graph, an index form converted for non-negative indices only).
    try:
        with warnings.catch_warnings(), _stderr_held():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[kind], output_names=[f"{kind}_features"],
                              dynamic_axes={kind: {0: "batch"}, f"{kind}_features": {0: "batch"}})
    except torch.onnx.errors.UnsupportedOperatorError as err:
        raise OnnxExportError(f"the {kind} tower cannot be exported to ONNX: the exporter has no conversion for "
                              f"the operator {_operator(str(err))} at opset {opset}") from None
    except torch.onnx.errors.OnnxExporterError as err:
        raise OnnxExportError(f"the {kind} tower cannot be exported to ONNX: {_operator(str(err))}") from None


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Max abs and relative L2 error of raw embeddings, max abs error of L2-normalised ones."""
    got, want = got.double(), want.double()
    return {"max_abs": (got - want).abs().max().item(),
            "rel_l2": ((got - want).norm() / want.norm().clamp_min(1e-30)).item(),
            "max_abs_normalised": (F.normalize(got, dim=-1) - F.normalize(want, dim=-1)).abs().max().item()}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session (`threads`: intra-op threads, None for onnxruntime's default)."""
    _, ort = require_deploy_extra()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def remove_onnx_files(out_dir: str | os.PathLike) -> None:
    """Remove the ONNX files of an earlier export (parity record first): they must not stand beside
    another model as if they were its."""
    for name in (PARITY_FILE, IMAGE_FILE, TEXT_FILE):
        (Path(out_dir) / name).unlink(missing_ok=True)


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                tolerance: float = TOLERANCE, opset: int = OPSET) -> dict[str, Any]:
    """Write image.onnx, text.onnx and onnx_parity.json of the OpenCLIP model directory `model_dir`
    into `out_dir` (default: beside the model); returns the parity record."""
    onnx, ort = require_deploy_extra()
    out = Path(out_dir or model_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_onnx_files(out)
    trained, tokenizer = load_openclip(model_dir)
    deployed = deploy_form(trained)
    if deployed.folded:
        log.info("folded %d modules into their deploy form (%s)", len(deployed.folded), ", ".join(deployed.kinds))
    examples = {batch: parity_inputs(trained, tokenizer, batch) for batch in (TRACE_BATCH, *PARITY_BATCHES)}
    pending = {kind: atomic.PendingFile(out / name) for kind, name in (("image", IMAGE_FILE), ("text", TEXT_FILE))}
    try:
        rows = []
        for kind, file in pending.items():
            export_graph(_Encoder(deployed.model, kind), examples[TRACE_BATCH][kind], file.tmp, kind, opset)
            onnx.checker.check_model(str(file.tmp))
            session = onnx_session(file.tmp, threads=torch.get_num_threads())
            for batch in PARITY_BATCHES:
                x = examples[batch][kind]
                with torch.inference_mode():
                    want = _Encoder(trained, kind)(x)
                    folded = _Encoder(deployed.model, kind)(x)
                got = torch.from_numpy(session.run(None, {kind: x.numpy()})[0])
                row = {"encoder": kind, "batch": batch, "shape": list(got.shape), **compare(got, want),
                       "folding_max_abs_normalised": compare(folded, want)["max_abs_normalised"]}
                row["passed"] = row["max_abs_normalised"] <= tolerance and row["rel_l2"] <= tolerance
                rows.append(row)
        record = {"tolerance": tolerance, "passed": all(r["passed"] for r in rows), "rows": rows,
                  "reference": "PyTorch fp32, the model as open_clip loads it (training form)",
                  "folded_modules": len(deployed.folded), "folded_kinds": deployed.kinds, "opset": opset,
                  "exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__, "machine": platform.machine(),
                  "inputs": {kind: {"dtype": str(x.dtype).removeprefix("torch."), "shape": ["batch", *x.shape[1:]]}
                             for kind, x in examples[TRACE_BATCH].items()}}
        if not record["passed"]:
            raise OnnxParityError(f"ONNX export of {model_dir} failed its parity check (tolerance {tolerance:g} on "
                                  "the max abs difference of normalised embeddings and the relative L2 error of raw "
                                  "ones):\n" + parity_table(record))
        for file in pending.values():
            file.commit()
    except BaseException:
        for file in pending.values():
            file.discard()
        raise
    atomic.write_json(out / PARITY_FILE, record, indent=2)
    return record


def parity_table(record: dict[str, Any]) -> str:
    from dime_ds.log.table import format_table

    rows = [[r["encoder"], r["batch"], f"{r['max_abs']:.2e}", f"{r['rel_l2']:.2e}", f"{r['max_abs_normalised']:.2e}",
             f"{r['folding_max_abs_normalised']:.2e}", "ok" if r["passed"] else "FAILED"] for r in record["rows"]]
    return format_table(["encoder", "batch", "max abs", "rel L2", "max abs (normalised)",
                         "folding alone (normalised)", f"<= {record['tolerance']:g}"], rows)
