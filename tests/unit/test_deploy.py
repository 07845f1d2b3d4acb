"""Deployment: towers folded into their deploy form keep their embeddings (models/deploy.py), and
`python -m dime_ds.export RUN OUT --onnx` writes ONNX files that onnxruntime runs as PyTorch does,
beside an OpenCLIP directory that plain open_clip still loads in the training form
(models/onnx_export.py). The runs are a few steps of real distillation, so BatchNorm statistics
are trained ones. Tolerance: fp32, max abs difference of L2-normalised embeddings <= 1e-4."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dime_ds.cli import run_entry
from dime_ds.config import load_config
from dime_ds.config.schema import StudentConfig
from dime_ds.engine.consolidate import load_student
from dime_ds.export import main as export_main
from dime_ds.models import build_student
from dime_ds.models import onnx_export
from dime_ds.models.deploy import Deployed, deploy_form
from tests.conftest import engine_overrides
from tests.multirank.harness import run_ranks
from tests.unit.test_students import TEXT, TOWERS

TOL = 1e-4
ONNX_FILES = (onnx_export.IMAGE_FILE, onnx_export.TEXT_FILE, onnx_export.PARITY_FILE)
SENTENCES = ["a red circle", "two blue stars next to a green square", "nothing", "a b c", "the end of it"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine a second spinning thread can slow a convolution 100-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _normalised_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (F.normalize(a.double(), dim=-1) - F.normalize(b.double(), dim=-1)).abs().max().item()


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _tower_student(vision_cfg: dict):
    cfg = OmegaConf.structured(StudentConfig(arch="test", text="teacher",
                                             model_cfg={"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": TEXT}))
    torch.manual_seed(0)
    return build_student(cfg, 24)


@pytest.mark.parametrize("name, kinds", [("fastvit_mci0", {"MobileOneBlock", "RepMixer", "ReparamLargeKernelConv"}),
                                         ("mobileone_s0", {"MobileOneBlock"})])
def test_folding_keeps_the_embeddings_eval_reads(name, kinds):
    student = _tower_student({"timm_model_name": name, "timm_pool": "avg", "timm_proj": None, "image_size": 32})
    student.train()
    with torch.no_grad():  # training-mode forwards: BatchNorm running statistics move off their 0 / 1 start
        for step in range(3):
            student.encode_image(2 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(step)) + 0.5)
    student.eval()
    means = [m.running_mean for m in student.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert means and all(m.abs().max() > 1e-3 for m in means)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    deployed = deploy_form(student)
    assert deployed.model is not student and not deployed.model.training
    assert len(deployed.folded) > 0 and kinds <= set(deployed.kinds)
    norms = lambda model: sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())  # noqa: E731
    assert norms(deployed.model) < norms(student)  # the branches' BatchNorms are in the convolutions now
    assert student.state_dict().keys() == before.keys()  # the trained form is left as it was
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        trained, folded = student.encode_image(images), deployed.model.encode_image(images)
    assert _normalised_diff(folded, trained) <= TOL
    assert _rel_l2(folded, trained) <= TOL  # the raw embeddings too, their norms included


def test_a_tower_without_a_deploy_form_is_returned_as_it_is():
    student = _tower_student(TOWERS["vit"]).train()
    assert deploy_form(student) == Deployed(student, [], [])
    assert student.training  # not even its mode is touched


# Real runs: a few distillation steps of each student tower, then the export command with --onnx.

def _train(rank, world_size, overrides):
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


def _export(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_entry(export_main, list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_world, tiny_teacher_dir):
    """tower -> (run dir, export dir, export's exit code, its stdout); each trained and exported once."""
    done: dict[str, tuple[Path, Path, int, str]] = {}

    def get(tower: str):
        if tower not in done:
            root = tmp_path_factory.mktemp(f"deploy_{tower}")
            arch = root / "student.json"  # a model-config file is a student (the demo's inline one unset)
            arch.write_text(json.dumps({"embed_dim": 16, "vision_cfg": TOWERS[tower], "text_cfg": TEXT}))
            overrides = engine_overrides(root / "work", tiny_world, tiny_teacher_dir, f"student.arch={arch}",
                                         "student.model_cfg=null")
            assert run_ranks(_train, 1, overrides, timeout=300)[0]["status"] == "completed"
            run = root / "work" / "runs" / "demo"
            code, stdout, stderr = _export(str(run), str(root / "exported"), "--onnx")
            assert code == 0, stderr
            done[tower] = (run, root / "exported", code, stdout)
        return done[tower]

    return get


@pytest.mark.parametrize("tower", ["vit", "resnet_bn", "convnext", "mci"])
def test_onnx_files_run_as_pytorch_does_beside_a_plain_openclip_dir(exported, tower):
    run, out, code, printed = exported(tower)
    assert all((out / name).is_file() for name in ONNX_FILES) and not list(out.glob("*.tmp"))
    record = json.loads((out / onnx_export.PARITY_FILE).read_text())
    assert record["passed"] and record["tolerance"] == TOL
    assert {(r["encoder"], r["batch"]) for r in record["rows"]} == {(e, b) for e in ("image", "text") for b in (1, 3)}
    assert all(r["max_abs_normalised"] <= TOL and r["rel_l2"] <= TOL for r in record["rows"])
    assert (record["folded_modules"] > 0) is (tower == "mci")  # only FastViT/MCi has a deploy form here
    assert "onnxruntime against PyTorch" in printed and "max abs (normalised)" in printed

    # The directory: plain open_clip, training form (nothing folded), the student's trained statistics.
    student, _ = load_student(run)
    student.eval()
    plain = open_clip.create_model(f"local-dir:{out}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert type(plain.visual).__name__ == type(student.visual).__name__
    stats = {k: v for k, v in student.visual.state_dict().items() if k.endswith("running_var")}
    assert bool(stats) is (tower in ("resnet_bn", "mci"))
    for key, value in stats.items():
        assert not torch.equal(value, torch.ones_like(value)), key  # trained, not BatchNorm's start
        assert torch.equal(plain.visual.state_dict()[key], value), key

    # ONNX at batch sizes never traced (dynamic batch axis), against both.
    image_session = onnx_export.onnx_session(out / onnx_export.IMAGE_FILE, threads=1)
    text_session = onnx_export.onnx_session(out / onnx_export.TEXT_FILE, threads=1)
    assert [(i.name, i.type) for i in image_session.get_inputs()] == [("image", "tensor(float)")]
    assert [(i.name, i.type) for i in text_session.get_inputs()] == [("text", "tensor(int64)")]
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        tokens = tokenizer(SENTENCES[:batch])
        assert tokens.dtype == torch.int64 and tokens.shape == (batch, 32)
        got_image = torch.from_numpy(image_session.run(None, {"image": images.numpy()})[0])
        got_text = torch.from_numpy(text_session.run(None, {"text": tokens.numpy()})[0])
        with torch.inference_mode():
            ours, theirs = student.encode_image(images), plain.encode_image(images)
            text = plain.encode_text(tokens)
        assert got_image.shape == (batch, 32) and got_text.shape == (batch, 32)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # the directory is the student
        for got, want in ((got_image, theirs), (got_image, ours), (got_text, text)):
            assert _normalised_diff(got, want) <= TOL
            assert _rel_l2(got, want) <= TOL


@torch.library.custom_op("dime_ds_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    """An operator no ONNX exporter knows: what a tower with an exotic kernel would hold."""
    return x.clone()


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("wrap, operator", [(_opaque, "dime_ds_test::opaque"),
                                            (lambda x: torch.fft.fft(x).real, "aten::fft_fft")])
def test_an_unexportable_tower_is_named_by_its_operator(exported, tmp_path, monkeypatch, capfd, wrap, operator):
    run = exported("vit")[0]
    forward = open_clip.transformer.VisionTransformer.forward
    monkeypatch.setattr(open_clip.transformer.VisionTransformer, "forward", lambda self, x: wrap(forward(self, x)))
    out = tmp_path / "out"
    capfd.readouterr()
    code = run_entry(export_main, [str(run), str(out), "--onnx"])
    stdout, stderr = capfd.readouterr()  # file descriptors: what the exporter's C++ side writes too
    assert code == 2
    assert operator in stderr and "image tower" in stderr and "Traceback" not in stderr
    assert "graph" not in stdout + stderr  # the exporter's graph dump kept off the console
    assert not any((out / name).exists() for name in ONNX_FILES) and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert open_clip.create_model(f"local-dir:{out}") is not None  # the OpenCLIP directory is whole


def test_a_failed_parity_check_leaves_no_onnx_file(exported, tmp_path, monkeypatch):
    run, good, _, _ = exported("vit")
    out = tmp_path / "out"
    out.mkdir()
    for name in ONNX_FILES:  # an earlier export's files must not survive beside a new model
        (out / name).write_bytes((good / name).read_bytes())

    def corrupted(model):
        import copy

        broken = copy.deepcopy(model).eval()
        with torch.no_grad():
            broken.visual.proj.mul_(1.5).add_(0.05)
        return Deployed(broken, ["visual"], ["VisionTransformer"])

    monkeypatch.setattr(onnx_export, "deploy_form", corrupted)
    code, _, stderr = _export(str(run), str(out), "--onnx", "--force")
    assert code == 2 and "parity" in stderr and "FAILED" in stderr and "Traceback" not in stderr
    assert "no ONNX file was kept" in stderr
    assert not any((out / name).exists() for name in ONNX_FILES) and not list(out.glob("*.tmp"))
    assert (out / "open_clip_config.json").is_file()


def test_an_export_without_onnx_removes_an_earlier_exports_onnx_files(exported, tmp_path):
    run, good, _, _ = exported("vit")
    out = tmp_path / "out"
    out.mkdir()
    for name in ONNX_FILES:
        (out / name).write_bytes((good / name).read_bytes())
    assert _export(str(run), str(out), "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]


def test_without_the_deploy_extra_the_message_names_it(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    code, _, stderr = _export(str(exported("vit")[0]), str(tmp_path / "out"), "--onnx")
    assert code == 2 and "dime_ds[deploy]" in stderr and "onnxruntime" in stderr
    assert not (tmp_path / "out").exists()  # refused before any work
    # The export module itself never imports them: it works without the extra.
    probe = ("import sys, dime_ds.export, dime_ds.models.onnx_export; "
             "print(sorted({'onnx', 'onnxruntime'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_latency_bench_smoke(tmp_path, monkeypatch, capsys):
    """bench/latency.py --tiny end to end, once per case: tables printed, JSON written (no timing asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_latency", Path(__file__).parents[2] / "bench" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the bench pins it: restored after
    out = tmp_path / "latency.json"
    monkeypatch.setattr(sys, "argv", ["latency.py", "--tiny", "--runs", "1", "--warmup", "0", "--batches", "1,3",
                                      "--out", str(out)])
    assert bench.main() == 0
    printed = capsys.readouterr().out
    assert "onnxruntime ms" in printed and "GFLOPs / image" in printed and "same run" in printed
    record = json.loads(out.read_text())
    assert len(record["models"]) == 2 and all(m["parity_passed"] and m["flops"]["image"] > 0 for m in record["models"])
    cases = {(r["model"], r["encoder"], r["batch"], r["runtime"]) for r in record["rows"]}
    assert cases == {(m["name"], e, b, rt) for m in record["models"] for e in ("image", "text") for b in (1, 3)
                     for rt in ("torch", "onnxruntime")}
    assert len(record["ratios"]) == 8
